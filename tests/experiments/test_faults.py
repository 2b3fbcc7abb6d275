"""Fault tolerance, loss spikes and held-out evaluation of the real entry point (`python -m experiments.pretrain`),
each run in a subprocess.

All runs use a cut-down tiny model (1,024-row vocabulary; a hash-routed CSA layer, a learned-routed HCA layer and
the sliding-window MTP layer) with the default optimizer (Muon + AdamW) on synthetic data (2 x 32 tokens per
step), one CPU device, a constant LR (so --steps does not change the trajectory) and the repository's persistent
compilation cache. One uninterrupted run is the reference every resumed run must match bit for bit; it doubles as
the train-step smoke test (the loss falls) and as the spike runs' reference losses (no spike detection, no
evaluation).

Spikes are injected through the data: --debug_spike_at_batches multiplies one batch's loss weights by 1000, so its
cross entropy is 1000x the running mean. Runs:
  skip      --spike_response=skip, spike in batch 7, --log_every=4, --eval_every=3: the spike step is found one
            step late (the host never waits for the device) and dropped; evaluations at 3, 6, 9, 12.
  rollback  --spike_response=rollback, spike in batch 8, checkpoints every 3 steps: back to step 6, batches 7-8
            skipped, steps 7-12 taken on batches 9-14.
Then `tools.evaluate` scores the reference run's final checkpoint on the same held-out rows as the skip run.

The runs start together in one module fixture, two at a time (each is mostly single-threaded tracing); the
tests then check their outcomes. Those runs (thirteen processes, a few CPU-minutes) are in the slow tier; the fast
tier keeps the bad-flag checks of the command line, and tests/deepseek_v4/test_checkpoint.py covers saving,
restoring and falling back past a damaged checkpoint in-process (tests/experiments/test_spike_guard.py the spike
guard's bookkeeping).
"""

import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from deepseek_v4.metrics import read_metrics
from tests.conftest import CODEGEN_FLAGS, COMPILATION_CACHE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--config=tiny", "--vocab_size=1024", "--num_hidden_layers=2", "--compress_ratios=4,16,0",
        "--num_hash_layers=1", "--data=synthetic", "--batch_size=2", "--seq_len=32", "--schedule=constant",
        "--warmup_steps=2", "--learning_rate=1e-2", "--log_every=1", "--keep_checkpoints=3", "--progress=false",
        "--peak_flops=1e12", "--notensorboard", "--noplot", "--eval_every=0",
        f"--compilation_cache={COMPILATION_CACHE}"]
