"""Trained weights from a run directory's newest checkpoint or an exported HF directory, for every consumer.

As a model on the default device (inference, evaluation, distillation teachers):

    model, source = load_model(init="runs/nano", preset="nano")       # or hf_dir="export/nano"

As the fresh train state of a new run (post-training; tools.import_safetensors):

    cfg = init_config(init=..., hf_dir=..., preset="nano", overrides={})
    run = run_lib.setup(cfg, ..., initial_state=weights_loader(init=..., hf_dir=..., seed=...))

A new run keeps the parameters and the model's other variables (router balancing biases, hash tables) and starts
a fresh optimizer, step 0 and the new run's seed; its own checkpoints then live in its own --workdir (a resumed
post-training run restores those and never reads the source again). A source checkpoint written with another
optimizer is read with that optimizer's layout (from the settings saved with it) and its optimizer state dropped.
Reading the source follows the checkpointer's rules: an unreadable newest checkpoint there is moved aside and the
previous one is used. A model read with `load_checkpoint` is only read: nothing is written into the directory (a
bad checkpoint is an error, not moved aside).

An export's config.json carries the architecture; the Config fields it cannot carry (compute dtype, remat policy,
MoE implementation, ...) come from a preset (`read_config`). Safetensors are read in any of the formats
`tools.export_safetensors` writes (bf16; fp8 with `.scale` siblings; fp4 experts as packed int8 + scales), every
name and shape checked against the config first (`read_hf_variables`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from deepseek_v4 import DeepseekV4, export, interop, params, safetensors_files, train
from deepseek_v4 import checkpoint as ckpt_lib
from deepseek_v4.config import PRESETS, Config


# ---- configs ------------------------------------------------------------------------------------------------


def fields_not_in_hf_config(preset: str) -> dict[str, Any]:
    """The fields of a preset that a config.json cannot carry (lost in a `config_to_hf` / `config_from_hf` trip)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown config preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset].to_dict()
    trip = interop.config_from_hf(interop.config_to_hf(PRESETS[preset])).to_dict()
    return {k: v for k, v in base.items() if trip[k] != v}


def read_config(hf_dir: str, preset: str = "nano", **overrides: Any) -> Config:
    """Our Config from `<hf_dir>/config.json`; fields it cannot carry come from `preset`, `overrides` win.

    Raises:
      ValueError: no such file, not JSON, a missing field, an unknown preset or an invalid value.
    """
    overrides = {**fields_not_in_hf_config(preset), **overrides}
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json in {hf_dir}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return interop.config_from_hf(d, **overrides)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except KeyError as e:
        raise ValueError(f"{path} lacks the field {e}") from None


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


def read_hf_variables(hf_dir: str, cfg: Config, trees: Sequence[tuple[nnx.State, nnx.State]],
                      progress: Callable[[int], None] | None = None) -> list[nnx.State]:
    """The variables of `cfg`'s model from the safetensors of `hf_dir`, one `nnx.State` per (abstract, shardings)
    pair of `trees`, after checking every name and shape of the files against `cfg` (`progress` as in
    `export.load_variables`).

    Raises:
      ValueError: missing or unexpected tensors, or shapes that do not match (one error listing them).
    """
    files = safetensors_files.SafetensorsDir(hf_dir)
    tensors = export.plan(cfg)
    export.check_files(files, tensors)
    return [export.load_variables(files, tensors, abstract, shardings, progress=progress)
            for abstract, shardings in trees]


def load_from_hf(plan: train.StatePlan, hf_dir: str, cfg: Config, seed: int,
                 progress: Callable[[int], None] | None = None) -> train.TrainState:
    """The safetensors of `hf_dir` (bf16, fp8 or fp4, as `tools.export_safetensors` writes) as a fresh state."""
    params, extras = read_hf_variables(hf_dir, cfg, [(plan.abstract.params, plan.shardings.params),
                                                     (plan.abstract.extras, plan.shardings.extras)], progress)
    return _fresh_state(plan, params, extras, seed)


def weights_loader(*, init: str | None, hf_dir: str | None, cfg: Config, settings: train.TrainSettings,
                   seed: int) -> Callable[[train.StatePlan], train.TrainState] | None:
    """`run_lib.setup`'s `initial_state` for the given source (None: a new model)."""
    if init:
        return lambda plan: load_from_run(plan, init, cfg, settings.optimizer, seed)
    if hf_dir:
        return lambda plan: load_from_hf(plan, hf_dir, cfg, seed)
    return None


# ---- models for inference, evaluation and teachers ---------------------------------------------------------------


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[DeepseekV4, str]:
    """The model of a run directory's checkpoint (newest or `step`), read without writing anything."""
    if not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is not a directory")
    step, cfg, reader = export.open_checkpoint(workdir, step)
    export.check_state(reader, export.plan(cfg), cfg)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0))))
    loaded = []
    for path, var in nnx.to_flat_state(abstract):
        value = reader.read(params.path_str(path))
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ValueError(f"the checkpoint of step {step} holds NaN or inf in {params.path_str(path)}")
        loaded.append((path, var.replace(jax.numpy.asarray(value, var.value.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded)), f"{workdir} step {step}"


def load_safetensors(hf_dir: str, preset: str = "nano", **overrides: Any) -> tuple[DeepseekV4, str]:
    """The model of a directory of safetensors (an export or the official weights), on the default device."""
    if not os.path.isdir(hf_dir):
        raise ValueError(f"--hf_dir={hf_dir} is not a directory")
    cfg = read_config(hf_dir, preset, **overrides)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
    return nnx.merge(graphdef, read_hf_variables(hf_dir, cfg, [(abstract, shardings)])[0]), hf_dir


def load_model(*, init: str | None = None, hf_dir: str | None = None, preset: str = "nano",
               step: int | None = None) -> tuple[DeepseekV4, str]:
    """(model, a description of its source) of exactly one of `init` (a run directory: its checkpoint of `step`,
    default the newest) and `hf_dir` (an export; the Config fields config.json cannot carry come from `preset`).

    Raises:
      ValueError: both or neither given, or the source cannot be read (one line).
    """
    if (init is None) == (hf_dir is None):
        raise ValueError("give exactly one of --init and --hf_dir")
    if init is not None:
        return load_checkpoint(init, step)
    return load_safetensors(hf_dir, preset)
