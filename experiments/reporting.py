"""How a training run reports: the metrics record of each `log_every` window, the progress line, the curves.

`StepWindow` collects the step metrics since the last record and the wall time of the steps that did not compile;
`summarise` turns them into one record (the keys of metrics.jsonl and TensorBoard); `Progress` shows it as a tqdm
bar on a terminal or one log line per record; `plot_curves` draws <workdir>/metrics.png at the end of a run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from deepseek_v4 import metrics, train

if TYPE_CHECKING:
    from experiments.run import Run


class StepWindow:
    """The step metrics since the last record, and the wall time of the steps that did not compile."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.metrics: list[dict[str, Any]] = []
        self.timed_steps, self.t0 = 0, time.perf_counter()

    def add(self, m: dict[str, Any], compiled_now: bool) -> None:
        self.metrics.append(m)
        if compiled_now:  # keep compilation out of the throughput numbers
            jax.block_until_ready(m)
            self.timed_steps, self.t0 = 0, time.perf_counter()
        else:
            self.timed_steps += 1

    def exclude(self, seconds: float) -> None:
        self.t0 += seconds

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def summarise(run: Run, window: StepWindow, step: int) -> dict[str, Any]:
    """One metrics record from the steps since the last one (losses averaged over steps that updated)."""
    host = jax.device_get(window.metrics)
    good = [m for m in host if bool(m["update_ok"])] or host
    rec: dict[str, Any] = {}
    for key in ("loss", "mtp_loss", "total_loss", "balance_loss", "indexer_loss", "indexer_recall", "grad_norm"):
        rec[key] = float(np.mean([m[key] for m in good]))
    last = host[-1]
    rec["lr"] = float(last["lr"])
    rec["mtp_weight"] = float(last["mtp_weight"])
    rec["skipped_steps"] = int(last["skipped"])
    rec["dropped_tokens"] = float(np.sum([m["dropped_tokens"] for m in host]))
    rec["expert_load_max_over_mean"] = np.max([m["expert_load_max_over_mean"] for m in host], axis=0).tolist()
    rec["hash_expert_load_max_over_mean"] = np.max([m["hash_expert_load_max_over_mean"] for m in host],
                                                   axis=0).tolist()
    rec["phase"] = train.csa_phase(run.settings, step - 1)  # of the record's last step
    rec["sparse_attention"] = rec["phase"] == train.SPARSE
    tokens_per_step = run.opts.batch_size * run.opts.seq_len
    rec["nonpad_fraction"] = float(np.sum([m["tokens"] for m in host]) / (tokens_per_step * len(host)))
    if window.timed_steps:
        rec["tokens_per_s"] = tokens_per_step * window.timed_steps / max(window.seconds, 1e-9)
        flops = metrics.train_flops_per_token(run.cfg, run.opts.seq_len, sparse_attention=rec["sparse_attention"])
        rec["mfu"] = rec["tokens_per_s"] * flops / (run.peak_flops * run.mesh.size)
    rec["tokens_seen"] = run.schedule.tokens_at(step) if run.schedule else step * tokens_per_step
    for key in sorted(set(last) - _STEP_METRICS):  # the loss's own scalars (e.g. distillation's KL per teacher)
        if np.ndim(last[key]) == 0:
            rec[key] = float(np.mean([m[key] for m in good]))
    return rec


# The metrics every train step returns (`train._step_metrics`); any other key is the loss function's own.
_STEP_METRICS = frozenset({"loss", "mtp_loss", "total_loss", "balance_loss", "indexer_loss", "indexer_recall",
                           "grad_norm", "lr", "mtp_weight", "tokens", "update_ok", "skipped",
                           "expert_load_max_over_mean", "hash_expert_load_max_over_mean", "dropped_tokens",
                           "loss_spike"})


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """A tqdm bar on a terminal, otherwise one log line per record (both with rate and ETA)."""

    def __init__(self, start: int, total: int, primary: bool, bar: bool | None, extra_keys: tuple[str, ...] = ()):
        self.primary, self.total, self.start, self.extra_keys = primary, total, start, extra_keys
        self.t0 = time.perf_counter()
        self.bar = None
        if primary and (bar if bar is not None else sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, rec: dict[str, Any]) -> None:
        if not self.primary:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        speed = (f"{rec['tokens_per_s']:.0f} tok/s mfu {100 * rec['mfu']:.2f}%" if "tokens_per_s" in rec
                 else "compiling")
        line = (f"step {step}/{self.total} [{rec['phase']}] loss {rec['loss']:.4f} mtp {rec['mtp_loss']:.4f} "
                f"indexer {rec['indexer_loss']:.4f} grad_norm {rec['grad_norm']:.3f} lr {rec['lr']:.2e} {speed} "
                f"eta {_fmt_time(eta)}")
        line += "".join(f" {k} {rec[k]:.4g}" for k in self.extra_keys if k in rec)
        if "eval_loss" in rec:
            line += f" | eval loss {rec['eval_loss']:.4f}" + (f" bpb {rec['eval_bits_per_byte']:.3f}"
                                                              if "eval_bits_per_byte" in rec else "")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}")
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_curves(workdir: str) -> None:
    """Draw <workdir>/metrics.png with tools.plot_metrics (its own process: matplotlib stays out of the trainer)."""
    p = subprocess.run([sys.executable, "-m", "tools.plot_metrics", workdir], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if p.returncode == 0:
        print(f"curves: {os.path.join(workdir, 'metrics.png')}", flush=True)
    else:
        lines = (p.stderr or p.stdout).strip().splitlines()
        print(f"warning: could not draw the curves: {lines[-1] if lines else p.returncode}", flush=True)
