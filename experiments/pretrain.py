r"""Pretrain a DeepSeek-V4 model: flags -> Config -> mesh -> init or resume -> train loop -> checkpoints.

With no flags it trains the `nano` preset on the embedded Shakespeare corpus on CPU:

  python -m experiments.pretrain

Re-running a command with the same --workdir resumes from its newest good checkpoint (model, optimizer,
step, RNG, data position). Larger runs name a preset and override fields, e.g.

  python -m experiments.pretrain --config=tiny --workdir=runs/tiny --steps=2000 --batch_size=16 \
      --seq_len=512 --learning_rate=1e-3 --schedule=cosine --mesh=data=2,expert=4

Outputs in --workdir: checkpoints/<step>/ (Orbax), metrics.jsonl (one JSON object per logged step),
tensorboard/ (event files), config.json (the resolved model config). `python -m tools.plot_metrics
<workdir>` draws the curves.

Faults: SIGTERM / SIGINT finish the current step, save and exit 0; a step with a non-finite loss or
gradient changes nothing and is counted, and --max_bad_steps consecutive ones stop the run (exit 1);
an unreadable newest checkpoint is moved aside and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from deepseek_v4 import DeepseekV4, data, metrics, train
from deepseek_v4 import checkpoint as ckpt_lib
from experiments import flags as config_flags
from sharding import mesh as mesh_lib
from sharding import rules

FLAGS = flags.FLAGS

# ---- flags --------------------------------------------------------------------------------------------
config_flags.define_config_flags()
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics). Default: runs/<config>.")
flags.DEFINE_integer("steps", 40, "Total optimizer steps of the run (a resumed run continues up to it).")
flags.DEFINE_integer("batch_size", 8, "Global batch size in rows (sequences) per step.")
flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
flags.DEFINE_integer("grad_accum", 1, "Microbatches per step (batch_size must be divisible by it).")
flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
flags.DEFINE_enum("schedule", "wsd", ["wsd", "cosine", "constant"],
                  "LR schedule: wsd = warmup, constant, cosine decay over the last --decay_fraction of the run; "
                  "cosine = warmup then cosine decay; constant = warmup then constant.")
flags.DEFINE_integer("warmup_steps", None, "Linear warmup steps (default: 10% of --steps).")
flags.DEFINE_float("decay_fraction", 0.2, "wsd: fraction of --steps spent decaying.")
flags.DEFINE_float("final_lr_fraction", 0.1, "The LR decays to learning_rate * final_lr_fraction.")
flags.DEFINE_enum("optimizer", "muon", ["muon", "adamw"],
                  "muon: Muon for hidden and expert matrices, AdamW for embedding, head, norms, mHC biases (V4); "
                  "adamw: AdamW everywhere.")
flags.DEFINE_float("adam_b1", 0.9, "AdamW beta1.")
flags.DEFINE_float("adam_b2", 0.95, "AdamW beta2.")
flags.DEFINE_float("adam_eps", 1e-20, "AdamW epsilon.")
flags.DEFINE_float("weight_decay", 0.1, "Decoupled weight decay, applied to every trainable parameter.")
flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip (0 disables).")
flags.DEFINE_float("mtp_weight", 0.3, "MTP loss weight until the LR starts to decay.")
flags.DEFINE_float("mtp_weight_after_decay", 0.1, "MTP loss weight from the start of the LR decay.")
flags.DEFINE_float("balance_weight", 1e-4, "Sequence-wise balance loss weight.")
flags.DEFINE_float("indexer_weight", 1.0, "Weight of the lightning indexer's KL loss (0: no indexer training).")
flags.DEFINE_float("bias_speed", 1e-3, "Aux-loss-free balancing bias update speed (sign rule).")
flags.DEFINE_integer("sparse_attention_after", 0,
                     "Steps of dense attention (CSA over all visible compressed entries; the indexer learns from "
                     "the KL) before CSA layers switch to top-k sparse attention.")
flags.DEFINE_integer("loss_chunk", 1024, "Tokens per chunk of head logits in the cross entropy.")
flags.DEFINE_enum("loss_impl", "remat", ["remat", "fused"],
                  "Cross entropy gradients: fused = computed in the forward pass (3 head matmuls per chunk, holds a "
                  "head-sized gradient); remat = recomputed in the backward (4 matmuls, less memory).")
flags.DEFINE_integer("save_every", 50, "Steps between checkpoints (one is also written at the end).")
flags.DEFINE_integer("keep_checkpoints", 3, "How many of the newest checkpoints to keep.")
flags.DEFINE_integer("log_every", 5, "Steps between metric records.")
flags.DEFINE_integer("seed", 0, "Seed of the model init and the data order.")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. data=2,expert=4 (default: data over all devices).")
flags.DEFINE_float("peak_flops", None, "Peak FLOP/s per device for MFU (default: vendor table, measured on CPU).")
flags.DEFINE_integer("max_bad_steps", 5, "Stop after this many consecutive steps with non-finite loss/gradients.")
flags.DEFINE_string("data", "shakespeare",
                    "'shakespeare' (the embedded corpus), 'synthetic' (a learnable token pattern, no tokenizer), "
                    "or comma-separated directories written by tools.prepare_data.")
flags.DEFINE_list("data_weights", None, "Token share per --data directory (default: by size).")
flags.DEFINE_string("data_cache", "~/.cache/deepseek_v4_jax", "Where the embedded corpus is prepared.")
flags.DEFINE_integer("data_workers", 0, "grain prefetch processes (0: in-process).")
flags.DEFINE_string("compilation_cache", "~/.cache/deepseek_v4_jax/xla",
                    "Persistent XLA compilation cache directory ('' disables).")
flags.DEFINE_bool("plot", True, "At the end of the run, draw <workdir>/metrics.png (tools.plot_metrics).")
flags.DEFINE_bool("tensorboard", True, "Also write TensorBoard event files to <workdir>/tensorboard.")
flags.DEFINE_bool("progress", None, "Progress bar (default: when stderr is a terminal; else log lines).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool("distributed_auto", False, "Multi-process: read the cluster from the environment (TPU, SLURM, ...).")
flags.DEFINE_list("debug_nan_at_steps", [], "Testing only: make the loss NaN at these steps.")

SETTING_FLAGS = [f.name for f in dataclasses.fields(train.TrainSettings)]


def _fail(msg: str) -> None:
    """A user mistake: one line on stderr, exit status 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


