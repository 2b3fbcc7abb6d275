"""On-policy distillation end to end: the student's KL to a fixed teacher falls; `python -m experiments.distill`
runs from checkpoints on prompts of a --data file (unusable lines counted), resumes, reports the KL per teacher,
and its workdir exports and re-imports to the same weights; bad teachers, weights and prompt files are one-line
errors.

One model structure for the whole file (`CFG`, tests/experiments/post_training.py's: two tiny layers, the full
vocabulary, which chat prompts need; the in-process test uses it with a 512-token vocabulary). The source
checkpoints are written in-process (no training), as in tests/experiments/test_sft.py.
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

from deepseek_v4 import DeepseekV4, distillation, interop, train
from deepseek_v4.metrics import read_metrics
from sharding import mesh as mesh_lib
from tests.conftest import CODEGEN_FLAGS, COMPILATION_CACHE
from tests.experiments.post_training import CFG, write_untrained_runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--batch_size=2", "--seq_len=64", "--max_new_tokens=8", "--optimizer=adamw", "--schedule=constant",
          "--warmup_steps=0", "--log_every=1", "--progress=false", "--peak_flops=1e12", "--notensorboard", "--noplot",
          f"--compilation_cache={COMPILATION_CACHE}"]
TIMEOUT = 900


def _distill(*args, expect=0):
    env = dict(os.environ, XLA_FLAGS=CODEGEN_FLAGS, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-m", "experiments.distill", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == expect, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p


class _RandomPrompts:
    """Prompts of random token ids (no chat format), for a small-vocabulary model."""

    fingerprint = "random"

    def __init__(self, vocab: int):
        self.vocab = vocab

    def draw(self, n, rng):
        return [rng.integers(2, self.vocab, int(rng.integers(4, 9))).tolist() for _ in range(n)]


@pytest.mark.slow  # compiles a tiny model's train step, prefill, decode and the teacher forward (~40 s of CPU)
def test_student_kl_to_a_fixed_teacher_falls():
    cfg = CFG.replace(vocab_size=512)
    s = train.TrainSettings(optimizer="adamw", learning_rate=2e-3, steps=8, schedule="constant", warmup_steps=0)
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])

    def build():
        return DeepseekV4(cfg, rngs=nnx.Rngs(0))

    losses = []
    with jax.set_mesh(mesh):
        plan = train.plan_state(build, s, mesh)
        _, state = train.create_state(build, plan.tx, 0, plan.shardings, graphdef=plan.graphdef)
        # the teacher: the student's initial weights (copied: the step donates the state) with the head negated and
        # sharpened 4x (a consistent signal: the student has to turn its head around; Adam's noise on the trunk
        # stays small next to it)
        teacher = distillation.Teacher("fixed", nnx.merge(plan.graphdef, *jax.tree.map(jnp.copy, (state.params,
                                                                                                   state.extras))))
        teacher.head = teacher.head * -4.0
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
    """(student run directory, teacher run directory): two untrained `CFG` checkpoints."""
    student, teacher = (str(tmp_path_factory.mktemp(name)) for name in ("student_src", "teacher_src"))
    write_untrained_runs(CFG, 1, student, negated_path=teacher)  # the teacher's weights: the student's negated
    return student, teacher


def _chat(mode: str, user: str, assistant: str = "Answer: 1") -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
                       "mode": mode})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """A --data file: two usable prompts, one too long for --seq_len=64 with --max_new_tokens=8, one bad line."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [_chat("non-think", "What is 2 + 3?"), "not json", _chat("think-high", "Reverse the string abc."),
             _chat("non-think", "count " * 80), ""]
    path.write_text("\n".join(lines))
    return str(path)


@pytest.mark.slow  # two distillation runs (one train-step compile each), an export (~1 min of CPU)
def test_distill_runs_resumes_and_exports_to_the_same_weights(sources, prompts_file, tmp_path):
    from experiments.init_weights import load_checkpoint, load_safetensors
    from tools.export_safetensors import export_run

    student, teacher = sources
    workdir = str(tmp_path / "distilled")
    args = [f"--init={student}", f"--teachers={teacher},{teacher}", "--weights=0.75,0.25", f"--workdir={workdir}",
            f"--data={prompts_file}", *COMMON]
    first = _distill(*args, "--steps=1")
    assert "starting from the given weights" in first.stdout and "teacher 1:" in first.stdout
    assert (f"prompts: 2 from {prompts_file}; skipped 2 example(s)" in first.stdout
            and "prompt too long" in first.stdout and "not a JSON object" in first.stdout), first.stdout
    second = _distill(*args, "--steps=2")
    assert "resuming from step 1" in second.stdout and "done at step 2" in second.stdout
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # the same teacher twice: the weighted sum of equal KLs
        assert np.isfinite(r["loss"]) and r["kl_teacher_0"] > 0 and r["nonpad_fraction"] > 0
        np.testing.assert_allclose(r["kl_teacher_1"], r["kl_teacher_0"], rtol=1e-5)
        np.testing.assert_allclose(r["loss"], r["kl_teacher_0"], rtol=1e-5)

    out = str(tmp_path / "export")
    export_run(workdir, out, "bf16", progress=False)
    trained, _ = load_checkpoint(workdir)
    exported, _ = load_safetensors(out, "tiny")
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


def test_prompt_files_count_unusable_lines_and_refuse_nothing_usable(prompts_file, tmp_path):
    from experiments.distill import DistillSettings, prompt_source

    prompts = prompt_source(DistillSettings(teachers="t", data=prompts_file, max_new_tokens=8), seq_len=64)
    assert len(prompts.prompts) == 2 and prompts.skipped.total == 2
    assert set(prompts.skipped.counts) == {"not a JSON object", "prompt too long for --seq_len and --max_new_tokens"}
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "bad.jsonl"
    empty.write_text("\n")
    bad.write_text("not json\n" + _chat("non-think", "count " * 80) + "\n")
    for data, message in [(str(tmp_path / "missing.jsonl"), "cannot read chat data"),
                          (str(empty), "holds no conversation"), (str(bad), "no usable prompt: skipped 2 example")]:
        with pytest.raises(ValueError, match=message) as e:
            prompt_source(DistillSettings(teachers="t", data=data, max_new_tokens=8), seq_len=64)
        assert "\n" not in str(e.value)


def test_teacher_tasks_route_task_prompts_and_bad_ones_are_one_line_errors(prompts_file):
    from experiments.distill import DistillSettings

    d = DistillSettings(teachers="a,b", tasks="next_letter,larger", teacher_tasks="larger,next_letter")
    assert d.routing == ("larger", "next_letter") and DistillSettings(teachers="a,b").routing is None
    for kw, message in [({"teacher_tasks": "larger"}, "--teacher_tasks has 1 task\\(s\\) for 2 teacher"),
                        ({"teacher_tasks": "larger,poetry"}, "unknown task 'poetry'"),
                        ({"teacher_tasks": "larger,string"}, "'string', which is not in --tasks"),
                        ({"teacher_tasks": "next_letter,larger", "data": prompts_file}, "cannot be used with --data")]:
        with pytest.raises(ValueError, match=message) as e:
            DistillSettings(teachers="a,b", tasks="next_letter,larger", **kw)
        assert "\n" not in str(e.value)