TOTAL = 12
TIMEOUT = 900
SPIKES = ["--spike_min_history=3", "--spike_factor=3"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = CODEGEN_FLAGS  # one CPU device (the test session itself fakes 8)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "experiments.pretrain", *BASE, f"--workdir={workdir}", *extra]


def run(workdir, *extra, expect=0):
    p = subprocess.run(_cmd(workdir, *extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    if expect is not None and p.returncode != expect:
        raise AssertionError(f"exit {p.returncode} (wanted {expect})\nSTDOUT:\n{p.stdout[-3000:]}\n"
                             f"STDERR:\n{p.stderr[-3000:]}")
    return p


class Background:
    """A run in the background; its output goes to files (a pipe nobody reads would block it)."""

    def __init__(self, workdir, *extra):
        self.out_path, self.err_path = f"{workdir}.stdout", f"{workdir}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(_cmd(workdir, *extra), cwd=REPO, env=_env(), stdout=out, stderr=err)

    def wait_for(self, predicate):
        t0 = time.time()
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"process ended early ({self.proc.returncode})\n{self.output()[1][-3000:]}")
            if time.time() - t0 > TIMEOUT:
                self.proc.kill()
                raise AssertionError("timed out")
            time.sleep(0.05)

    def stop(self, sig):
        self.proc.send_signal(sig)
        self.proc.wait(timeout=TIMEOUT)
        return self.proc.returncode

    def output(self):
        with open(self.out_path) as out, open(self.err_path) as err:
            return out.read(), err.read()


def losses(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return {r["step"]: r["loss"] for r in read_metrics(str(path))} if os.path.exists(path) else {}


def complete_steps(workdir):
    """Checkpoint steps on disk that Orbax finished (a step directory only gets its name when committed)."""
    ckpt = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _damage(step_dir, how):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        if how == "truncate":
            f.truncate(os.path.getsize(biggest) // 2)
        else:
            f.seek(os.path.getsize(biggest) // 2)
            f.write(os.urandom(256))


# ---- the jobs --------------------------------------------------------------------------------------------


def _exact_resume(root, first):
    d = _copy(first, root / "resume")
    return d, run(d, f"--steps={TOTAL}", "--save_every=2")


def _corrupt(root, first):
    d = _copy(first, root / "corrupt")
    _damage(os.path.join(d, "checkpoints", "4"), "truncate")
    _damage(os.path.join(d, "checkpoints", "3"), "garbage")
    return d, run(d, f"--steps={TOTAL}", "--save_every=2")


def _lifecycle(root):
    """One workdir through SIGKILL at a random moment (a save is in flight most of the time), then SIGTERM, then
    SIGINT, each followed by a resume of the same command."""
    d = root / "lifecycle"
    bg = Background(d, "--steps=1000", "--save_every=1")
    bg.wait_for(lambda: len(complete_steps(d)) >= 1)
    time.sleep(random.uniform(0.0, 1.5))
    bg.stop(signal.SIGKILL)
    events = [("SIGKILL", None, None, "", "", complete_steps(d))]
    for sig in (signal.SIGTERM, signal.SIGINT):
        before = complete_steps(d)[-1]
        bg = Background(d, "--steps=1000", "--save_every=1000")
        bg.wait_for(lambda: bg.output()[0].partition("resuming from step")[2].count("\nstep ") >= 1)  # took a step
        rc = bg.stop(sig)
        events.append((signal.Signals(sig).name, before, rc, *bg.output(), complete_steps(d)))
    return d, events


BAD_FLAGS = [
    ("--batch_size=0", "--batch_size must be >= 1"),
    ("--learning_rate=-1", "learning_rate must be a positive number"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    pool = ThreadPoolExecutor(max_workers=2)
    jobs = {}

    def submit(name, fn, *args, after=None, **kwargs):
        """Start `fn(*args, **kwargs)` once the job `after` has finished. The reference run goes first and alone:
        with a cold compilation cache it compiles the state creation and the plain train step, which the other
        runs then read from the cache; the spike runs and the NaN run each compile their own step program."""
        def job():
            if after is not None:
                jobs[after].result()
            return fn(*args, **kwargs)

        jobs[name] = pool.submit(job)

    submit("reference", run, root / "reference", f"--steps={TOTAL}", "--save_every=100", "--tensorboard", "--plot")
    submit("nan", run, root / "nan", f"--steps={TOTAL}", "--save_every=1", "--debug_nan_at_steps=2,4,5",
           "--max_bad_steps=2", expect=1, after="reference")
    # Checkpoints at 2, 3 and 4 (--keep_checkpoints=3); the jobs that resume it work on copies.
    submit("first", run, root / "first", "--steps=4", "--save_every=1", after="reference")
    submit("skip", run, root / "skip", f"--steps={TOTAL}", "--save_every=100", "--log_every=4", "--eval_every=3",
           "--spike_response=skip", "--debug_spike_at_batches=7", *SPIKES, after="reference")
    submit("lifecycle", _lifecycle, root, after="reference")
    first = root / "first"
    submit("resume", _exact_resume, root, first, after="first")
    submit("corrupt", _corrupt, root, first, after="first")
    submit("mismatch", lambda: run(_copy(first, root / "mismatch"), "--hidden_size=32", "--sliding_window=8",
                                   expect=2), after="first")
    submit("rollback", run, root / "rollback", f"--steps={TOTAL}", "--save_every=3", "--spike_response=rollback",
           "--debug_spike_at_batches=8", *SPIKES, after="skip")  # the spike step program: compiled by then
    yield {"root": root, **jobs}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def reference(runs):
    runs["reference"].result()
    got = losses(runs["root"] / "reference")
    assert sorted(got) == list(range(1, TOTAL + 1))
    return got


# ---- the tests -------------------------------------------------------------------------------------------


@pytest.mark.slow  # the module's runs
def test_reference_run_learns(runs, reference):
    assert all(np.isfinite(v) for v in reference.values())
    assert glob.glob(os.path.join(runs["root"], "reference", "tensorboard", "events.out.tfevents.*"))
    first = np.mean([reference[s] for s in (1, 2, 3)])
    last = np.mean([reference[s] for s in (TOTAL - 2, TOTAL - 1, TOTAL)])
    assert last < first - 0.05, (first, last)


@pytest.mark.slow  # the module's runs
def test_the_run_draws_its_curves(runs):
    p = runs["reference"].result()
    png = runs["root"] / "reference" / "metrics.png"
    assert f"curves: {png}" in p.stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 20_000  # several panels of curves, not an empty canvas


@pytest.mark.slow  # the module's runs
def test_first_run_keeps_three_checkpoints(runs):
    p = runs["first"].result()
    assert "starting from scratch" in p.stdout
    assert complete_steps(runs["root"] / "first") == [2, 3, 4]


@pytest.mark.slow  # the module's runs
def test_exact_resume_matches_an_uninterrupted_run(runs, reference):
    d, p = runs["resume"].result()
    assert "resuming from step 4" in p.stdout
    got = losses(d)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        assert got[step] == reference[step], (step, got[step], reference[step])  # bit-identical


@pytest.mark.slow  # the module's runs
def test_corrupt_and_truncated_checkpoints_fall_back(runs, reference):
    d, p = runs["corrupt"].result()
    assert "checkpoint step 4 is unusable" in p.stderr and "checkpoint step 3 is unusable" in p.stderr
    assert "resuming from step 2" in p.stdout
    assert glob.glob(os.path.join(d, "checkpoints", "4.corrupt-*"))  # moved aside, not deleted
    assert glob.glob(os.path.join(d, "checkpoints", "3.corrupt-*"))
    got = losses(d)
    for step in range(1, TOTAL + 1):
        assert got[step] == reference[step], (step, got[step], reference[step])


@pytest.mark.slow  # the module's runs
def test_kill_9_sigterm_sigint_then_resume(runs, reference):
    d, events = runs["lifecycle"].result()
    killed_at = events[0][-1]
    assert killed_at, "no complete checkpoint before the kill"
    for name, before, rc, stdout, stderr, on_disk in events[1:]:
        assert rc == 0, (name, stdout[-2000:], stderr[-2000:])
        assert f"resuming from step {before}" in stdout  # the newest complete checkpoint, every time
        assert f"stopped by {name} at step" in stdout  # finished its step, saved, exited 0
        stopped_at = int(stdout.split(f"stopped by {name} at step ")[1].split(";")[0])
        assert on_disk[-1] == stopped_at  # saved exactly where it stopped
    assert events[1][1] == killed_at[-1]
    assert not glob.glob(os.path.join(d, "checkpoints", "*tmp*"))  # the half-written save was cleaned up
    got = losses(d)
    assert max(got) == events[-1][-1][-1]
    for step in range(1, min(max(got), TOTAL) + 1):  # three interruptions, one trajectory
        assert got[step] == reference[step], (step, got[step], reference[step])


@pytest.mark.slow  # the module's runs
def test_nan_steps_are_skipped_then_the_run_stops(runs):
    p = runs["nan"].result()
    d = runs["root"] / "nan"
    err_lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "2 consecutive steps had a non-finite loss or gradients" in err_lines[0]
    assert "step 2: non-finite loss or gradients, update skipped (1 in a row)" in p.stderr
    records = {r["step"]: r for r in read_metrics(str(d))}
    assert records[2]["loss"] is None and records[2]["total_loss"] is None and records[2]["skipped_steps"] == 1
    assert records[3]["loss"] is not None and records[3]["skipped_steps"] == 1
    assert complete_steps(d)[-1] == 4  # step 4 (skipped, state still finite) saved; the stop at 5 does not save
    mgr = ocp.CheckpointManager(os.path.join(d, "checkpoints"))
    for step in complete_steps(d):  # every checkpoint on disk holds finite values only
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert all(np.all(np.isfinite(x)) for x in leaves if np.issubdtype(x.dtype, np.floating))
    mgr.close()


@pytest.mark.slow  # the module's runs
def test_different_architecture_is_a_one_line_error(runs):
    p = runs["mismatch"].result()
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert p.stderr == lines[0] + "\n" and "Traceback" not in p.stderr  # nothing after it: Orbax closed in time
    assert "hidden_size (checkpoint 64, now 32)" in lines[0] and "sliding_window (checkpoint 16, now 8)" in lines[0]
    assert "vocab_size" not in lines[0]


@pytest.mark.parametrize("i", range(len(BAD_FLAGS)))
def test_bad_flag_values_are_one_line_errors(tmp_path, i):
    p = run(tmp_path / f"bad{i}", BAD_FLAGS[i][0], expect=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and BAD_FLAGS[i][1] in lines[0], p.stderr
    assert not os.path.exists(tmp_path / f"bad{i}")  # failed before touching anything


# ---- loss spikes and held-out evaluation ---------------------------------------------------------------------


def _records(d):
    return {r["step"]: r for r in read_metrics(str(d))}


@pytest.mark.slow  # the module's runs
def test_skip_drops_the_spike_step_and_evaluation_leaves_the_data_alone(runs):
    root, out = runs["root"], runs["skip"].result()
    runs["reference"].result()
    assert "step 7: loss spike (" in out.stderr and "update skipped (1 so far)" in out.stderr
    assert "non-finite" not in out.stderr
    plain, skip = _records(root / "reference"), _records(root / "skip")
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


@pytest.mark.slow  # the module's runs
def test_rollback_returns_to_the_checkpoint_and_skips_the_data_window(runs):
    root, err = runs["root"], runs["rollback"].result().stderr
    runs["reference"].result()
    assert "step 8: loss spike (" in err
    assert "step 8: rolled back to step 6, skipping 2 batch(es) of data (1 rollback(s) so far)" in err
    plain, back = _records(root / "reference"), _records(root / "rollback")
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


@pytest.mark.slow  # the module's runs, then two tools.evaluate subprocesses
def test_tools_evaluate_scores_a_checkpoint(runs):
    runs["reference"].result()
    cmd = [sys.executable, "-m", "tools.evaluate", f"--workdir={runs['root'] / 'reference'}", "--data=synthetic",
           "--batch_size=2", "--seq_len=32", "--json", f"--step={TOTAL}"]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["step"] == TOTAL and np.isfinite(rec["eval_loss"]) and "eval_mtp_loss" in rec
    assert rec["eval_tokens"] == 2 * 2 * 32  # --eval_batches default 2, no padding in synthetic rows
    p = subprocess.run(cmd[:-1] + ["--step=5"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2 and p.stderr.startswith("error: no checkpoint step 5") and len(p.stderr.splitlines()) == 1


@pytest.mark.slow  # two entry-point start-ups
def test_bad_spike_and_eval_flags_are_one_line_errors(tmp_path):
    for flag, message in (("--spike_factor=0.5", "--spike_factor must be a number > 1"),
                          ("--eval_batches=0", "--eval_batches must be >= 1")):
        p = subprocess.run([*_cmd(tmp_path / "bad"), flag], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
