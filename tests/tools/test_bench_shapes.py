"""The two whole-step benchmarks built on tools.bench_shapes, on one cut-down tiny config and batch, so that the
train step compiles once for both (the profile runs first, in this process; bench_train's run reads the compiled
step back from the persistent compilation cache):

- tools.profile_step: the table has every component row with positive times;
- tools.bench_train: one step on each side (ours and, when installed, transformers) runs and reports.

The persistent cache's key includes the process's device topology, so bench_train's process sees this process's 8
CPU devices (its step runs on one of them either way).

The cut keeps one layer of each attention kind (sliding, CSA, HCA), a hash-routed and learned-routed MoE, and a
scanned unit, so every profile row is there; fewer layers only shorten the whole train step's compile."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from absl import flags

from tests.sharding.launch import subprocess_env
from tools import bench_shapes, profile_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny as 3 layers (sliding hash-routed; CSA, HCA scanned once), a 512-token vocabulary; MTP is dropped by the tool.
TINY_CUT = ("--num_hidden_layers=3", "--compress_ratios=0,4,16,0", "--num_hash_layers=1", "--vocab_size=512")
ROWS = ("embedding", "mHC weights (incl. Sinkhorn)", "mHC collapse", "mHC update", "attention sliding",
        "attention csa", "attention hca", "MoE router (learned)", "MoE routed experts", "of which expert FFN alone",
        "MoE shared expert", "head + loss", "optimizer (AdamW + clip)", "sum of rows", "measured whole train step")


def step_shape(args) -> tuple:
    """(config, batch rows, tokens per row, name) that the step benchmarks make of the command line `args`."""
    flag_values = flags.FlagValues()
    bench_shapes.define_flags(flag_values)
    flag_values(["profile_step", *args])
    return bench_shapes.config_and_batch(flag_values)


@pytest.mark.slow  # compiles every component forward and backward: ~40 s
def test_profile_step_table_has_every_row_with_positive_times(capsys):
    """In this process: the command line's parsing is the same `bench_shapes` code (its refusal is tested below on
    the command line)."""
    cfg, b, t, name = step_shape(["--config=tiny", *TINY_CUT, "--batch_size=1", "--seq_len=32"])
    assert profile_step.profile(cfg, b, t, name, calls=1, steps=1)
    out = capsys.readouterr().out
    assert f"{name} without MTP; batch 1 x 32" in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| component")]
    for row_name in ROWS:
        row = next((ln for ln in lines if row_name in ln), None)
        assert row is not None, f"no row {row_name!r} in\n{out}"
        cells = row.split("|")
        if row_name in ("sum of rows", "measured whole train step"):
            assert float(cells[7]) > 0, row  # total ms
        else:
            assert float(cells[4]) > 0, row  # fwd+bwd ms of one call
    assert re.search(r"MFU \d+\.\d% of the measured peak", out), out


def test_profile_step_refuses_shape_and_config_together():
    cmd = [sys.executable, "-m", "tools.profile_step", "--shape=mid", "--config=tiny"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "give --shape or --config, not both" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow  # runs transformers (our compiled step comes from the cache): ~25 s
def test_bench_train_one_step_on_tiny():
    """tools.bench_train on the command line: one CI-sized step on each side (ours and, when installed,
    transformers) runs and reports. Our step is the program the profile test above compiled: read back from the
    persistent compilation cache."""
    has_torch = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    # This process's device count and codegen flags: both are part of the cache key.
    env = subprocess_env(8, compilation_cache=True)
    cmd = [sys.executable, "-m", "tools.bench_train", "--config=tiny", *TINY_CUT, "--batch_size=1", "--seq_len=32",
           "--steps=1", "--warmup=0", "--nolog", "--matmul_size=256", f"--torch={has_torch}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| ours (JAX) |" in p.stdout and "config tiny without MTP; batch 1 x 32" in p.stdout, p.stdout
    if has_torch:
        assert "| transformers (torch) |" in p.stdout and "ours / transformers tokens/s" in p.stdout, p.stdout