# ---- synthetic data -----------------------------------------------------------------------------------


class SyntheticIterator:
    """Deterministic packed batches of a learnable pattern (x_{i+1} = (a * x_i + c) mod m per document).

    Row r of global batch i depends only on (seed, i, r), so every process builds exactly its own rows of the
    same global batch whatever the process count, and the state is the index of the next batch. This process
    holds global rows [first_row, first_row + batch_size).
    """

    def __init__(self, batch_size: int, seq_len: int, seed: int, vocab: int, first_row: int = 0):
        self.batch_size, self.seq_len, self.seed, self.first_row = batch_size, seq_len, seed, first_row
        self.modulus = min(vocab - 2, 997)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        index = self.index
        self.index += 1
        b, t = self.batch_size, self.seq_len
        out = {k: np.zeros((b, t), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        for row in range(b):
            rng = np.random.default_rng([self.seed, index, self.first_row + row])
            pos, seg = 0, 0
            while pos < t:
                n = int(rng.integers(8, 2 * t))  # document length (BOS + text + EOS) before cutting to the row
                seg += 1
                x = int(rng.integers(0, self.modulus))
                doc = [0]
                for _ in range(n - 2):
                    doc.append(x + 2)
                    x = (31 * x + 7) % self.modulus
                doc.append(1)
                m = min(len(doc) - 1, t - pos)
                out["tokens"][row, pos:pos + m] = doc[:m]
                out["targets"][row, pos:pos + m] = doc[1:m + 1]
                out["segment_ids"][row, pos:pos + m] = seg
                out["positions"][row, pos:pos + m] = np.arange(m)
                pos += m
        return out

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index, "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
                "first_row": self.first_row}

    def set_state(self, state: dict[str, Any]) -> None:
        mine = self.get_state()
        changed = [k for k in ("batch_size", "seq_len", "seed", "first_row") if state.get(k, 0) != mine[k]]
        if changed:
            raise ValueError(f"cannot resume synthetic data under different {', '.join(changed)}")
        self.index = int(state["index"])


# ---- helpers ------------------------------------------------------------------------------------------


def _settings_from_flags() -> train.TrainSettings:
    values = {name: FLAGS[name].value for name in SETTING_FLAGS}
    if values["warmup_steps"] is None:
        values["warmup_steps"] = max(1, FLAGS.steps // 10) if FLAGS.steps > 1 else 0
    return train.TrainSettings(**values)


def _check_flags() -> None:
    """Flag values that TrainSettings / Config do not own."""
    positive = ("batch_size", "seq_len", "save_every", "keep_checkpoints", "log_every", "max_bad_steps")
    for name in positive:
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
    if FLAGS.batch_size % FLAGS.grad_accum:
        raise ValueError(f"--batch_size ({FLAGS.batch_size}) must be divisible by --grad_accum ({FLAGS.grad_accum})")
    if FLAGS.peak_flops is not None and not FLAGS.peak_flops > 0:
        raise ValueError(f"--peak_flops must be positive, got {FLAGS.peak_flops}")
    if FLAGS.data_weights is not None:
        try:
            [float(w) for w in FLAGS.data_weights]
        except ValueError:
            raise ValueError(f"--data_weights takes comma-separated numbers, got {FLAGS.data_weights}") from None
    try:
        [int(s) for s in FLAGS.debug_nan_at_steps]
    except ValueError:
        raise ValueError(f"--debug_nan_at_steps takes comma-separated integers, got {FLAGS.debug_nan_at_steps}") \
            from None


def _make_data(cfg, process_index: int, process_count: int):
    per_process = FLAGS.batch_size // process_count
    if FLAGS.data == "synthetic":
        return SyntheticIterator(per_process, FLAGS.seq_len, FLAGS.seed, cfg.vocab_size,
                                 first_row=process_index * per_process)
    if FLAGS.data == "shakespeare":
        dirs = [data.default_corpus(FLAGS.data_cache, progress=process_index == 0)]
    else:
        dirs = [d for d in FLAGS.data.split(",") if d]
    weights = None if FLAGS.data_weights is None else [float(w) for w in FLAGS.data_weights]
    return data.make_train_iterator(dirs, weights, FLAGS.seq_len, per_process, FLAGS.seed, process_index,
                                    process_count, FLAGS.data_workers)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class _Stop:
    """SIGTERM / SIGINT handler: the loop finishes its step, saves and exits; a second signal aborts."""

    def __init__(self):
        self.signal: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing the current step, saving, exiting",
              file=sys.stderr, flush=True)


# ---- main ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # Orbax logs every save at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        cfg = config_flags.config_from_flags()
        settings = _settings_from_flags()
        _check_flags()
    except ValueError as e:
        _fail(str(e))
    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir or os.path.join("runs", FLAGS.config)))
    nan_steps = {int(s) for s in FLAGS.debug_nan_at_steps}
    try:
        mesh_lib.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  auto=FLAGS.distributed_auto)
    except ValueError as e:
        _fail(str(e))
    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=FLAGS.keep_checkpoints)
    try:
        changed = ckpt.check_config(cfg)
        mesh = mesh_lib.make_mesh(FLAGS.mesh or None)
    except ValueError as e:
        _fail(str(e))
    dp = 1
    for axis in ("data", "fsdp", "expert"):
        dp *= mesh.shape[axis]
    micro = FLAGS.batch_size // FLAGS.grad_accum
    if micro % dp:
        _fail(f"the microbatch (batch_size / grad_accum = {micro}) must be divisible by the data-parallel "
              f"mesh size ({dp})")
    if FLAGS.batch_size % jax.process_count():
        _fail(f"--batch_size ({FLAGS.batch_size}) must be divisible by the process count ({jax.process_count()})")
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
        _write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    _run(cfg, settings, workdir, ckpt, mesh, nan_steps, primary, changed)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _run(cfg, settings, workdir, ckpt, mesh, nan_steps, primary, changed: list[str]) -> None:
    stop = _Stop()  # from here on SIGTERM / SIGINT mean: take (at least) one step, save, exit 0
    with jax.set_mesh(mesh):
        def build():
            return DeepseekV4(cfg, rngs=nnx.Rngs(FLAGS.seed))

        plan = train.plan_state(build, settings, mesh)
        graphdef, tx, abstract = plan.graphdef, plan.tx, plan.abstract
        try:
            restored = ckpt.restore(plan.target, config=cfg)
        except (ckpt_lib.ConfigMismatchError, ckpt_lib.NoUsableCheckpointError) as e:
            _fail(str(e))
        if restored is None:
            _, state = train.create_state(build, tx, FLAGS.seed, plan.shardings, graphdef=graphdef)
            start = 0
        else:
            state, start = restored.state, restored.step
        if primary:
            print(mesh_lib.describe(mesh), flush=True)
            print(rules.summary(abstract.params, mesh), flush=True)
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
            print(f"model {FLAGS.config}: {n_params:,} parameters; workdir {workdir}", flush=True)
        if start >= settings.steps:
            print(f"the run in {workdir} is complete at step {start} (--steps={settings.steps}); "
                  "raise --steps to continue", flush=True)
            ckpt.close()
            return
        data_iter = _make_data(cfg, jax.process_index(), jax.process_count())
        if restored is not None and restored.data_state is not None:
            try:
                data_iter.set_state(restored.data_state)
            except ValueError as e:
                _fail(str(e))
        if primary:
            print(("resuming from step " + str(start)) if restored else "starting from scratch", flush=True)
            if restored and changed:
                print("resuming under other execution settings: " + "; ".join(changed), flush=True)

        batch_sharding = rules.named_sharding(("batch", "seq"), mesh, "activation")
        steps = {}

        def step_fn(step: int):
            sparse = train.sparse_at(settings, step)
            if sparse not in steps:
                steps[sparse] = train.make_train_step(graphdef, cfg, tx, settings, sparse=sparse)
            return steps[sparse]

        peak = FLAGS.peak_flops
        peak_source = "--peak_flops"
        if peak is None:
            peak, peak_source = metrics.default_peak_flops()
        n_devices = mesh.size
        writer = (metrics.MetricsWriter(workdir, resume_step=start if restored else None,
                                        tensorboard=FLAGS.tensorboard) if primary else None)
        tokens_per_step = FLAGS.batch_size * FLAGS.seq_len
        progress = _Progress(start, settings.steps, primary)
        if primary:
            print(f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source}), {n_devices} device(s)",
                  flush=True)

        bad_streak = 0
        window: list[dict[str, Any]] = []
        timed_steps, t_window = 0, time.perf_counter()
        last_saved = start if restored else None
        step = start
        prev = None  # (step, metrics) of the last step whose `update_ok` has not been looked at yet

        def check(done: int, m: dict[str, Any]) -> bool:
            """Count a skipped update; True once --max_bad_steps happened in a row."""
            nonlocal bad_streak
            bad_streak = 0 if bool(m["update_ok"]) else bad_streak + 1
            if bad_streak:
                print(f"step {done}: non-finite loss or gradients, update skipped ({bad_streak} in a row)",
                      file=sys.stderr, flush=True)
            return bad_streak >= FLAGS.max_bad_steps

        def save(at: int) -> None:
            nonlocal last_saved
            ckpt.save(at, state, config=cfg, data_state=data_iter.get_state(),
                      meta={"settings": settings.to_dict(), "mesh": dict(mesh.shape)})
            last_saved = at

        while step < settings.steps:
            batch = data.to_global(next(data_iter), batch_sharding)
            multiplier = jnp.float32(np.nan if (step + 1) in nan_steps else 1.0)
            compiles = train.sparse_at(settings, step) not in steps
            state, m = step_fn(step)(state, batch, multiplier)
            step += 1
            window.append(m)
            if compiles:  # keep compilation out of the throughput numbers
                jax.block_until_ready(m)
                timed_steps, t_window = 0, time.perf_counter()
            else:
                timed_steps += 1
            if prev is not None and check(*prev):  # the previous step is done by now: no pipeline stall
                break
            prev = (step, m)
            log_now = step % FLAGS.log_every == 0 or step == settings.steps
            save_now = step % FLAGS.save_every == 0 or step == settings.steps or stop.signal is not None
            if log_now or save_now:
                prev = None
                if check(step, m):
                    break
            if log_now:
                rec = _summarise(window, timed_steps, time.perf_counter() - t_window, tokens_per_step, cfg,
                                 settings, step, peak, n_devices)
                if writer:
                    writer.write(step, rec)
                progress.log(step, rec)
                window, timed_steps, t_window = [], 0, time.perf_counter()
            progress.advance(step)
            if save_now:
                t_save = time.perf_counter()
                save(step)
                t_window += time.perf_counter() - t_save  # the blocking part of a save is not step time
            if stop.signal is not None:
                break

        progress.close()
        if bad_streak >= FLAGS.max_bad_steps:
            ckpt.close()
            msg = (f"stopping: {bad_streak} consecutive steps had a non-finite loss or gradients (last: step "
                   f"{step}); the newest checkpoint is step {ckpt.latest_step()}")
            print(f"error: {msg}", file=sys.stderr, flush=True)
            if writer:
                writer.close()
            sys.exit(1)
        if stop.signal is not None and last_saved != step:
            save(step)
        ckpt.close()
        if writer:
            writer.close()
        if primary:
            why = f"stopped by {signal.Signals(stop.signal).name}" if stop.signal is not None else "done"
            print(f"{why} at step {step}; checkpoint {ckpt.latest_step()} in {workdir}", flush=True)
            if FLAGS.plot and stop.signal is None:
                _plot(workdir)


