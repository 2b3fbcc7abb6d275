"""On-policy distillation end to end: the student's KL to a fixed teacher falls; `python -m experiments.distill`
runs from checkpoints, resumes, reports the KL per teacher, and its workdir exports and re-imports to the same
weights; bad teachers and weights are one-line errors.

The source checkpoints are written in-process (cut-down nano models with the full vocabulary, no training), as in
tests/experiments/test_sft.py.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, distillation, get_config, interop, train
from deepseek_v4 import checkpoint as ckpt_lib
from deepseek_v4.metrics import read_metrics
from sharding import mesh as mesh_lib
from tests.conftest import CODEGEN_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = get_config("nano", num_hidden_layers=2, compress_ratios=(4, 32, 0), num_hash_layers=1)
COMMON = ["--batch_size=2", "--seq_len=64", "--max_new_tokens=8", "--tasks=arithmetic,string", "--optimizer=adamw",
          "--schedule=constant", "--warmup_steps=0", "--log_every=1", "--progress=false", "--peak_flops=1e12",
          "--notensorboard", "--noplot", f"--compilation_cache={os.path.join(REPO, '.jax_cache')}"]
TIMEOUT = 900


def _distill(*args, expect=0):
    env = dict(os.environ, XLA_FLAGS=CODEGEN_FLAGS, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.distill", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == expect, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p


def _write_run(path: str, cfg, seed: int) -> None:
    """A run directory holding one untrained checkpoint of `cfg` (AdamW state)."""
    settings = train.TrainSettings(optimizer="adamw")
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])

    def build():
        return DeepseekV4(cfg, rngs=nnx.Rngs(seed))

    with jax.set_mesh(mesh):
        plan = train.plan_state(build, settings, mesh)
        _, state = train.create_state(build, plan.tx, seed, plan.shardings, graphdef=plan.graphdef)
    ckpt = ckpt_lib.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    ckpt.save(1, state, config=cfg, meta={"settings": settings.to_dict()})
    ckpt.close()


class _RandomPrompts:
    """Prompts of random token ids (no chat format), for a small-vocabulary model."""

    fingerprint = "random"

    def __init__(self, vocab: int):
        self.vocab = vocab

    def draw(self, n, rng):
        return [rng.integers(2, self.vocab, int(rng.integers(4, 9))).tolist() for _ in range(n)]


@pytest.mark.slow  # compiles a tiny model's train step, prefill, decode and the teacher forward (~1-2 min)
def test_student_kl_to_a_fixed_teacher_falls():
    cfg = get_config("tiny", vocab_size=512, num_hidden_layers=2, compress_ratios=(4, 16, 0), num_hash_layers=1)
    s = train.TrainSettings(optimizer="adamw", learning_rate=2e-3, steps=8, schedule="constant", warmup_steps=0)
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])

    def build():
        return DeepseekV4(cfg, rngs=nnx.Rngs(0))

    # the teacher: the student's initial weights with the head negated and sharpened 4x (a consistent signal: the
    # student has to turn its head around; Adam's noise on the trunk stays small next to it)
    teacher = distillation.Teacher("fixed", build())
    teacher.head = teacher.head * -4.0
    losses = []
    with jax.set_mesh(mesh):
        plan = train.plan_state(build, s, mesh)
        _, state = train.create_state(build, plan.tx, 0, plan.shardings, graphdef=plan.graphdef)
        holder = {"state": state}
        rollouts = distillation.RolloutIterator(
            lambda: nnx.merge(plan.graphdef, holder["state"].params, holder["state"].extras), _RandomPrompts(512),
            [teacher], rows=4, seq_len=32, max_new_tokens=12, seed=0)
        step = distillation.make_distill_step(plan.graphdef, cfg, plan.tx, s, phase=train.csa_phase(s, 0),
                                              teacher_heads=[teacher.head], weights=[1.0], vocab_chunk=128)
        for _ in range(s.steps):
            batch = next(rollouts)
            assert batch["loss_weights"].sum() > 0 and batch["teacher_hidden_0"].shape == (4, 32, cfg.hidden_size)
            holder["state"], m = step(holder["state"], jax.tree.map(jnp.asarray, batch))
            assert bool(m["update_ok"])
            losses.append(float(m["loss"]))
    assert rollouts.get_state()["index"] == s.steps
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses  # measured: 0.311 -> 0.220


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(student run directory, teacher run directory): two untrained cut-down nano checkpoints."""
    student, teacher = (str(tmp_path_factory.mktemp(name)) for name in ("student_src", "teacher_src"))
    _write_run(student, CFG, 1)
    _write_run(teacher, CFG, 2)
    return student, teacher


@pytest.mark.slow  # two distillation runs (one train-step compile each), an export (~3-4 min on 2 cores)
def test_distill_runs_resumes_and_exports_to_the_same_weights(sources, tmp_path):
    from experiments.generate import load_checkpoint, load_safetensors
    from tools.export_safetensors import export_run

    student, teacher = sources
    workdir = str(tmp_path / "distilled")
    args = [f"--init={student}", f"--teachers={teacher},{teacher}", "--weights=0.75,0.25", f"--workdir={workdir}",
            *COMMON]
    first = _distill(*args, "--steps=2")
    assert "starting from the given weights" in first.stdout and "teacher 1:" in first.stdout
    second = _distill(*args, "--steps=3")
    assert "resuming from step 2" in second.stdout and "done at step 3" in second.stdout
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # the same teacher twice: the weighted sum of equal KLs
        assert r["kl_teacher_0"] > 0
        np.testing.assert_allclose(r["kl_teacher_1"], r["kl_teacher_0"], rtol=1e-5)
        np.testing.assert_allclose(r["loss"], r["kl_teacher_0"], rtol=1e-5)

    out = str(tmp_path / "export")
    export_run(workdir, out, "bf16", progress=False)
    trained, _ = load_checkpoint(workdir)
    exported, _ = load_safetensors(out, "nano")
    assert exported.cfg == trained.cfg == CFG
    a, b = nnx.to_flat_state(nnx.state(trained)), nnx.to_flat_state(nnx.state(exported))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        x, y = np.asarray(x.value, np.float32), np.asarray(y.value, np.float32)
        np.testing.assert_allclose(y, x, rtol=2**-8, atol=1e-6, err_msg=str(path))  # bf16 storage: one rounding


@pytest.mark.slow  # two entry-point start-ups (~10 s each); the checks themselves are in test_distillation.py
def test_a_teacher_with_another_vocabulary_and_bad_weights_are_one_line_errors(tmp_path):
    other = tmp_path / "other_vocab"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(interop.config_to_hf(CFG.replace(vocab_size=1000))))
    p = _distill(f"--teachers={other}", f"--workdir={tmp_path / 'w'}", *COMMON, expect=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "a vocabulary of 1000 tokens" in lines[0], p.stderr
    p = _distill(f"--teachers={other},{other}", "--weights=1,-1", f"--workdir={tmp_path / 'w'}", *COMMON, expect=2)
    assert p.stderr.strip().splitlines() == ["error: --weights must be finite and >= 0, got 1.0,-1.0"], p.stderr
