"""`python -m experiments.sft`: starts from a pretraining checkpoint, trains on the toy chat set, resumes; bad data.

The source checkpoint is written in-process (tests/experiments/post_training.py's two-layer tiny model with the full
vocabulary, AdamW state, no training) so that only the SFT runs compile a train step (Muon: the source's optimizer
state is dropped).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, train
from deepseek_v4.metrics import read_metrics
from experiments import init_weights
from sharding import mesh as mesh_lib
from tests.conftest import CODEGEN_FLAGS, COMPILATION_CACHE
from tests.experiments.post_training import CFG, write_untrained_runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMON = ["--batch_size=2", "--seq_len=128", "--toy_examples=60", "--schedule=constant", "--warmup_steps=0",
          "--log_every=1", "--progress=false", "--peak_flops=1e12", "--notensorboard", "--noplot",
          f"--compilation_cache={COMPILATION_CACHE}"]
TIMEOUT = 900


def _sft(*args, expect=0):
    env = dict(os.environ, XLA_FLAGS=CODEGEN_FLAGS, JAX_PLATFORMS="cpu")  # one CPU device
    p = subprocess.run([sys.executable, "-m", "experiments.sft", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == expect, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p


def _build():
    return DeepseekV4(CFG, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A run directory holding one checkpoint of CFG written with AdamW; returns (path, its params)."""
    path = str(tmp_path_factory.mktemp("pretrained"))
    return path, write_untrained_runs(CFG, 7, path)


@pytest.mark.slow  # restores into another optimizer's layout: two state compiles (~40 s on 2 cores)
def test_init_keeps_the_weights_and_starts_a_fresh_optimizer(source):
    path, params = source
    cfg = init_weights.init_config(init=path, hf_dir=None, preset="tiny", overrides={})
    assert cfg == CFG
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])
    settings = train.TrainSettings()  # Muon
    with jax.set_mesh(mesh):
        plan = train.plan_state(_build, settings, mesh)
        loader = init_weights.weights_loader(init=path, hf_dir=None, cfg=cfg, settings=settings, seed=3)
        state = loader(plan)
    assert int(state.step) == 0 and int(state.skipped) == 0
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # an export, then one state compile (~30 s on 2 cores)
def test_hf_dir_init_loads_the_exported_weights(source, tmp_path):
    from tools.export_safetensors import export_run

    path, params = source
    out = str(tmp_path / "export")
    export_run(path, out, "bf16", progress=False)
    cfg = init_weights.init_config(init=None, hf_dir=out, preset="tiny", overrides={})
    assert cfg == CFG
    mesh = mesh_lib.make_mesh("data=1", jax.devices()[:1])
    settings = train.TrainSettings()
    with jax.set_mesh(mesh):
        plan = train.plan_state(_build, settings, mesh)
        state = init_weights.weights_loader(init=None, hf_dir=out, cfg=cfg, settings=settings, seed=0)(plan)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=2**-8, atol=1e-6)  # bf16 storage: one rounding


@pytest.mark.slow  # two SFT runs of one step each (the second compiles from the persistent cache): ~1 min on 2 cores
def test_sft_runs_from_a_checkpoint_and_resumes(source, tmp_path):
    path, _ = source
    workdir = str(tmp_path / "sft")
    first = _sft(f"--init={path}", f"--workdir={workdir}", "--steps=1", *COMMON)
    assert "starting from the given weights" in first.stdout and "chat data: 60 conversations" in first.stdout
    second = _sft(f"--init={path}", f"--workdir={workdir}", "--steps=2", *COMMON)
    assert "resuming from step 1" in second.stdout and "done at step 2" in second.stdout
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) and 0 < r["nonpad_fraction"] < 1 for r in records)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == CFG.to_dict()


def test_bad_sft_input_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "mode": "non-think"}) + "\n{x\n")
    p = _sft(f"--data={bad}", f"--workdir={tmp_path / 'w'}", *COMMON, expect=2)
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no usable chat example: skipped 2 example(s)"), p.stderr
    with pytest.raises(ValueError, match="not both"):
        init_weights.init_config(init="a", hf_dir="b", preset="nano", overrides={})
    with pytest.raises(ValueError, match="no checkpoints/ directory"):
        init_weights.init_config(init=str(tmp_path), hf_dir=None, preset="nano", overrides={})
