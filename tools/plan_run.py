"""What a recipe costs on a pod: per stage tokens, steps, sequences per step, the mesh the memory plan picks, step
time at an assumed MFU, wall-clock days, and the checkpoint size.

    python -m tools.plan_run --recipe=flash --chips=1024 --chip=v5p [--mfu=0.4]

The mesh of each stage is the first of `deepseek_v4.memory.meshes_for` (least tensor parallelism, then the most
expert parallelism, the rest FSDP) on which one sequence per data shard and microbatch fits in 90% of the chip's
memory; the rest of the step's sequences become gradient accumulation. A stage with fewer sequences per step than
data shards would need context parallelism (not in this trainer), and says so. Step time = model FLOPs of the
step's tokens (`deepseek_v4.metrics.train_flops_per_token`, sparse or dense attention as the stage says) /
(chips x the chip's bf16 peak x MFU). The checkpoint holds the parameters and the optimizer state
(`deepseek_v4.memory.state_bytes` on one device).
"""

from __future__ import annotations

import sys

from absl import app, flags

from deepseek_v4 import memory, metrics, recipes
from deepseek_v4.config import get_config

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_string("recipe", "flash", f"Recipe ({', '.join(recipes.RECIPES)}).")
    flags.DEFINE_integer("chips", 1024, "Chips of the pod.")
    flags.DEFINE_string("chip", "v5p", f"Chip kind ({', '.join(c.key for c in memory.CHIPS)}).")
    flags.DEFINE_float("mfu", 0.4, "Assumed model FLOPs utilisation.")
    flags.DEFINE_string("optimizer", "muon", "muon or adamw (the optimizer state's size).")


def _tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return str(int(n))


def stage_rows(schedule: recipes.Schedule, cfg, chip: memory.Chip, chips: int, mfu: float, optimizer: str,
               variables) -> list[dict]:
    """One dict per stage: tokens, steps, sequences per step, mesh, GB per chip, accumulation, step seconds, days,
    and a note when the stage cannot run as planned."""
    rows = []
    for s in schedule.stages:
        row = {"stage": s.name, "tokens": s.end_token - s.first_token, "steps": s.steps, "seqs": s.batch_size,
               "seq_len": s.seq_len, "mesh": "-", "accum": "-", "gb": None, "note": None}
        kwargs = dict(optimizer=optimizer, variables=variables)
        p = memory.fitting_mesh(cfg, chips, chip.hbm, 1, s.seq_len, step_batch=s.batch_size, **kwargs)
        if p is None:
            loose = memory.fitting_mesh(cfg, chips, chip.hbm, 1, s.seq_len, **kwargs)
            if loose is None:
                row["note"] = (f"one {s.seq_len:,}-token sequence per chip does not fit on any mesh of {chips} "
                               "chips: needs context parallelism (not in this trainer)")
            else:
                shards = loose.sizes["data"] * loose.sizes["fsdp"] * loose.sizes["expert"]
                row["note"] = (f"{s.batch_size:,} sequences per step do not split over the data shards of any "
                               f"fitting mesh (e.g. {memory.fmt_mesh(loose.sizes)}: {shards} shards)")
        else:
            shards = p.sizes["data"] * p.sizes["fsdp"] * p.sizes["expert"]
            row["mesh"], row["gb"], row["accum"] = memory.fmt_mesh(p.sizes), p.total / 1e9, str(s.batch_size // shards)
        flops = metrics.train_flops_per_token(cfg, s.seq_len, sparse_attention=s.attention == "sparse")
        row["step_s"] = flops * s.tokens_per_step / (chips * chip.peak_flops * mfu)
        row["days"] = row["step_s"] * s.steps / 86400
        rows.append(row)
    return rows


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    try:
        recipe = recipes.get_recipe(FLAGS.recipe)
        chip = memory.chip_named(FLAGS.chip)
        if FLAGS.chips < 1 or not 0 < FLAGS.mfu <= 1:
            raise ValueError(f"--chips must be >= 1 and --mfu in (0, 1], got {FLAGS.chips} and {FLAGS.mfu}")
        schedule = recipes.resolve(recipe)
    except ValueError as e:
        sys.exit(f"error: {e}")
    cfg = get_config(recipe.preset)
    variables = memory.model_variables(cfg)
    rows = stage_rows(schedule, cfg, chip, FLAGS.chips, FLAGS.mfu, FLAGS.optimizer, variables)
    print(f"recipe {recipe.name} (preset {recipe.preset}) on {FLAGS.chips} x {chip.name} "
          f"({chip.hbm / 1e9:.0f} GB, {chip.peak_flops / 1e12:.0f} TFLOP/s bf16), MFU {FLAGS.mfu:.0%}")
    print(f"  {'stage':<12} {'tokens':>8} {'steps':>9} {'seqs/step':>9} {'seq_len':>9}  {'mesh':<26} "
          f"{'GB/chip':>7} {'accum':>5} {'step s':>8} {'days':>7}")
    for r in rows:
        gb = f"{r['gb']:.1f}" if r["gb"] is not None else "-"
        mesh = r["mesh"] if r["note"] is None else "see note"
        print(f"  {r['stage']:<12} {_tokens(r['tokens']):>8} {r['steps']:>9,} {r['seqs']:>9,} {r['seq_len']:>9,}  "
              f"{mesh:<26} {gb:>7} {r['accum']:>5} {r['step_s']:>8.2f} {r['days']:>7.1f}")
    total_days = sum(r["days"] for r in rows)
    print(f"  total: {schedule.steps:,} steps, {_tokens(schedule.stages[-1].end_token)} tokens, "
          f"{total_days:.1f} days")
    state = memory.state_bytes(variables, {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, FLAGS.optimizer)
    ckpt = state["params"] + state["optimizer"]
    print(f"  checkpoint: {ckpt / 1e12:.2f} TB (parameters {state['params'] / 1e12:.2f} TB + optimizer state "
          f"{state['optimizer'] / 1e12:.2f} TB)")
    for r in rows:
        if r["note"]:
            print(f"  note, {r['stage']}: {r['note']}")

if __name__ == "__main__":
    define_flags()
    app.run(main)
