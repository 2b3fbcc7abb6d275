"""Optimizer step time: our Muon against AdamW and against optax.contrib.muon, on one preset's parameters.

    python -m tools.bench_optimizer                       # nano parameters, 10 timed steps each
    python -m tools.bench_optimizer --log=experiments/LOG.md
    python -m tools.bench_optimizer --train_steps=300     # also: nano training, Muon vs AdamW final loss

Step time: the parameters of `--config` (random values, real shapes and paths) and random gradients;
one jitted `update + apply_updates` per step, timed after two warm-up steps (median of `--steps`). Rows:

- adamw: `optim.make_optimizer("adamw")`, the reference of the ratios;
- muon: `optim.make_optimizer("muon")`, Newton-Schulz in bfloat16 (the default);
- muon-f32: the same with Newton-Schulz in float32;
- optax-muon: `optax.contrib.muon` set up as close to V4 as it allows (the V4 hybrid schedule, 10 steps,
  consistent_rms=0.18, weight decay 0.1, our per-parameter matrix axes as dimension numbers, AdamW
  beta 0.9/0.95 on the same parameters); it orthogonalises in the momentum dtype (float32).

Gradient clipping is off in all rows. `--train_steps=N` runs `experiments.pretrain` twice (Muon, AdamW)
with the same flags, learning rate and steps, and reports the final training loss of each and its mean
over the last tenth of the steps (less noisy). `--steps=0` skips the step timing.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_string("config", "nano", "Config preset whose parameters are benchmarked.")
    flags.DEFINE_integer("steps", 10, "Timed optimizer steps per row (after 2 warm-up steps); 0 skips the timing.")
    flags.DEFINE_float("learning_rate", 3e-3, "Learning rate of every row.")
    flags.DEFINE_string("log", None,
                        "Append the results as a dated section to this markdown file (experiments/LOG.md).")
    flags.DEFINE_integer("train_steps", 0, "If > 0: also train --config with Muon and with AdamW for this many steps.")
    flags.DEFINE_list("train_flags", ["--data=synthetic", "--batch_size=4", "--seq_len=64"],
                      "Extra experiments.pretrain flags for --train_steps (same for both runs).")


def _parameters(cfg, seed: int = 0):
    """Random float32 parameters with the model's shapes, as a flat {dotted path: array} dict."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_v4 import DeepseekV4
    from deepseek_v4.params import path_str

    abstract = nnx.state(nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(seed))), nnx.Param)
    flat = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return {p: 0.02 * jax.random.normal(k, v.shape, jnp.float32) for k, (p, v) in zip(keys, sorted(flat.items()))}


def _optax_muon(params, lr: float):
    """optax.contrib.muon with V4's numbers and our routing (None = AdamW)."""
    import optax

    from deepseek_v4 import muon, optim

    def dims(path, x):
        route = optim.route_of(path, x.shape)
        if route.route != optim.MUON:
            return None
        b, r = route.matrix.batch_dims, route.matrix.row_dims
        return optax.contrib.MuonDimensionNumbers(tuple(range(b, b + r)), tuple(range(b + r, x.ndim)))

    return optax.contrib.muon(
        lr, ns_coeffs=muon.V4_COEFFICIENTS, ns_steps=len(muon.V4_COEFFICIENTS), beta=0.95, weight_decay=0.1,
        nesterov=True, adam_b1=0.9, adam_b2=0.95, adam_weight_decay=0.1, consistent_rms=0.18,
        muon_weight_dimension_numbers={p: dims(p, x) for p, x in params.items()},
    )


def _rows(params, lr: float):
    import jax.numpy as jnp
    import optax

    from deepseek_v4 import muon, optim

    def ours_f32():
        return optax.multi_transform(
            {optim.MUON: muon.muon(lr, compute_dtype=jnp.float32, spec_fn=optim.matrix_spec),
             optim.ADAMW: optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-20, weight_decay=0.1)},
            optim.param_labels)

    return {
        "adamw": lambda: optim.make_optimizer("adamw", lr, clip_norm=None),
        "muon": lambda: optim.make_optimizer("muon", lr, clip_norm=None),
        "muon-f32": ours_f32,
        "optax-muon": lambda: _optax_muon(params, lr),
    }


def time_step(tx, params, grads, steps: int) -> tuple[float, float]:
    """(compile seconds, median step seconds) of a jitted update + apply_updates."""
    import jax
    import optax

    from tools import timing

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    carry = [jax.tree.map(lambda x: x.copy(), params), state]

    def call():
        carry[:] = compiled(*carry, grads)
        return carry

    return compile_s, timing.time_calls(call, steps, warmup=2).median_s


