"""What a run checks before it allocates or compiles anything.

- A pod preset (flash, pro) never trains with the CPU nano run's defaults: it needs `--recipe`, or `--steps` and
  `--learning_rate` given explicitly.
- The memory plan (`deepseek_v4.memory`) of every recipe stage (or of the one shape of a run without a recipe) is
  compared with the devices' memory. A run whose first step does not fit refuses in one line with the planned bytes
  per device and a mesh or a device count that would fit; a later recipe stage that does not fit is announced at
  the start, and the run saves and stops with that line when it gets there. A stage without an explicit
  `--grad_accum` takes the fewest microbatches that fit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from deepseek_v4 import memory, train
from deepseek_v4.config import Config
from deepseek_v4.recipes import ResolvedStage, Schedule
from sharding import host_data, rules

POD_PRESETS = ("flash", "pro")


def require_pod_settings(preset: str, recipe: str | None, given: set[str]) -> None:
    """Raise a one-line ValueError when a pod preset would run with the defaults of the CPU nano run."""
    if preset not in POD_PRESETS or recipe is not None:
        return
    missing = [f"--{n}" for n in ("steps", "learning_rate") if n not in given]
    if missing:
        raise ValueError(f"--config={preset} needs --recipe={preset}, or explicit --steps and --learning_rate "
                         f"(missing: {', '.join(missing)}); the defaults are those of the CPU nano run")


def stage_opts(opts: Any, stage: ResolvedStage) -> Any:
    """The run settings of a recipe stage: its row length and sequences per step."""
    return dataclasses.replace(opts, seq_len=stage.seq_len, batch_size=stage.batch_size)


def _divisors(n: int) -> list[int]:
    return [a for a in range(1, n + 1) if n % a == 0]


def check_memory(cfg: Config, settings: train.TrainSettings, opts: Any, mesh: jax.sharding.Mesh,
                 plan: train.StatePlan, schedule: Schedule | None) -> tuple[Schedule | None, dict[int, str]]:
    """Compare the memory plan of every stage with the devices' memory.

    Returns:
      The schedule with each stage's gradient accumulation chosen (the fewest microbatches that fit, unless given;
      unchanged for a stage that does not fit), and {stage index: one-line refusal} for the stages that do not fit.

    Raises:
      ValueError: one line: a run without a recipe that does not fit (planned bytes per device, the device's
        memory, and a mesh or device count that would fit), or a stage whose batch cannot be laid out.
    """
    variables = memory.variables_of(plan.abstract.params, plan.abstract.extras)
    hbm, where = memory.device_memory(mesh.devices.flat[0])
    sizes = dict(mesh.shape)
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    kwargs = dict(optimizer=settings.optimizer, loss_chunk=settings.loss_chunk, loss_impl=settings.loss_impl,
                  variables=variables)
    rows = ([(s.name, s.batch_size, s.seq_len, s.grad_accum) for s in schedule.stages] if schedule
            else [(None, opts.batch_size, opts.seq_len, settings.grad_accum)])
    chosen, refusals = [], {}
    groups = host_data.row_group(rules.named_sharding(("batch", "seq"), mesh)).count
    for index, (name, batch, seq_len, accum) in enumerate(rows):
        label = f"stage {name!r}: " if name else ""
        if batch % groups:
            raise ValueError(f"{label}{batch} sequences per step are not divisible by the {groups} row groups of "
                             "processes (processes sharing rows through the context or tensor axis count once)")
        candidates = [accum] if accum else [a for a in _divisors(batch) if (batch // a) % shards == 0]
        candidates = [a for a in candidates if batch % a == 0 and (batch // a) % shards == 0]
        if not candidates:
            raise ValueError(f"{label}{batch} sequences per step cannot be split into microbatches divisible by the "
                             f"{shards} data shards of mesh {memory.fmt_mesh(sizes)}")
        for a in candidates:
            p = memory.plan(cfg, sizes, batch // a, seq_len, **kwargs)
            if p.total <= memory.USABLE * hbm:
                chosen.append(a)
                break
        else:
            refusals[index] = _refusal(cfg, label, p, batch // candidates[-1], seq_len, hbm, where, mesh.size, kwargs)
            if schedule is None:
                raise ValueError(refusals[index])
            chosen.append(accum)
    return (schedule.with_grad_accum(chosen) if schedule else None), refusals


def _refusal(cfg: Config, label: str, p: memory.Plan, micro: int, seq_len: int, hbm: float, where: str,
             devices: int, kwargs: dict[str, Any]) -> str:
    """The one-line refusal: planned bytes, the device's memory, and what would fit."""
    msg = (f"{label}the memory plan needs {p.total / 1e9:,.1f} GB per device (mesh {memory.fmt_mesh(p.sizes)}, "
           f"{micro} x {seq_len} tokens per microbatch) but a device holds {hbm / 1e9:,.1f} GB ({where}; "
           f"{100 * memory.USABLE:.0f}% usable)")
    here = memory.fitting_mesh(cfg, devices, hbm, 1, seq_len, **kwargs) if devices > 1 else None
    if here is not None:
        return msg + f"; it fits on these {devices} devices with --mesh={memory.fmt_mesh(here.sizes)} and " \
                     "one sequence per data shard per microbatch (--grad_accum)"
    chip = memory.Chip("this device", hbm)
    fit = memory.recommend(cfg, chip, seq_len, **kwargs)
    if fit is None:
        return msg + "; no mesh of up to 65536 such devices fits it"
    return msg + (f"; it would fit on {math.prod(fit.sizes.values())} such devices with "
                  f"--mesh={memory.fmt_mesh(fit.sizes)} (python -m tools.plan_run)")
