"""`experiments.grpo`: GRPO steps through the shared train step, resume mid-GRPO, counted reward failures, the CLI.

tests/experiments/post_training.py's two-layer tiny model with sliding-window attention only (the real vocabulary:
the prompts are chat tokens) from its seeded initialisation; a reward with signal even for an untrained policy (the
completion's length mod 3).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from deepseek_v4 import grpo, train
from experiments import grpo as grpo_exp
from experiments import run as run_lib
from tests.conftest import CODEGEN_FLAGS
from tests.experiments import post_training

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = post_training.CFG.replace(compress_ratios=(0, 0, 0))
G = grpo.GRPOSettings(task="string", prompts_per_step=2, group_size=4, max_new_tokens=3, top_k=4, kl_weight=0.1,
                      opsm_delta=0.5)  # 8 rows: the test process's 8 CPU devices split them
STEPS = 2
FAILING = grpo.step_problems(G.task, G.prompts_per_step, 0, 0)[0].question  # its grader raises


def _reward(problem, text, mode):
    if problem.question == FAILING:
        raise RuntimeError("grader unavailable")
    return float(len(text) % 3)


def _grpo(workdir: str, steps: int, save_every: int = 10):
    """Runs (or resumes) GRPO in `workdir` up to `steps`; returns the final params on the host."""
    s = train.TrainSettings(steps=steps, optimizer="adamw", learning_rate=1e-3, warmup_steps=0, schedule="constant",
                            mtp_weight=0.0, mtp_weight_after_decay=0.0, bias_speed=0.0)
    # fsdp=8: parameters and optimizer state split over the 8 fake CPU devices. The default (data=8) holds eight
    # replicas of the real-vocabulary embedding, head and their AdamW moments: 17.3 GiB peak vs 4.0 GiB.
    opts = run_lib.RunSettings(workdir=workdir, batch_size=G.prompts_per_step * G.group_size, seq_len=40,
                               log_every=1, save_every=save_every, plot=False, tensorboard=False, progress=False,
                               peak_flops=1e12,  # no matmul measurement (tests/deepseek_v4/test_metrics.py has one)
                               mesh="fsdp=8",
                               compilation_cache="")  # keep the test session's cache settings (tests/conftest.py)
    run, prepare = grpo_exp.setup_run(CFG, s, opts, G, workdir=workdir, reward_fn=_reward)
    assert run_lib.train_and_report(run, run_lib.StopSignal(), prepare) == 0
    return jax.device_get(run.state.params)


def _records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted: params, workdir; interrupted after step 1 and resumed: params, workdir).

    The interrupted run is the uninterrupted one's directory as it was after step 1 (its checkpoint of step 2
    removed; the resume moves the metrics records after step 1 aside): one GRPO run fewer than running the first
    step again, with the same checkpoint of step 1 (the runs are deterministic)."""
    whole = str(tmp_path_factory.mktemp("whole"))
    split = str(tmp_path_factory.mktemp("split"))
    a = _grpo(whole, STEPS, save_every=1)
    shutil.copytree(whole, split, dirs_exist_ok=True)
    shutil.rmtree(os.path.join(split, "checkpoints", str(STEPS)))
    b = _grpo(split, STEPS)
    return a, whole, b, split


@pytest.mark.slow  # two GRPO runs of a two-layer nano model (rollout + train-step compiles): minutes on 2 cores
def test_grpo_steps_record_rollout_metrics_and_count_failing_rewards(runs):
    _, whole, _, _ = runs
    recs = _records(whole)
    assert [r["step"] for r in recs] == [1, 2]
    for key in ("mean_reward", "reward_std", "completion_length", "kept_fraction", "kl", "clipped_fraction",
                "skipped_groups", "skipped_samples"):
        assert all(np.isfinite(r[key]) for r in recs), key
    assert recs[0]["skipped_groups"] == 1 and recs[0]["skipped_samples"] == 4  # the raising grader: counted
    assert all(r["skipped_steps"] == 0 for r in recs)
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first step is on the reference weights


@pytest.mark.slow  # see above (shares the module's runs)
def test_resumed_grpo_takes_the_same_steps(runs):
    a, whole, b, split = runs
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_allclose(_records(whole)[-1]["mean_reward"], _records(split)[-1]["mean_reward"])
    assert _records(split)[0]["step"] == 1 and _records(split)[-1]["step"] == 2


@pytest.mark.slow  # a subprocess importing JAX and the entry point (~10-20 s)
def test_cli_rejects_bad_settings_in_one_line():
    env = dict(os.environ, XLA_FLAGS=CODEGEN_FLAGS, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.grpo", "--task=arithmetic", "--group_size=0"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == "error: --group_size must be >= 1, got 0"
