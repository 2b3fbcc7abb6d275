"""Implementation dispatch shared by every kernel entry point (attention families, indexer, expert matmul).

One rule set (docs/kernels.md):
* `impl=None`: the best available: the Pallas kernel of this platform on GPU/TPU, the pure-JAX reference on
  CPU (interpret mode only where `interpret` asks for it on GPU/TPU).
* `impl="reference"`: the pure-JAX reference, anywhere; `interpret` is ignored.
* `impl="pallas"`: this platform's Pallas kernel. On CPU there is none: without `interpret` the request is
  impossible, and with `interpret` it is ambiguous (which kernel style to interpret?); both raise.
* `impl="pallas_gpu"` / `"pallas_tpu"`: that kernel style; compiled only on its own platform, elsewhere only
  with `interpret`.
An explicit request that cannot run raises a one-line ValueError; nothing falls back silently.
"""

from __future__ import annotations

from typing import Any, Literal

import jax

Impl = Literal["reference", "pallas", "pallas_gpu", "pallas_tpu"] | None
_NATIVE = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}


def resolve_impl(impl: Impl, interpret: Any = None, *, platform: str | None = None) -> tuple[str, Any]:
    """The implementation an entry point runs, and the `interpret` argument to give its Pallas call.

    Args:
      impl: "reference", "pallas", "pallas_gpu", "pallas_tpu" or None (see the module docstring).
      interpret: run a Pallas kernel in interpret mode: a truthy value (True, or `pltpu.InterpretParams()`,
        passed through unchanged) or a falsy one (None, False).
      platform: the JAX backend name; default `jax.default_backend()`.

    Returns:
      ("reference" | "pallas_gpu" | "pallas_tpu", interpret value for the kernel: False or the given one).

    Raises:
      ValueError: unknown name, or a request that cannot run on this platform.
    """
    platform = platform or jax.default_backend()
    native = _NATIVE.get(platform)
    interp = interpret if interpret else False
    if impl is None:
        return (native, interp) if native else ("reference", False)
    if impl == "reference":
        return "reference", False
    if impl not in ("pallas", "pallas_gpu", "pallas_tpu"):
        raise ValueError(f"impl must be 'reference', 'pallas', 'pallas_gpu', 'pallas_tpu' or None, got {impl!r}")
    if interp:
        if impl == "pallas":
            if native is None:
                raise ValueError(
                    f"impl='pallas' with interpret=True on {platform!r} is ambiguous: pass impl='pallas_gpu' or "
                    "impl='pallas_tpu'"
                )
            return native, interp
        return impl, interp
    if native is None:
        raise ValueError(
            f"impl={impl!r} cannot run on the {platform!r} backend: Pallas runs there only in interpret mode "
            "(pass interpret=True)"
        )
    if impl != "pallas" and impl != native:
        raise ValueError(
            f"impl={impl!r} cannot run natively on the {platform!r} backend (use {native!r} or interpret=True)"
        )
    return native, False


def check_block_sizes(module, block_sizes):
    """Returns `block_sizes` if it is None or the chosen kernel module's own `BlockSizes`; else ValueError."""
    if block_sizes is not None and not isinstance(block_sizes, module.BlockSizes):
        raise ValueError(
            f"block_sizes must be {module.__name__}.BlockSizes for this implementation, "
            f"got {type(block_sizes).__module__}.{type(block_sizes).__name__}"
        )
    return block_sizes
