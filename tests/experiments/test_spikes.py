"""Loss spikes and held-out evaluation through the real entry point (`python -m experiments.pretrain`).

The runs use test_faults.py's cut-down tiny model on synthetic data (12 steps of 2 x 32 tokens, constant LR). A
spike is injected through the data: --debug_spike_at_batches multiplies one batch's loss weights by 1000, so its
cross entropy is 1000x the running mean. Runs:
  plain     no spike detection, no evaluation: the reference losses.
  skip      --spike_response=skip, spike in batch 7, --log_every=4, --eval_every=3: the spike step is found one
            step late (the host never waits for the device) and dropped; evaluations at 3, 6, 9, 12.
  rollback  --spike_response=rollback, spike in batch 8, checkpoints every 3 steps: back to step 6, batches 7-8
            skipped, steps 7-12 taken on batches 9-14.
Then `tools.evaluate` scores the plain run's final checkpoint on the same held-out rows as the skip run.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deepseek_v4.metrics import read_metrics
from tests.experiments.test_faults import BASE, REPO, TIMEOUT, _env, run

pytestmark = pytest.mark.slow
TOTAL = 12
SPIKES = ["--spike_min_history=3", "--spike_factor=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spikes")
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {
            "plain": pool.submit(run, root / "plain", f"--steps={TOTAL}", "--save_every=100", "--eval_every=0"),
            "skip": pool.submit(run, root / "skip", f"--steps={TOTAL}", "--save_every=100", "--log_every=4",
                                "--eval_every=3", "--spike_response=skip", "--debug_spike_at_batches=7", *SPIKES),
            "rollback": pool.submit(run, root / "rollback", f"--steps={TOTAL}", "--save_every=3", "--eval_every=0",
                                    "--spike_response=rollback", "--debug_spike_at_batches=8", *SPIKES),
        }
        out = {name: job.result() for name, job in jobs.items()}
    return root, out


def _records(d):
    return {r["step"]: r for r in read_metrics(str(d))}


def test_skip_drops_the_spike_step_and_evaluation_leaves_the_data_alone(runs):
    root, out = runs
    assert "step 7: loss spike (" in out["skip"].stderr and "update skipped (1 so far)" in out["skip"].stderr
    assert "non-finite" not in out["skip"].stderr
    plain, skip = _records(root / "plain"), _records(root / "skip")
    assert sorted(skip) == [3, 4, 6, 8, 9, 12]  # log_every=4 plus the evaluation steps
    # Before the spike the trajectories agree: evaluating (at 3 and 6) read no training batch, changed no state.
    np.testing.assert_allclose(skip[3]["loss"], np.mean([plain[s]["loss"] for s in (1, 2, 3)]), rtol=1e-5)
    np.testing.assert_allclose(skip[4]["loss"], plain[4]["loss"], rtol=1e-5)
    np.testing.assert_allclose(skip[6]["loss"], np.mean([plain[s]["loss"] for s in (5, 6)]), rtol=1e-5)
    # Step 8's record averages the updated steps 7-8, i.e. step 8 only; the spike is counted from there on.
    assert skip[6]["loss_spikes"] == 0 and skip[8]["loss_spikes"] == 1 and skip[12]["loss_spikes"] == 1
    assert skip[8]["skipped_steps"] == 1 and skip[12]["spike_rollbacks"] == 0
    assert skip[8]["loss"] < 2 * plain[8]["loss"]
    # Held-out metrics at every evaluation step (synthetic rows of another seed): finite and falling.
    evals = [skip[s]["eval_loss"] for s in (3, 6, 9, 12)]
    assert all(np.isfinite(evals)) and evals[-1] < evals[0] - 0.05, evals
    assert all("eval_mtp_loss" in skip[s] and "eval_loss_pos_0-1K" in skip[s] for s in (3, 6, 9, 12))
    assert "eval_bits_per_byte" not in skip[3]  # synthetic rows stand for no text
    assert "eval_loss" not in skip[4] and "eval_loss" not in plain[TOTAL]


def test_rollback_returns_to_the_checkpoint_and_skips_the_data_window(runs):
    root, out = runs
    err = out["rollback"].stderr
    assert "step 8: loss spike (" in err
    assert "step 8: rolled back to step 6, skipping 2 batch(es) of data (1 rollback(s) so far)" in err
    plain, back = _records(root / "plain"), _records(root / "rollback")
    assert sorted(back) == list(range(1, TOTAL + 1))  # one timeline: the steps after 6 were taken again
    for s in range(1, 7):
        np.testing.assert_allclose(back[s]["loss"], plain[s]["loss"], rtol=1e-5)
    discarded = read_metrics(str(root / "rollback" / "metrics_discarded.jsonl"))
    assert [r["step"] for r in discarded] == [7]  # the record written between the checkpoint and the spike
    assert back[TOTAL]["spike_rollbacks"] == 1 and back[TOTAL]["loss_spikes"] == 1
    assert back[7]["loss"] != discarded[0]["loss"]  # step 7 again, on batch 9
    data_state = os.path.join(root, "rollback", "checkpoints", str(TOTAL), "data", "process_0-of-1.json")
    with open(data_state) as f:
        assert json.load(f)["index"] == TOTAL + 2  # 12 steps read 14 batches


def test_tools_evaluate_scores_a_checkpoint(runs):
    root, out = runs
    cmd = [sys.executable, "-m", "tools.evaluate", f"--workdir={root / 'plain'}", "--data=synthetic", "--batch_size=2",
           "--seq_len=32", "--json", f"--step={TOTAL}"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["step"] == TOTAL and np.isfinite(rec["eval_loss"]) and "eval_mtp_loss" in rec
    assert rec["eval_tokens"] == 2 * 2 * 32  # --eval_batches default 2, no padding in synthetic rows
    p = subprocess.run(cmd[:-1] + ["--step=5"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2 and p.stderr.startswith("error: no checkpoint step 5") and len(p.stderr.splitlines()) == 1


def test_bad_spike_and_eval_flags_are_one_line_errors(tmp_path):
    for flag, message in (("--spike_factor=0.5", "--spike_factor must be a number > 1"),
                          ("--eval_batches=0", "--eval_batches must be >= 1")):
        p = subprocess.run([sys.executable, "-m", "experiments.pretrain", *BASE,
                            f"--workdir={tmp_path / 'bad'}", flag], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=TIMEOUT)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
