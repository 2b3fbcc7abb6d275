r"""Evaluate a checkpoint on held-out data: `python -m tools.evaluate --workdir=DIR [--step=N] [--data=DIR]`.

Restores step N (default: the newest) of `<workdir>/checkpoints` (a training run, or weights brought in by
`tools.import_safetensors`) and prints the held-out metrics of `deepseek_v4.evaluation` (loss, MTP loss, bits
per byte, loss by position bucket), the same numbers a run logs at that step when it evaluates the same batches.

  --data         comma-separated directories written by tools.prepare_data; default: the embedded corpus's
                 validation split; `synthetic`: synthetic rows of seed --seed + 1000003 (what a run on
                 --data=synthetic evaluates on)
  --batches, --batch_size, --seq_len   how much held-out data (the run's defaults: 2 x 8 x 128)
  --json         print one JSON object instead of lines
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import jax
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from deepseek_v4 import DeepseekV4, evaluation, train
from deepseek_v4 import checkpoint as ckpt_lib
from deepseek_v4.config import Config
from experiments import held_out
from experiments.run import RunSettings
from sharding import mesh as mesh_lib
from sharding import rules

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_string("workdir", None, "Run directory holding checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("data", "", "Held-out data (see the module docstring).")
    flags.DEFINE_integer("batches", evaluation.EvalSettings.eval_batches, "Held-out batches.", lower_bound=1)
    flags.DEFINE_integer("batch_size", RunSettings.batch_size, "Rows per batch.", lower_bound=1)
    flags.DEFINE_integer("seq_len", RunSettings.seq_len, "Tokens per row.", lower_bound=1)
    flags.DEFINE_integer("seed", RunSettings.seed, "The run's --seed (only for --data=synthetic).")
    flags.DEFINE_string("mesh", RunSettings.mesh, "Device mesh, e.g. fsdp=8 (default: data over all devices).")
    flags.DEFINE_string("data_cache", RunSettings.data_cache, "Where the embedded corpus is prepared.")
    flags.DEFINE_bool("json", False, "Print one JSON object.")
    flags.mark_flag_as_required("workdir")


def evaluate(workdir: str, *, step: int | None = None, data: str = "",
             batches: int = evaluation.EvalSettings.eval_batches, batch_size: int = RunSettings.batch_size,
             seq_len: int = RunSettings.seq_len, seed: int = RunSettings.seed, mesh: str = RunSettings.mesh,
             data_cache: str = RunSettings.data_cache,
             devices: Sequence[jax.Device] | None = None) -> tuple[int, dict[str, float]]:
    """(step, held-out metrics) of a checkpoint of `workdir`, on `mesh` over `devices` (default: all devices).

    Raises:
      ValueError: no checkpoint (or not that step), unreadable settings, data that cannot be read.
    """
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise ValueError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint step {step} in {workdir} (steps: {steps})")
        cfg = Config.from_dict(ckpt.saved_config(step))
        saved = ckpt.saved_meta(step).get("settings", {})
        known = {f.name for f in dataclasses.fields(train.TrainSettings)}
        settings = train.TrainSettings(**{k: v for k, v in saved.items() if k in known})
        device_mesh = mesh_lib.make_mesh(mesh or None, devices)
        with jax.set_mesh(device_mesh):
            plan = train.plan_state(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)), settings, device_mesh)
            state = ckpt.read(plan.target, step).state
            synthetic = data == "synthetic"
            layout = rules.named_sharding(("batch", "seq"), device_mesh, "activation")
            ev = held_out.make_evaluator(
                evaluation.EvalSettings(eval_batches=batches, eval_data="" if synthetic else data),
                graphdef=plan.graphdef, batch_sharding=layout,
                loss_chunk=settings.loss_chunk, train_data="synthetic" if synthetic else "", seq_len=seq_len,
                batch_size=batch_size, seed=seed, vocab_size=cfg.vocab_size, data_cache=data_cache)
            return step, ev(state, sparse=train.sparse_at(settings, max(step - 1, 0)))
    finally:
        ckpt.close()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    try:
        step, rec = evaluate(workdir, step=FLAGS.step, data=FLAGS.data, batches=FLAGS.batches,
                             batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len, seed=FLAGS.seed, mesh=FLAGS.mesh,
                             data_cache=FLAGS.data_cache)
    except (ValueError, ckpt_lib.ConfigMismatchError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.json:
        print(json.dumps({"step": step, **rec}))
        return
    print(f"{workdir} step {step}:")
    for key, value in rec.items():
        print(f"  {key} {value:.6g}" if isinstance(value, float) else f"  {key} {value}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
