r"""Train-step throughput: ours (JAX) against transformers' torch DeepseekV4ForCausalLM, same config, same run.

  python -m tools.bench_train --shape=nano          # the nano preset, batch 4 x 256
  python -m tools.bench_train --shape=mid --nolog   # a trunk-bound V4 shape, batch 4 x 512
  python -m tools.bench_train --config=tiny --batch_size=2 --seq_len=64 --steps=1 --warmup=0

`--shape` presets live in `tools.bench_shapes`; explicit config and batch flags override them.

Both sides run fwd + bwd + AdamW (+ global-norm clipping) on the same random batch, from the same weights
(our model exported with `interop.to_hf` and loaded by transformers). transformers has no MTP module, so by
default the benchmarked config drops it (`--mtp` keeps it on our side only, and says so). The machine's f32
matmul peak is measured in the same run; MFU = model FLOPs/s (`metrics.train_flops_per_token`) over it.
Results are printed and appended to experiments/LOG.md as a dated section (`--nolog` to skip).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from deepseek_v4 import DeepseekV4, interop, metrics
from experiments import entry
from tools import bench_shapes

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    bench_shapes.define_flags()
    flags.DEFINE_integer("steps", 5, "Timed steps per side (after --warmup untimed ones).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps per side (compilation, allocator warm-up).")
    flags.DEFINE_bool("mtp", False, "Keep the MTP module on our side (transformers has none).")
    flags.DEFINE_bool("torch", True, "Also run transformers (needs torch + transformers).")
    flags.DEFINE_integer("matmul_size", None, "Square size of the peak-FLOPs probe (default: 2048 CPU, 8192 GPU).")
    flags.DEFINE_bool("nolog", False, "Do not append to experiments/LOG.md.")
    flags.DEFINE_string("log_path", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 "experiments", "LOG.md"), "Where results are appended.")


LR = bench_shapes.LR


def bench_torch(model, batch, warmup, steps):
    import safetensors.torch
    import torch
    import transformers

    config_dict, state_dict = interop.to_hf(model)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config_dict, f)
        tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}
        safetensors.torch.save_file(tensors, os.path.join(d, "model.safetensors"))
        hf = transformers.DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-20, weight_decay=0.0)
    ids = torch.from_numpy(batch["tokens"].astype(np.int64))
    losses = []

    def step():
        out = hf(input_ids=ids, labels=ids)  # shifted inside: T-1 targets (all T logits are still computed)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))

    return bench_shapes.timed_steps(step, warmup, steps) | {"first_loss": losses[0],
                                                            "threads": torch.get_num_threads()}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _check_flags() -> None:
    if FLAGS.steps < 1 or FLAGS.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {FLAGS.steps} and {FLAGS.warmup}")


def main(argv: list[str]) -> None:
    entry.tune_gc()  # compile-heavy: see experiments.entry
    cfg, b, t, shape_name = bench_shapes.step_shape_from_command_line(argv, check=_check_flags)
    tokens = b * t
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.device_count()} device(s)); {shape_name}"
          f"{'' if FLAGS.mtp else ' without MTP'}; batch {b} x {t}", flush=True)

    size = FLAGS.matmul_size
    peak = metrics.measure_matmul_peak(jnp.float32, size, seconds=2.0)
    print(f"measured f32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    flops_tok = metrics.train_flops_per_token(cfg, t)
    print(f"model FLOPs per token (train): {flops_tok / 1e6:.1f} M", flush=True)

    batch = bench_shapes.random_batch(cfg, b, t)
    results = {}
    ours = bench_shapes.bench_train_step(cfg, batch, FLAGS.warmup, FLAGS.steps)
    results["ours (JAX)"] = ours
    if FLAGS.torch:
        # The same weights: a model of the same seed as bench_train_step's (whose step donated its arrays).
        results["transformers (torch)"] = bench_torch(DeepseekV4(cfg, rngs=nnx.Rngs(0)), batch, FLAGS.warmup,
                                                      FLAGS.steps)
    rows = []
    for name, r in results.items():
        tps = tokens / r["median_s"]
        mfu = tps * flops_tok / peak
        r.update(tokens_per_s=tps, mfu=mfu)
        rows.append(f"| {name} | {r['median_s'] * 1e3:.0f} ms | {tps:,.0f} | {100 * mfu:.1f}% | "
                    f"{r['compile_s']:.1f} s | {r['first_loss']:.4f} |")
    header = ("| implementation | step (median) | tokens/s | MFU vs measured f32 peak | first step | first loss |\n"
              "|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    print(table)
    summary = []
    if "transformers (torch)" in results:
        ratio = results["ours (JAX)"]["tokens_per_s"] / results["transformers (torch)"]["tokens_per_s"]
        summary.append(f"ours / transformers tokens/s: {ratio:.2f}x (goal >= 1.5x)")
    summary.append(f"our MFU: {100 * results['ours (JAX)']['mfu']:.1f}% of the measured f32 peak (goal >= 50%)")
    for line in summary:
        print(line)
    if FLAGS.nolog:
        return
    date = datetime.date.today().isoformat()
    section = (f"\n## {date} train-step benchmark: ours vs transformers (commit {_commit()})\n\n"
               f"`python -m tools.bench_train {' '.join(sys.argv[1:])}` on {device.device_kind}"
               f" ({os.cpu_count()} CPU cores visible); {shape_name}{'' if FLAGS.mtp else ' without MTP'},"
               f" f32, batch {b} x {t}, fwd + bwd + AdamW + clipping, median of {FLAGS.steps} steps after "
               f"{FLAGS.warmup} warm-up. Measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s; "
               f"{flops_tok / 1e6:.1f} MFLOP per token.\n\n{table}\n\n" + "\n".join(f"- {s}" for s in summary) + "\n")
    with open(FLAGS.log_path, "a", encoding="utf-8") as f:
        f.write(section)
    print(f"appended to {FLAGS.log_path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
