"""Start a post-training run from trained weights: a run directory's newest checkpoint or an exported HF directory.

    cfg = init_config(init=..., hf_dir=..., preset="nano", overrides={})
    run = run_lib.setup(cfg, ..., initial_state=weights_loader(init=..., hf_dir=..., seed=...))

The new run keeps the parameters and the model's other variables (router balancing biases, hash tables) and starts
a fresh optimizer, step 0 and the new run's seed; its own checkpoints then live in its own --workdir (a resumed
post-training run restores those and never reads the source again). A source checkpoint written with another
optimizer is read with that optimizer's layout (from the settings saved with it) and its optimizer state dropped.
Reading the source follows the checkpointer's rules: an unreadable newest checkpoint there is moved aside and the
previous one is used.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from deepseek_v4 import DeepseekV4, export, train
from deepseek_v4 import checkpoint as ckpt_lib
from deepseek_v4.config import Config


def _checkpointer(init: str) -> ckpt_lib.Checkpointer:
    directory = os.path.join(os.path.abspath(os.path.expanduser(init)), "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"--init={init} has no checkpoints/ directory (give a run directory of experiments.pretrain)")
    ckpt = ckpt_lib.Checkpointer(directory, read_only=True)
    if ckpt.latest_step() is None:
        ckpt.close()
        raise ValueError(f"--init={init} holds no checkpoint")
    return ckpt


def init_config(*, init: str | None, hf_dir: str | None, preset: str, overrides: dict[str, Any]) -> Config:
    """The model config of the source (`overrides`, e.g. execution fields, applied), or `preset` with `overrides`
    when there is no source.

    Raises:
      ValueError: both sources given, a missing directory or checkpoint, an unreadable config (one line).
    """
    if init and hf_dir:
        raise ValueError("give --init or --hf_dir, not both")
    if init:
        ckpt = _checkpointer(init)
        try:
            saved = ckpt.saved_config(ckpt.latest_step())
        finally:
            ckpt.close()
        return Config.from_dict(saved).replace(**overrides) if overrides else Config.from_dict(saved)
    if hf_dir:
        from tools.import_safetensors import read_config

        if not os.path.isdir(hf_dir):
            raise ValueError(f"--hf_dir={hf_dir} is not a directory")
        return read_config(hf_dir, preset, **overrides)
    from deepseek_v4.config import get_config

    return get_config(preset, **overrides)


def _source_settings(meta: dict[str, Any]) -> train.TrainSettings:
    """The settings the source checkpoint was written with (only its optimizer's layout matters here)."""
    known = {f.name for f in dataclasses.fields(train.TrainSettings)}
    saved = {k: v for k, v in (meta.get("settings") or {}).items() if k in known}
    try:
        return train.TrainSettings(**saved)
    except (TypeError, ValueError):
        return train.TrainSettings(optimizer=saved.get("optimizer", "muon"))


def _fresh_state(plan: train.StatePlan, params: Any, extras: Any, seed: int) -> train.TrainState:
    """A step-0 train state on `params` / `extras` with a new optimizer state, laid out by `plan`."""
    return jax.jit(lambda p, e: train.init_state(nnx.merge(plan.graphdef, p, e), plan.tx, seed)[1],
                   out_shardings=plan.shardings)(params, extras)


def _mesh_of(plan: train.StatePlan) -> jax.sharding.Mesh:
    return jax.tree.leaves(plan.shardings)[0].mesh


def load_from_run(plan: train.StatePlan, init: str, cfg: Config, optimizer: str, seed: int) -> train.TrainState:
    """The newest good checkpoint of the run directory `init`, as a fresh state of `plan` (whose optimizer is
    `optimizer`); call under the mesh."""
    ckpt = _checkpointer(init)
    try:
        source = _source_settings(ckpt.saved_meta(ckpt.latest_step()))
        if source.optimizer == optimizer:
            target = plan.target
        else:  # another optimizer: its state has another layout; read it as written, then drop it
            def build():
                return DeepseekV4(cfg, rngs=nnx.Rngs(seed))

            target = train.plan_state(build, source, _mesh_of(plan)).target
        restored = ckpt.restore(target, config=cfg)
    finally:
        ckpt.close()
    if restored is None:
        raise ValueError(f"--init={init} holds no checkpoint")
    return _fresh_state(plan, restored.state.params, restored.state.extras, seed)


def load_from_hf(plan: train.StatePlan, hf_dir: str, cfg: Config, seed: int) -> train.TrainState:
    """The safetensors of `hf_dir` (bf16, fp8 or fp4, as `tools.export_safetensors` writes) as a fresh state."""
    files = export.SafetensorsDir(hf_dir)
    tensors = export.plan(cfg)
    export.check_files(files, tensors)
    params = export.load_variables(files, tensors, plan.abstract.params, plan.shardings.params)
    extras = export.load_variables(files, tensors, plan.abstract.extras, plan.shardings.extras)
    return _fresh_state(plan, params, extras, seed)


def weights_loader(*, init: str | None, hf_dir: str | None, cfg: Config, settings: train.TrainSettings,
                   seed: int) -> Callable[[train.StatePlan], train.TrainState] | None:
    """`run_lib.setup`'s `initial_state` for the given source (None: a new model)."""
    if init:
        return lambda plan: load_from_run(plan, init, cfg, settings.optimizer, seed)
    if hf_dir:
        return lambda plan: load_from_hf(plan, hf_dir, cfg, seed)
    return None
