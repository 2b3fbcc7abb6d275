"""tools.bench_train: one CI-sized step on each side (ours and, when installed, transformers) runs and reports."""

import pytest
import importlib.util
import os
import subprocess
import sys

from tests.sharding.launch import subprocess_env
from tests.tools.test_profile_step import TINY_CUT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # compiles a train step and runs transformers: ~40 s
def test_one_step_on_tiny():
    has_torch = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    env = subprocess_env(compilation_cache=True)
    cmd = [sys.executable, "-m", "tools.bench_train", "--config=tiny", *TINY_CUT, "--batch_size=1", "--seq_len=32",
           "--steps=1", "--warmup=0", "--nolog", "--matmul_size=256", f"--torch={has_torch}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| ours (JAX) |" in p.stdout and "config tiny without MTP; batch 1 x 32" in p.stdout, p.stdout
    if has_torch:
        assert "| transformers (torch) |" in p.stdout and "ours / transformers tokens/s" in p.stdout, p.stdout
