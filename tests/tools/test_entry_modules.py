"""The entry-point modules that other code and the tests import in-process define no clashing absl flags.

absl flags are process-global: two modules that define the same flag at import cannot live in one process, and
which test files share a pytest worker varies from run to run, so a clash would make the suite fail only sometimes.
"""

import subprocess
import sys

# Every tools / experiments module the tests (or the library) import in-process.
IMPORTED_IN_PROCESS = (
    "experiments.flags", "experiments.generate", "experiments.init_weights", "experiments.preflight",
    "experiments.run", "experiments.spikes", "experiments.held_out", "experiments.grpo", "tools.device_check",
    "tools.evaluate",
    "tools.export_safetensors", "tools.import_safetensors", "tools.memory_plan", "tools.model_stats",
    "tools.plot_metrics", "tools.make_chat_data",
)


def test_modules_imported_in_process_define_no_clashing_flags():
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % (IMPORTED_IN_PROCESS,)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
