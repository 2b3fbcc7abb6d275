r"""Draw the training curves of a run: `python -m tools.plot_metrics <workdir> [--out=curves.png]`.

Reads `<workdir>/metrics.jsonl` and writes a PNG (default `<workdir>/metrics.png`) with one panel per metric:
loss and MTP loss (training and held-out), held-out bits per byte and loss by position bucket, gradient norm,
learning rate, throughput and MFU, the indexer's KL and recall, the busiest expert's load over the mean per MoE
layer, and the loss-spike counters.

Several runs: `python -m tools.plot_metrics <workdir> <workdir> ... --out=compare.png` draws their loss and MTP loss
curves over each other (one line per run, labelled by the workdir's name) and prints each run's last loss.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from deepseek_v4 import metrics as metrics_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (other programs import its
    plotting functions, and absl flags are process-global)."""
    flags.DEFINE_string("out", None, "PNG path (default: <workdir>/metrics.png).")
    flags.DEFINE_float("smooth", 0.0, "Exponential moving average factor for the loss curves (0: none).")

PANELS = (
    ("loss", ("loss", "mtp_loss", "eval_loss", "eval_mtp_loss"), "linear"),
    ("held-out bits per byte", ("eval_bits_per_byte",), "linear"),
    ("held-out loss by position", ("eval_loss_pos_*",), "linear"),
    ("loss spikes", ("loss_spikes", "spike_rollbacks"), "linear"),
    ("gradient norm", ("grad_norm",), "log"),
    ("learning rate", ("lr",), "linear"),
    ("tokens / s", ("tokens_per_s",), "linear"),
    ("MFU", ("mfu",), "linear"),
    ("indexer", ("indexer_loss", "indexer_recall"), "linear"),
    ("expert load max / mean", ("expert_load_max_over_mean",), "linear"),
    ("balance loss", ("balance_loss",), "linear"),
)


def _expand(keys: tuple[str, ...], records: list[dict]) -> tuple[str, ...]:
    """`keys` with each `prefix*` replaced by the record keys that start with the prefix (in first-seen order)."""
    out = []
    for key in keys:
        if key.endswith("*"):
            out += [k for k in dict.fromkeys(k for r in records for k in r) if k.startswith(key[:-1])]
        else:
            out.append(key)
    return tuple(out)


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on use: the trainer never loads it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str) -> str:
    """Write `fig` to the PNG `out` atomically (a temporary file, then a rename) and close it; returns `out`."""
    fig.tight_layout()
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    os.replace(tmp, out)
    return out


def plot(records: list[dict], out: str, title: str = "", smooth: float = 0.0) -> str:
    """Write the curves of `records` (metrics.jsonl rows) to the PNG `out`; returns `out`."""
    plt = _pyplot()
    panels = [(name, _expand(keys, records), scale) for name, keys, scale in PANELS]
    panels = [p for p in panels if any(any(r.get(k) is not None for r in records) for k in p[1])]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.2 * rows), squeeze=False)
    for ax, (name, keys, scale) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not pts:
                continue
            steps, values = zip(*pts)
            if isinstance(values[0], list):  # per-layer values: one line per layer
                for layer in range(len(values[0])):
                    ax.plot(steps, [v[layer] for v in values], lw=1, label=f"layer {layer}")
                continue
            values = list(values)
            if smooth and key.endswith("loss"):
                values = _ema(values, smooth)
            ax.plot(steps, values, lw=1.5, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, out)


def plot_runs(runs: dict[str, list[dict]], out: str, smooth: float = 0.0) -> str:
    """Overlay the loss and MTP-loss curves of several runs (label -> metrics.jsonl rows) in the PNG `out`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False)
    for ax, key in zip(axes.flat, ("loss", "mtp_loss")):
        for label, records in runs.items():
            pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, _ema(list(values), smooth) if smooth else values, lw=1.5, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def _records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        print(f"error: {path} does not exist", file=sys.stderr)
        sys.exit(2)
    records = metrics_lib.read_metrics(path)
    if not records:
        print(f"error: {path} holds no records yet", file=sys.stderr)
        sys.exit(2)
    return records


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        print("usage: python -m tools.plot_metrics <workdir> [<workdir> ...] [--out=PATH]", file=sys.stderr)
        sys.exit(2)
    if len(argv) > 2:
        if not FLAGS.out:
            print("error: comparing several runs needs --out=PATH", file=sys.stderr)
            sys.exit(2)
        runs = {os.path.basename(os.path.normpath(w)): _records(w) for w in argv[1:]}
        plot_runs(runs, FLAGS.out, smooth=FLAGS.smooth)
        for label, records in runs.items():
            print(f"{label}: steps {records[0]['step']}-{records[-1]['step']}, last loss {records[-1].get('loss')}")
        print(FLAGS.out)
        return
    workdir = argv[1]
    records = _records(workdir)
    out = plot(records, FLAGS.out or os.path.join(workdir, "metrics.png"), title=os.path.abspath(workdir),
               smooth=FLAGS.smooth)
    first, last = records[0], records[-1]
    print(f"{out}: {len(records)} records, steps {first['step']}-{last['step']}, "
          f"loss {first.get('loss')} -> {last.get('loss')}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
