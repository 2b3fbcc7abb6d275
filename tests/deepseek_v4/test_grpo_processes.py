"""GRPO's rollout metrics in a real two-process job: every process logs the statistics of all prompts, not its own."""

import json

import numpy as np
import pytest

from deepseek_v4 import grpo
from tests.deepseek_v4.grpo_processes_worker import shares
from tests.sharding.launch import launch


@pytest.mark.slow  # two processes import JAX and start a distributed client (~10 s)
def test_every_process_logs_the_record_of_both_processes_shares(tmp_path):
    out = str(tmp_path / "record")
    for run in launch("tests.deepseek_v4.grpo_processes_worker", [f"--out={out}"], 2, 1,
                      coordinator_flag="coordinator_address", timeout=300):
        assert run.returncode == 0, run.stdout[-3000:]
    got = [json.load(open(f"{out}.{i}.json", encoding="utf-8")) for i in range(2)]
    both = [grpo.StepStats.from_totals(a.totals() + b.totals()).record() for a, b in zip(shares(0), shares(1))]
    want = {k: float(np.mean([r[k] for r in both])) for k in both[0]}
    alone = grpo.record_over_processes(shares(0))  # this test process is one process: its own share only
    assert got[0] == pytest.approx(want) and got[1] == pytest.approx(want)
    assert alone["mean_reward"] != pytest.approx(want["mean_reward"])  # the shares differ: a missing gather shows
