"""The entry-point modules define no absl flags at import, so any of them can be imported together in-process.

absl flags are process-global: two modules that define the same flag at import cannot live in one process, and
which test files share a pytest worker varies from run to run, so a clash would make the suite fail only sometimes.
Every tool and every entry point (experiments.pretrain, sft, grpo, distill, generate) defines its flags in
`define_flags()`, called only when it runs as the program.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# Every tools module (found on disk, so a new tool is covered too) and every experiments module that the tests or
# the library import in-process.
TOOLS = tuple(sorted(f"tools.{p.stem}" for p in (REPO / "tools").glob("*.py") if p.stem != "__init__"))
IMPORTED_IN_PROCESS = (
    "experiments.flags", "experiments.generate", "experiments.init_weights", "experiments.preflight",
    "experiments.run", "experiments.spikes", "experiments.held_out", "experiments.teachers", "experiments.grpo",
    "experiments.pretrain", "experiments.sft", "experiments.distill", *TOOLS,
)


@pytest.fixture(scope="module")
def imported_together():
    """One fresh process imports every module of IMPORTED_IN_PROCESS in turn, then prints each absl flag defined
    since its start with the module that defined it (`name module` per line)."""
    code = ("import importlib\nfrom absl import flags\nbefore = set(flags.FLAGS)\nfor m in %r:\n"
            "    importlib.import_module(m)\nfor name in sorted(set(flags.FLAGS) - before):\n"
            "    print(name, flags.FLAGS.find_module_defining_flag(name))\n" % (IMPORTED_IN_PROCESS,))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"JAX_PLATFORMS": "cpu", **os.environ})


def test_modules_imported_in_process_define_no_clashing_flags(imported_together):
    assert imported_together.returncode == 0, imported_together.stderr[-2000:]


def test_modules_define_no_flag_at_import(imported_together):
    # Flags of the libraries they import (absl's own, grain's, orbax's) are not theirs to avoid.
    ours = ("tools", "experiments", "deepseek_v4", "sharding", "pallas_kernels")
    proc = imported_together
    assert proc.returncode == 0, proc.stderr[-2000:]
    defined = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert defined and not [(n, m) for n, m in defined if m.split(".")[0] in ours + ("__main__",)], proc.stdout
