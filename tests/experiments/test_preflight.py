"""Checks before a run allocates or compiles: pod presets need a recipe or explicit steps and LR; the memory plan
of every stage against the devices' memory (refusal in one line, automatic gradient accumulation)."""

import jax
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, memory, recipes, train
from experiments import preflight
from experiments.run import RunSettings
from sharding import mesh as mesh_lib


@pytest.mark.parametrize("preset, given, missing", [("flash", set(), "--steps, --learning_rate"),
                                                    ("pro", {"steps"}, "--learning_rate")])
def test_pod_presets_refuse_laptop_defaults(preset, given, missing):
    with pytest.raises(ValueError, match=f"--config={preset} needs --recipe={preset}, or explicit --steps and "
                                         f"--learning_rate \\(missing: {missing}\\)"):
        preflight.require_pod_settings(preset, None, given)
    preflight.require_pod_settings(preset, preset, set())  # a recipe sets both
    preflight.require_pod_settings(preset, None, {"steps", "learning_rate"})
    preflight.require_pod_settings("nano", None, set())


@pytest.fixture(scope="module")
def tiny_plan():
    cfg = get_config("tiny")
    mesh = mesh_lib.make_mesh("fsdp=8")
    s = train.TrainSettings()
    with jax.set_mesh(mesh):
        plan = train.plan_state(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)), s, mesh)
    return cfg, s, mesh, plan


def _fake_memory(monkeypatch, gb):
    monkeypatch.setattr(memory, "device_memory", lambda device: (gb * 1e9, "test device"))


def test_a_run_that_does_not_fit_is_refused_in_one_line(tiny_plan, monkeypatch):
    cfg, s, mesh, plan = tiny_plan
    planned = memory.plan(cfg, dict(mesh.shape), 8, 64, optimizer=s.optimizer, loss_chunk=s.loss_chunk,
                          loss_impl=s.loss_impl).total
    _fake_memory(monkeypatch, 0.6 * planned / 1e9)
    with pytest.raises(ValueError) as e:
        preflight.check_memory(cfg, s, RunSettings(batch_size=8, seq_len=64), mesh, plan, None)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"the memory plan needs {planned / 1e9:,.1f} GB per device (mesh fsdp=8, 8 x 64 tokens")
    assert "but a device holds " in msg and "(test device; 90% usable)" in msg
    # what would fit: another mesh of these devices (more microbatches), or more devices
    assert "it fits on these 8 devices with --mesh=" in msg or " such devices with --mesh=" in msg


def test_each_stage_gets_the_fewest_microbatches_that_fit(tiny_plan, monkeypatch):
    cfg, s, mesh, plan = tiny_plan
    stages = (recipes.Stage("short", 8 * 64 * 4, 64, 16 * 64, "dense", ""),
              recipes.Stage("long", 8 * 64 * 8, 256, 16 * 256, "sparse", ""))
    schedule = recipes.resolve(recipes.Recipe("t", "tiny", 1e-3, 0.1, 1, 64, 0.3, 0.1, 1e-3, 1e-4, stages, {}))
    kwargs = dict(optimizer=s.optimizer, loss_chunk=s.loss_chunk, loss_impl=s.loss_impl)
    sizes = dict(mesh.shape)
    one_row = memory.plan(cfg, sizes, 8, 256, **kwargs).total  # 8 x 256 fits, 16 x 256 does not
    assert memory.plan(cfg, sizes, 16, 256, **kwargs).total > one_row
    _fake_memory(monkeypatch, one_row / memory.USABLE / 1e9)
    got, unfit = preflight.check_memory(cfg, s, RunSettings(), mesh, plan, schedule)
    assert [st.grad_accum for st in got.stages] == [1, 2] and unfit == {}
    fixed = recipes.resolve(recipes.Recipe("t", "tiny", 1e-3, 0.1, 1, 64, 0.3, 0.1, 1e-3, 1e-4, stages, {}),
                            {"grad_accum": 1})
    _, unfit = preflight.check_memory(cfg, s, RunSettings(), mesh, plan, fixed)  # refused when the run gets there
    assert list(unfit) == [1] and unfit[1].startswith("stage 'long': the memory plan needs")