def bench(config: str, steps: int, lr: float) -> list[str]:
    import jax

    from deepseek_v4 import get_config, optim

    cfg = get_config(config)
    params = _parameters(cfg)
    grads = jax.tree.map(lambda x: x * 0.5 + 1e-3, params)
    n_muon = sum(x.size for p, x in params.items() if optim.route_of(p, x.shape).route == optim.MUON)
    n_all = sum(x.size for x in params.values())
    lines = [f"config={config}: {n_all / 1e6:.1f}M parameters, {n_muon / 1e6:.1f}M on Muon; "
             f"{steps} timed steps per row; backend {jax.default_backend()} ({jax.device_count()} devices)", "",
             "| optimizer | compile s | step ms | vs adamw | vs optax-muon |", "|---|---:|---:|---:|---:|"]
    results = {}
    for name, make in _rows(params, lr).items():
        compile_s, step_s = time_step(make(), params, grads, steps)
        results[name] = (compile_s, step_s)
        print(f"{name:<11} compile {compile_s:6.2f} s   step {1e3 * step_s:8.1f} ms", flush=True)
    for name, (compile_s, step_s) in results.items():
        lines.append(f"| {name} | {compile_s:.2f} | {1e3 * step_s:.1f} | {step_s / results['adamw'][1]:.2f}x | "
                     f"{step_s / results['optax-muon'][1]:.2f}x |")
    return lines


def _final_losses(workdir: str) -> tuple[int, float, float]:
    """(last step, its loss, mean loss over the last tenth of the recorded steps) from metrics.jsonl."""
    from deepseek_v4 import metrics

    recs = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    if not recs:
        raise SystemExit(f"error: no loss recorded in {workdir}")
    tail = recs[-max(1, len(recs) // 10):]
    return int(recs[-1]["step"]), float(recs[-1]["loss"]), statistics.fmean(float(r["loss"]) for r in tail)


def compare_training(config: str, train_steps: int, lr: float, extra: list[str]) -> list[str]:
    """Train `config` with Muon and with AdamW (same flags, steps and LR); the final training losses."""
    if importlib.util.find_spec("experiments.pretrain") is None:  # it runs as a subprocess, one per optimizer
        raise SystemExit("error: --train_steps needs experiments.pretrain, which does not exist")
    lines = ["", f"Training comparison: config={config}, {train_steps} steps, lr {lr}, flags {' '.join(extra)}", "",
             "| optimizer | final step | final loss | mean loss, last 10% of steps | wall s |",
             "|---|---:|---:|---:|---:|"]
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("muon", "adamw"):
            workdir = os.path.join(tmp, name)
            cmd = [sys.executable, "-m", "experiments.pretrain", f"--config={config}", f"--optimizer={name}",
                   f"--steps={train_steps}", f"--learning_rate={lr}", f"--workdir={workdir}", "--log_every=1", *extra]
            print("running:", " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, check=False)
            if done.returncode:
                raise SystemExit(f"error: experiments.pretrain --optimizer={name} exited with {done.returncode}")
            step, loss, mean = _final_losses(workdir)
            losses[name] = mean
            lines.append(f"| {name} | {step} | {loss:.4f} | {mean:.4f} | {time.perf_counter() - t0:.0f} |")
    lines.append(f"\nMuon - AdamW (mean loss over the last 10% of steps): {losses['muon'] - losses['adamw']:+.4f}")
    return lines


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.steps < 0 or FLAGS.train_steps < 0 or not (FLAGS.learning_rate > 0 and math.isfinite(FLAGS.learning_rate)):
        raise SystemExit("error: --steps and --train_steps must be >= 0 and --learning_rate positive")
    from deepseek_v4 import config as config_lib

    if FLAGS.config not in config_lib.PRESETS:
        names = ', '.join(config_lib.PRESETS)
        raise SystemExit(f"error: unknown config preset {FLAGS.config!r}; choose one of {names}")
    lines = bench(FLAGS.config, FLAGS.steps, FLAGS.learning_rate) if FLAGS.steps else []
    if FLAGS.train_steps:
        lines += compare_training(FLAGS.config, FLAGS.train_steps, FLAGS.learning_rate, FLAGS.train_flags)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    header = (f"\n## {datetime.date.today().isoformat()} optimizer benchmark (tools.bench_optimizer), "
              f"commit {commit.stdout.strip() or 'unknown'}\n")
    text = header + "\n" + "\n".join(lines) + "\n"
    print(text)
    if FLAGS.log:
        with open(FLAGS.log, "a", encoding="utf-8") as f:  # append only: one write of the whole section
            f.write(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