def _plot(workdir: str) -> None:
    """Draw <workdir>/metrics.png with tools.plot_metrics (its own process: matplotlib stays out of the trainer)."""
    p = subprocess.run([sys.executable, "-m", "tools.plot_metrics", workdir], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if p.returncode == 0:
        print(f"curves: {os.path.join(workdir, 'metrics.png')}", flush=True)
    else:
        lines = (p.stderr or p.stdout).strip().splitlines()
        print(f"warning: could not draw the curves: {lines[-1] if lines else p.returncode}", flush=True)


def _summarise(window, timed_steps, seconds, tokens_per_step, cfg, settings, step, peak,
               n_devices) -> dict[str, Any]:
    """One metrics record from the steps since the last one (losses averaged over steps that updated)."""
    host = jax.device_get(window)
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
    rec["sparse_attention"] = train.sparse_at(settings, step - 1)
    rec["nonpad_fraction"] = float(np.sum([m["tokens"] for m in host]) / (tokens_per_step * len(host)))
    if timed_steps:
        rec["tokens_per_s"] = tokens_per_step * timed_steps / max(seconds, 1e-9)
        flops = metrics.train_flops_per_token(cfg, FLAGS.seq_len, sparse_attention=rec["sparse_attention"])
        rec["mfu"] = rec["tokens_per_s"] * flops / (peak * n_devices)
    rec["tokens_seen"] = step * tokens_per_step
    return rec


class _Progress:
    """A tqdm bar on a terminal, otherwise one log line per record (both with rate and ETA)."""

    def __init__(self, start: int, total: int, primary: bool):
        self.primary = primary
        self.total = total
        self.start = start
        self.t0 = time.perf_counter()
        use_bar = FLAGS.progress if FLAGS.progress is not None else sys.stderr.isatty()
        self.bar = None
        if primary and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, rec: dict[str, Any]) -> None:
        if not self.primary:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        speed = (f"{rec['tokens_per_s']:.0f} tok/s mfu {100 * rec['mfu']:.2f}%" if "tokens_per_s" in rec
                 else "compiling")
        line = (f"step {step}/{self.total} loss {rec['loss']:.4f} mtp {rec['mtp_loss']:.4f} "
                f"grad_norm {rec['grad_norm']:.3f} lr {rec['lr']:.2e} {speed} eta {_fmt_time(eta)}")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    app.run(main)
