"""A recipe end to end (subprocesses, one CPU device): the run crosses every kind of stage boundary by itself (a
batch change, a sequence-length change, dense -> indexer warm-up -> sparse), compiles once per stage, saves the
resolved schedule with its checkpoints, and a run resumed inside a stage or exactly at a boundary continues as the
uninterrupted run did, bit for bit.

The runs use `stages`, a four-stage recipe of nine short steps (tests/experiments/stages_recipe_main.py: the real
entry point with that recipe added), on a cut-down tiny model (2 layers, 1,024-row vocabulary) and synthetic
data, so that the four compiles stay short. The bad-input tests run `python -m experiments.pretrain` itself.
"""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from deepseek_v4 import recipes
from deepseek_v4.metrics import read_metrics
from tests.conftest import CODEGEN_FLAGS, COMPILATION_CACHE
from tests.experiments.stages_recipe_main import STAGES

pytestmark = pytest.mark.slow  # 4 train-step compiles plus two resumed runs: about a minute on 2 cores

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = [f"--recipe={STAGES.name}", "--config=tiny", "--vocab_size=1024", "--num_hidden_layers=2",
         "--compress_ratios=4,16,0", "--num_hash_layers=1", "--data=synthetic", "--eval_every=0", "--save_every=2",
         "--keep_checkpoints=20", "--log_every=1", "--progress=false", "--peak_flops=1e12", "--notensorboard",
         "--noplot", f"--compilation_cache={COMPILATION_CACHE}"]
SCHEDULE = recipes.resolve(STAGES)
INSIDE = 6  # a checkpoint inside stage "64" (steps 5-8)
BOUNDARY = 2  # the last step of the ramp: its data state belongs to the ramp, the next step to stage "32"


def _run(workdir):
    env = {**os.environ, "XLA_FLAGS": CODEGEN_FLAGS, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "tests.experiments.stages_recipe_main", *FLAGS, f"--workdir={workdir}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, f"STDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p.stdout


def _resume_from(reference, workdir, step):
    os.makedirs(os.path.join(workdir, "checkpoints"))
    shutil.copytree(os.path.join(reference, "checkpoints", str(step)), os.path.join(workdir, "checkpoints", str(step)))
    return _run(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    ref = str(root / "uninterrupted")
    out = _run(ref)
    with ThreadPoolExecutor(2) as pool:
        inside = pool.submit(_resume_from, ref, str(root / "inside"), INSIDE)
        boundary = pool.submit(_resume_from, ref, str(root / "boundary"), BOUNDARY)
        resumed = {"inside": (str(root / "inside"), inside.result()),
                   "boundary": (str(root / "boundary"), boundary.result())}
    return {"ref": (ref, out), **resumed}


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}


def test_every_stage_runs_with_its_shapes_and_attention(runs):
    workdir, out = runs["ref"]
    assert f"recipe {STAGES.name} (preset tiny)" in out and f"--config=tiny (recipe {STAGES.preset})" in out
    crossings = [line for line in out.splitlines() if ": stage '" in line]
    assert len(crossings) == len(SCHEDULE.stages) - 1
    recs = {r["step"]: r for r in read_metrics(workdir)}
    assert max(recs) == SCHEDULE.steps
    for st in SCHEDULE.stages:
        rec = recs[st.end_step]  # the record of the stage's last step
        assert rec["tokens_seen"] == st.end_token
        assert rec["sparse_attention"] == (st.attention == "sparse")
    first, last = recs[1]["loss"], recs[SCHEDULE.steps]["loss"]
    assert last < first


def test_the_schedule_is_saved_with_the_checkpoint(runs):
    workdir, _ = runs["ref"]
    step_dir = os.path.join(workdir, "checkpoints", str(SCHEDULE.steps), "meta")
    files = [os.path.join(step_dir, f) for f in os.listdir(step_dir)]
    meta = json.load(open(next(f for f in files if os.path.isfile(f))))
    assert meta["recipe"]["recipe"] == STAGES.name and meta["recipe"]["settings"]["steps"] == SCHEDULE.steps
    assert [s["seq_len"] for s in meta["recipe"]["stages"]] == [s.seq_len for s in SCHEDULE.stages]


@pytest.mark.parametrize("where, step", [("inside", INSIDE), ("boundary", BOUNDARY)])
def test_a_resumed_run_continues_in_the_right_stage(runs, where, step):
    ref = _losses(runs["ref"][0])
    workdir, out = runs[where]
    assert f"resuming from step {step}" in out
    got = _losses(workdir)
    assert sorted(got) == list(range(step + 1, SCHEDULE.steps + 1))
    assert [got[k] for k in sorted(got)] == [ref[k] for k in sorted(got)]


@pytest.mark.parametrize("argv, message", [
    (["--config=flash"], "error: --config=flash needs --recipe=flash, or explicit --steps and --learning_rate "
                         "(missing: --steps, --learning_rate)"),
    (["--recipe=huge"], "error: unknown recipe 'huge'; choose one of nano, flash, pro"),
    (["--recipe=nano", "--seq_len=64"], "error: --seq_len=64 contradicts --recipe=nano"),
    (["--recipe=flash"], "error: stage 'ramp 1/4': the memory plan needs "),  # refused before anything allocates
])
def test_bad_input_is_one_line_before_any_compile(tmp_path, argv, message):
    env = {**os.environ, "XLA_FLAGS": CODEGEN_FLAGS, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "experiments.pretrain", *argv, f"--workdir={tmp_path}"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), p.stderr
