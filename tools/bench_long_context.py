"""Seconds per train step and peak memory of a CSA/HCA model from 4K to 64K tokens, per CSA phase.

    python -m tools.bench_long_context [--seq_lens=4096,8192,16384,32768,65536] [--phases=sparse,warmup,baseline]
        [--max_gib=16] [--steps=2] [--json] [--plot=experiments/plots/long_context.png] [--mesh=context=8]
    python -m tools.bench_long_context --rows=ROWS.jsonl --plot=PNG   (scaling and plot of a --json output)

Phases (docs/training.md):
- `sparse`: the trainer's sparse-phase step (`train.make_train_step(phase="sparse")`): top-k CSA attention,
  everything trains, the indexer's KL on each query's selected entries (`[B, T, K]` tensors only);
- `warmup`: the trainer's indexer warm-up step (`phase="warmup"`): dense CSA attention, only the indexers train
  (their own AdamW), on the dense KL computed by query blocks;
- `baseline`: a step with the earlier sparse-phase objective: the KL against the dense entry mass (`[B, T, C]`
  mass and index scores), what a training step computed before (cross entropy + indexer KL, no MTP or balance
  loss).

The model: batch 1, hidden 128, 2 mHC streams, 4 layers (CSA, HCA, CSA, HCA; sliding-window MTP), window 128,
CSA m=4 top-64, HCA m=128, 4 indexer heads of 32, vocabulary 8192, AdamW, random tokens, float32 (a
sparse step holds about 0.33 MB per token on CPU); `--model=small` keeps its first CSA and HCA layers only (a quick
check that the program runs). Every (phase, length) runs in its own process: it
compiles the step from abstract shapes and reads XLA's compiled peak (arguments + outputs + temporaries); if that
estimate exceeds --max_gib the run is skipped before anything is allocated, and the output says so. Otherwise it
allocates the model and optimizer state, runs one step to warm up and --steps timed steps, and reports the median
seconds per step, the compiled peak (`peak_bytes`) and the process's peak resident memory (`peak_rss_bytes`,
which includes the runtime's fixed ~1 GB). A process killed anyway (out of memory) is reported as failed.

`--mesh` (e.g. `context=8`) runs the step on that mesh (on CPU: as many fake devices, set for the child process);
the compiled figures are then per device, and `activation_bytes` (XLA's temporaries: everything but the arguments
and outputs) is the number to compare across meshes. Parameters and optimizer state are replicated over the
mesh (`context` replicates them anyway); under context parallelism only the `sparse` phase runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from sharding import context as cp
from tools import timing

PHASES = ("sparse", "warmup", "baseline")


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768", "65536"], "sequence lengths T")
    flags.DEFINE_list("phases", list(PHASES), f"phases to time, from {','.join(PHASES)}")
    flags.DEFINE_integer("steps", 2, "timed train steps after the warm-up step (median reported)")
    flags.DEFINE_float("max_gib", 16.0, "skip a run whose compiled peak exceeds this many GiB")
    flags.DEFINE_enum("model", "bench", ["bench", "small", "tiny"], "bench: the model described above; small: its "
                      "first CSA and HCA layers alone (a quick check that the program runs); tiny: the 6-layer `tiny` "
                      "preset (hidden 64, 3 CSA layers, top-8)")
    flags.DEFINE_bool("compile_only", False, "report the compiled peak only (nothing is allocated)")
    flags.DEFINE_bool("json", False, "print one JSON object per line")
    flags.DEFINE_string("plot", "", "write a PNG of seconds and memory against T here ('' = none)")
    flags.DEFINE_string("rows", "", "plot these JSON lines (an earlier --json output) instead of measuring")
    flags.DEFINE_string("child", "", "internal: 'phase:seq_len' measured in this process")
    flags.DEFINE_string("mesh", "", "run on this mesh, e.g. context=8 ('' = one device, no mesh)")


def bench_config():
    from deepseek_v4 import get_config

    if FLAGS.model == "tiny":
        return get_config("tiny", vocab_size=8192)
    layers = dict(num_hidden_layers=2, compress_ratios=(4, 128, 0)) if FLAGS.model == "small" else dict(
        num_hidden_layers=4, compress_ratios=(4, 128, 4, 128, 0))
    return get_config(
        "tiny", hidden_size=128, hc_mult=2, **layers, hca_ratio=128,
        sliding_window=128, index_topk=64, index_n_heads=4, index_head_dim=32, head_dim=64, q_lora_rank=64,
        o_lora_rank=64, moe_intermediate_size=128, vocab_size=8192, num_hash_layers=1,
        original_max_position_embeddings=4096, max_position_embeddings=1 << 20,
    )


def _baseline_step(graphdef, tx):
    """The earlier sparse-phase step: cross entropy + the indexer KL against the dense entry mass, AdamW."""
    from deepseek_v4 import loss as loss_lib

    def loss_fn(params, extras, batch):
        model = nnx.merge(graphdef, params, extras)
        out = model.forward_train(batch["tokens"], sparse_attention=True, indexer_loss=True,
                                  dense_target_in_sparse_phase=True)
        weights = jnp.ones(batch["targets"].shape, jnp.float32)
        targets = cp.to_layout(batch["targets"], model.context_size(batch["targets"].shape[1]))  # hidden's order
        ce = loss_lib.chunked_cross_entropy(out.hidden, model.head[...], targets, weights)
        return ce / weights.size + out.indexer_loss

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.extras, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return dataclasses.replace(state, params=optax.apply_updates(state.params, updates), opt_state=opt_state), {
            "total_loss": loss}

    return jax.jit(step, donate_argnums=(0,))


def _settings():
    """AdamW at a constant LR; step 0 is the indexer warm-up, steps >= 1 sparse (the phase is passed explicitly)."""
    from deepseek_v4 import train

    return train.TrainSettings(steps=8, warmup_steps=0, schedule="constant", learning_rate=1e-4, optimizer="adamw",
                               sparse_attention_after=1, indexer_warmup_steps=1)


def measure(phase: str, T: int) -> dict:
    """One (phase, length) in this process (on --mesh when given): the row to report."""
    if not FLAGS.mesh:
        return _measure(phase, T, None)
    from sharding import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(FLAGS.mesh)
    with jax.set_mesh(mesh):
        return dict(_measure(phase, T, mesh), mesh=FLAGS.mesh)


def _measure(phase: str, T: int, mesh) -> dict:
    from deepseek_v4 import DeepseekV4, train
    from sharding import rules

    cfg = bench_config()
    s = _settings()
    tx, indexer_tx = train.make_optimizer(s), train.make_indexer_warmup_optimizer(s)
    build = lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, abstract_state = train.abstract_state(build, tx, 0, indexer_tx)
    if phase == "baseline":
        step = _baseline_step(graphdef, tx)
    else:
        step = train.make_train_step(graphdef, cfg, tx, s, phase=phase)
    batch_sharding = None if mesh is None else rules.named_sharding(("batch", "seq"), mesh, shape=(1, T))
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if mesh is not None:
        abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                      abstract_state)
    batch = {k: jax.ShapeDtypeStruct((1, T), jnp.int32, sharding=batch_sharding)
             for k in ("tokens", "targets", "segment_ids", "positions")}
    compiled = step.lower(abstract_state, batch).compile()
    m = compiled.memory_analysis()
    peak = int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    row = {"seq_len": T, "phase": phase, "seconds": None, "peak_bytes": peak, "peak_rss_bytes": None,
           "activation_bytes": int(m.temp_size_in_bytes)}
    if peak > FLAGS.max_gib * 2**30:
        return dict(row, skipped=f"compiled peak {peak / 2**30:.1f} GiB > --max_gib={FLAGS.max_gib:g}")
    if FLAGS.compile_only:
        return dict(row, skipped="--compile_only")
    _, state = train.init_state(build(), tx, 0, indexer_tx)
    if mesh is not None:
        state = jax.device_put(state, replicated)
    rng = np.random.default_rng(0)
    data = {k: rng.integers(0, cfg.vocab_size, (1, T)) for k in ("tokens", "targets")}
    data.update(segment_ids=np.ones((1, T)), positions=np.arange(T)[None])
    data = {k: jax.device_put(jnp.asarray(v, jnp.int32), batch_sharding) for k, v in data.items()}
    box = {"state": state}

    def step():
        box["state"], box["metrics"] = compiled(box["state"], data)
        return box["metrics"]

    times = timing.time_calls(step, repeats=FLAGS.steps)  # the first call: not timed
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(row, seconds=times.median_s, peak_rss_bytes=int(rss), loss=float(box["metrics"]["total_loss"]))


def _run_child(phase: str, T: int) -> dict:
    cmd = [sys.executable, "-m", "tools.bench_long_context", f"--child={phase}:{T}", f"--max_gib={FLAGS.max_gib}",
           f"--steps={FLAGS.steps}", f"--model={FLAGS.model}", f"--compile_only={FLAGS.compile_only}",
           f"--mesh={FLAGS.mesh}"]
    env = dict(os.environ)
    if FLAGS.mesh and jax.default_backend() == "cpu":  # fake CPU devices for the mesh, set before the child starts
        devices = int(np.prod([int(p.partition("=")[2]) for p in FLAGS.mesh.split(",")]))
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    why = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
    tail = proc.stderr.strip().splitlines()[-1:] or [""]
    return {"seq_len": T, "phase": phase, "seconds": None, "peak_bytes": None, "peak_rss_bytes": None,
            "skipped": f"failed: {why} {tail[0][:200]}"}


def scaling(rows: list[dict]) -> list[str]:
    """Per phase and consecutive measured lengths: growth of time and memory per doubling of T."""
    lines = []
    for phase in dict.fromkeys(r["phase"] for r in rows):
        done = sorted((r for r in rows if r["phase"] == phase and r["seconds"]), key=lambda r: r["seq_len"])
        for lo, hi in zip(done, done[1:]):
            doublings = np.log2(hi["seq_len"] / lo["seq_len"])
            per = lambda k: (hi[k] / lo[k]) ** (1 / doublings)  # noqa: B023
            lines.append(f"{phase} {lo['seq_len']} -> {hi['seq_len']}: per doubling time x{per('seconds'):.2f}, "
                         f"compiled peak x{per('peak_bytes'):.2f}, resident peak x{per('peak_rss_bytes'):.2f}")
    return lines


def plot(rows: list[dict], path: str) -> None:
    """Log-log seconds per step and compiled peak against T, one line per phase, linear and quadratic guides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((axes[0], "seconds", "seconds per train step"), (axes[1], "peak_bytes", "compiled peak, GiB"))
    for ax, key, label in panels:
        for phase in dict.fromkeys(r["phase"] for r in rows):
            done = sorted((r for r in rows if r["phase"] == phase and r["seconds"]), key=lambda r: r["seq_len"])
            if not done:
                continue
            xs = [r["seq_len"] for r in done]
            ys = [r[key] / (2**30 if key == "peak_bytes" else 1) for r in done]
            line, = ax.plot(xs, ys, "o-", label=phase)
            skipped = [r for r in rows if r["phase"] == phase and not r["seconds"] and r["peak_bytes"]]
            if key == "peak_bytes" and skipped:  # runs skipped by their compiled estimate: open markers
                ax.plot([xs[-1]] + [r["seq_len"] for r in skipped],
                        [ys[-1]] + [r["peak_bytes"] / 2**30 for r in skipped], "o--", mfc="none",
                        color=line.get_color(), label=f"{phase}, compiled estimate (not run)")
            if phase == "sparse":
                for power, style in ((1, ":"), (2, "--")):
                    ax.plot(xs, [ys[0] * (x / xs[0]) ** power for x in xs], "k" + style, lw=0.8,
                            label="linear" if power == 1 else "quadratic")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per sequence")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    if FLAGS.rows:
        with open(FLAGS.rows, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        print("\n".join(scaling(rows)))
        if FLAGS.plot:
            plot(rows, FLAGS.plot)
        return
    if FLAGS.child:
        phase, T = FLAGS.child.split(":")
        print(json.dumps(measure(phase, int(T))), flush=True)
        return
    if FLAGS.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {FLAGS.steps}")
    bad = [p for p in FLAGS.phases if p not in PHASES]
    if bad:
        raise SystemExit(f"unknown --phases {bad}; choose from {', '.join(PHASES)}")
    try:
        lens = [int(v) for v in FLAGS.seq_lens]
    except ValueError as e:
        raise SystemExit(f"--seq_lens must be integers: {e}") from None
    rows = []
    for phase in FLAGS.phases:
        for T in lens:
            row = _run_child(phase, T)
            rows.append(row)
            if FLAGS.json:
                print(json.dumps(row), flush=True)
            else:
                gib = lambda b: f"{b / 2**30:6.2f} GiB" if b else "     -    "  # noqa: E731
                what = f"{row['seconds']:8.2f} s" if row["seconds"] else f"skipped: {row.get('skipped')}"
                print(f"{phase:>8} T={T:>6}: {what}  compiled peak {gib(row['peak_bytes'])}  "
                      f"activations {gib(row.get('activation_bytes'))}  resident peak {gib(row['peak_rss_bytes'])}",
                      flush=True)
    if not FLAGS.json:
        print("\n".join(scaling(rows)))
    if FLAGS.plot:
        plot(rows, FLAGS.plot)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    define_flags()
    app.run(main)
