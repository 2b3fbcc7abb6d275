"""Context parallelism across processes: `experiments.pretrain` on `--mesh=context=8` as 2 processes x 4 CPU devices
(each process holds half of every sequence) and as 1 process x 8 devices: the same losses, step by step.

Both processes form one row group (`sharding.host_data`): they load the same rows of the synthetic batch and each
device takes its own tokens. The model is the multi-process pretraining test's (tiny cut to a CSA and an HCA layer,
MTP, 512-token vocabulary), with rows of 256 tokens (2 x 8 chunks of 16, the HCA ratio).
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.sharding.launch import launch, run_single
from tests.sharding.test_pretrain_multiprocess import ARGS, KEYS, check_ran, records

CONTEXT_ARGS = [a for a in ARGS if not a.startswith(("--mesh=", "--batch_size=", "--seq_len="))] + [
    "--mesh=context=8", "--batch_size=2", "--seq_len=256"]


@pytest.mark.slow  # three processes each compile the init and the train step
def test_context_across_two_processes_matches_one(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    with ThreadPoolExecutor(max_workers=1) as pool:
        single = pool.submit(run_single, "experiments.pretrain", CONTEXT_ARGS + [f"--workdir={one}"], devices=8,
                             timeout=1800)
        for r in launch("experiments.pretrain", CONTEXT_ARGS + [f"--workdir={two}"], 2, 4,
                        coordinator_flag="coordinator_address", timeout=1800):
            check_ran(r)
        check_ran(single.result())
    want, got = records(one), records(two)
    if [r["step"] for r in want] != [1, 2, 3] or [r["step"] for r in got] != [1, 2, 3]:
        raise RuntimeError(f"expected steps 1-3 in both runs, got {want} and {got}")
    for w, g in zip(want, got):
        for k in KEYS:
            assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (w["step"], k)
