"""The same `experiments.pretrain` command as 2 processes x 4 CPU devices and as 1 process x 8 devices: the
same losses and gradient norms, step by step.

Opt-in (`SHARDING_LONG_TESTS=1`): three processes each compile the tiny model's init and train step, about
13 CPU-minutes in all, more than the default suite's budget. `tests/sharding/test_multiprocess.py` checks the
same multi-process mechanics (gloo, sharded jit, all_to_all, psum) in the default run.
"""

import json
import os

import pytest

from tests.sharding.launch import launch, run_single

ARGS = ["--config=tiny", "--steps=3", "--batch_size=8", "--seq_len=64", "--mesh=data=2,expert=4", "--log_every=1",
        "--save_every=1000", "--data=synthetic", "--compilation_cache=", "--progress=false", "--schedule=constant",
        "--warmup_steps=0"]
KEYS = ("loss", "mtp_loss", "grad_norm", "balance_loss")


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_ran(run) -> None:
    """A crash is a real failure (RuntimeError), not the expected data mismatch (AssertionError) below."""
    if run.returncode != 0:
        raise RuntimeError(f"exit {run.returncode}:\n{run.stdout[-3000:]}")


# The mechanics pass today (both runs finish, three steps each). The loss comparison waits for the trainer: its
# synthetic data seeds each process separately (seed + 1000 * process), so 2 processes see a different global
# batch than 1; once the global batch depends only on (seed, step), this turns XPASS and the marker must go.
@pytest.mark.xfail(raises=AssertionError, strict=True, reason="synthetic batches depend on the process count")
@pytest.mark.skipif(not os.environ.get("SHARDING_LONG_TESTS"), reason="opt-in: about 13 CPU-minutes")
@pytest.mark.slow
def test_pretrain_two_processes_match_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    check_ran(run_single("experiments.pretrain", ARGS + [f"--workdir={one}"], devices=8, timeout=3600))
    for r in launch("experiments.pretrain", ARGS + [f"--workdir={two}"], 2, 4, coordinator_flag="coordinator_address",
                    timeout=3600):
        check_ran(r)
    want, got = records(one), records(two)
    if [r["step"] for r in want] != [1, 2, 3] or [r["step"] for r in got] != [1, 2, 3]:
        raise RuntimeError(f"expected steps 1-3 in both runs, got {want} and {got}")
    for w, g in zip(want, got):
        for k in KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (w["step"], k)
