"""Teachers of on-policy distillation: frozen models read from run directories or exported safetensors.

    cfg = teacher_config("runs/spec_a", preset="nano")      # cheap: only the config (to check the vocabulary)
    teacher = load_teacher("runs/spec_a", preset="nano")    # a deepseek_v4.distillation.Teacher

A run directory (it holds checkpoints/) gives its newest checkpoint, read without writing anything into it (a bad
checkpoint is an error, not moved aside); an export (config.json and *.safetensors, tools.export_safetensors)
is read in any of its formats, the Config fields config.json cannot carry coming from `preset`.
"""

from __future__ import annotations

import os

from deepseek_v4 import distillation, export
from deepseek_v4.config import Config
from experiments import init_weights


def _is_run(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, "checkpoints"))


def teacher_config(directory: str, preset: str = "nano") -> Config:
    """The model config of a teacher directory. One-line ValueError if it is neither kind."""
    if _is_run(directory):
        return export.open_checkpoint(directory)[1]
    if os.path.isfile(os.path.join(directory, "config.json")):
        return init_weights.read_config(directory, preset)
    raise ValueError(f"teacher {directory} is neither a run directory (checkpoints/) nor an export (config.json)")


def load_teacher(directory: str, preset: str = "nano", *, sparse_attention: bool = True) -> distillation.Teacher:
    """The teacher's weights on the default device, as a `distillation.Teacher` named by its directory."""
    run = _is_run(directory)
    model, _ = init_weights.load_model(init=directory if run else None, hf_dir=None if run else directory,
                                       preset=preset)
    return distillation.Teacher(directory, model, sparse_attention=sparse_attention)
