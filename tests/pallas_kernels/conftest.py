"""The kernel tests' one switch between native and interpreted Pallas.

`interpret(impl)` (a fixture) is False for this backend's own kernel style on a GPU or TPU, where the kernel is
compiled and run natively, and True everywhere else: on CPU, and for the other platform's style (a GPU host
interprets the Mosaic TPU kernels). Every kernel-vs-reference test takes it, so the same tests are the native
kernel tests on a device (`python -m tools.device_check` runs them there). The tests of this folder carry the
`gpu` marker: they exercise the accelerator code paths.
"""

import jax
import pytest

_NATIVE = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())


def interpret_mode(impl: str) -> bool:
    """Whether a Pallas kernel of style `impl` ("pallas_gpu" / "pallas_tpu") runs in the interpreter here."""
    return impl != _NATIVE


@pytest.fixture(scope="session")
def interpret():
    return interpret_mode


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/pallas_kernels/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
