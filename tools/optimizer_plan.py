"""Print where every parameter of a preset goes: Muon (with its matrices), AdamW, or nothing (non-trainable).

    python -m tools.optimizer_plan --config=flash
    python -m tools.optimizer_plan --config=nano --optimizer=adamw --summary

The model is built abstractly (`nnx.eval_shape`): nothing is allocated, so `flash` and `pro` work on a laptop.
Columns: path, shape, element count, route, and for Muon the matrices Newton-Schulz sees
(count x rows x columns). The totals give parameters per route and the Newton-Schulz FLOPs of one step
(10 iterations of about 4 m^2 n + 2 m^3 each, m <= n; see docs/training.md).
"""

from __future__ import annotations

import math

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_string("config", "flash", "Config preset: flash, pro, tiny, nano.")
    flags.DEFINE_enum("optimizer", "muon", ["muon", "adamw"], "muon: the V4 split; adamw: everything on AdamW.")
    flags.DEFINE_bool("summary", False, "Print only the totals per route.")


def ns_flops(matrices: tuple[int, int, int], steps: int) -> int:
    """FLOPs of `steps` quintic Newton-Schulz iterations on (count, rows, columns) matrices."""
    k, r, c = matrices
    m, n = min(r, c), max(r, c)
    return k * steps * (4 * m * m * n + 2 * m**3)


def format_plan(rows, optimizer: str, steps: int, summary: bool = False) -> str:
    """The table and the totals as text."""
    lines = []
    if not summary:
        width = max(len(r.path) for r in rows)
        lines.append(f"{'parameter':<{width}}  {'shape':<22} {'count':>15}  {'route':<7} {'matrices':<22} note")
        for r in rows:
            route = r.route if r.route == "frozen" or optimizer == "muon" else "adamw"
            mats = f"{r.matrices[0]} x [{r.matrices[1]}, {r.matrices[2]}]" if r.matrices and route == "muon" else ""
            lines.append(f"{r.path:<{width}}  {str(list(r.shape)):<22} {r.size:>15,}  {route:<7} {mats:<22} {r.note}")
        lines.append("")
    totals: dict[str, list[int]] = {}
    flops = 0
    for r in rows:
        route = r.route if r.route == "frozen" or optimizer == "muon" else "adamw"
        t = totals.setdefault(route, [0, 0, 0])
        t[0] += 1
        t[1] += r.size
        if route == "muon":
            t[2] += r.matrices[0]
            flops += ns_flops(r.matrices, steps)
    trainable = sum(v[1] for k, v in totals.items() if k != "frozen")
    for route in ("muon", "adamw", "frozen"):
        if route not in totals:
            continue
        n, size, mats = totals[route]
        share = f"{100 * size / trainable:5.1f}% of trainable" if route != "frozen" else "not nnx.Param (no optimizer)"
        extra = f", {mats:,} matrices" if route == "muon" else ""
        lines.append(f"{route:<7} {n:>5} tensors {size:>17,} elements  {share}{extra}")
    if flops:
        lines.append(f"Newton-Schulz per step: {flops / 1e12:,.2f} TFLOP ({steps} iterations per matrix)")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from flax import nnx

    from deepseek_v4 import DeepseekV4, get_config, muon, optim

    try:
        cfg = get_config(FLAGS.config)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))
    rows = optim.plan(nnx.state(model, nnx.Param), nnx.state(model, nnx.Not(nnx.Param)))
    print(f"config={FLAGS.config} optimizer={FLAGS.optimizer} "
          f"({math.fsum(r.size for r in rows if r.route != 'frozen') / 1e9:.3f}B trainable parameters)")
    print(format_plan(rows, FLAGS.optimizer, len(muon.V4_COEFFICIENTS), FLAGS.summary))


if __name__ == "__main__":
    define_flags()
    app.run(main)
