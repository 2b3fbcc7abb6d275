"""The same `experiments.pretrain` command as 2 processes x 4 CPU devices (gloo) and as 1 process x 8 devices: the
same losses and gradient norms, step by step.

The model is `tiny` cut to one CSA layer (ratio 4, learned routing: its balance loss needs expert counts summed over
the processes) and the MTP layer, with a 512-token vocabulary; every other layer kind runs sharded in one process in
`test_train_equivalence` and `test_context_parallel`. Two steps: the second runs on the weights the first updated.
AdamW keeps the update in float32, so only the order of the cross-process sums differs (Muon's bfloat16
Newton-Schulz turns such differences into bf16 roundings: its sharded-vs-single check is in the optimizer's tests).
The synthetic global batch depends only on (seed, step); each process builds its own rows of it.

The same comparison on `--mesh=context=8` (rows of 256 tokens: 2 x 8 chunks of 16, the sliding window) puts context
parallelism across the two processes: each holds half of every sequence. Both form one row group
(`sharding.host_data`): they load the same rows of the synthetic batch and each device takes its own tokens.

The two-process job compiles everything itself (see `launch`: on CPU a process finds only its own entries in a
persistent cache); the one-process run uses the session's cache."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import COMPILATION_CACHE
from tests.sharding.launch import launch, run_single

ARGS = ["--config=tiny", "--num_hidden_layers=1", "--compress_ratios=4,0", "--num_hash_layers=0",
        "--vocab_size=512", "--optimizer=adamw", "--steps=2", "--batch_size=8", "--seq_len=64",
        "--mesh=data=2,expert=4", "--log_every=1",
        "--save_every=1000", "--data=synthetic", "--compilation_cache=", "--progress=false", "--schedule=constant",
        "--warmup_steps=0", "--eval_every=0", "--plot=false", "--tensorboard=false",
        "--peak_flops=1e12"]  # no matmul measurement in each of the three processes
CONTEXT_ARGS = [a for a in ARGS if not a.startswith(("--mesh=", "--batch_size=", "--seq_len="))] + [
    "--mesh=context=8", "--batch_size=2", "--seq_len=256"]
KEYS = ("loss", "mtp_loss", "grad_norm", "balance_loss")


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_ran(run) -> None:
    """A crash is reported with the run's output tail."""
    if run.returncode != 0:
        raise RuntimeError(f"exit {run.returncode}:\n{run.stdout[-3000:]}")


@pytest.mark.slow  # three processes run the init and the train step (the two-process job compiles them)
@pytest.mark.parametrize("args", [ARGS, CONTEXT_ARGS], ids=["data=2,expert=4", "context=8"])
def test_pretrain_two_processes_match_one(tmp_path, args):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The one-process run uses the persistent compilation cache; the two-process job compiles (see `launch`).
        single_args = [a for a in args if not a.startswith("--compilation_cache=")] + [
            f"--compilation_cache={COMPILATION_CACHE}", f"--workdir={one}"]
        single = pool.submit(run_single, "experiments.pretrain", single_args, devices=8, timeout=1800)
        for r in launch("experiments.pretrain", args + [f"--workdir={two}"], 2, 4,
                        coordinator_flag="coordinator_address", timeout=1800):
            check_ran(r)
        check_ran(single.result())
    want, got = records(one), records(two)
    if [r["step"] for r in want] != [1, 2] or [r["step"] for r in got] != [1, 2]:
        raise RuntimeError(f"expected steps 1-2 in both runs, got {want} and {got}")
    for w, g in zip(want, got):
        for k in KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (w["step"], k)
