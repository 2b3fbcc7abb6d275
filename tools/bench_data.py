"""Input-pipeline benchmark: packing efficiency, loader throughput, and what the train step consumes.

    python -m tools.bench_data [--data_dirs=DIR,...] [--seq_len=1024] [--batch_size=8] [--num_workers=0,2]

Without --data_dirs it uses the embedded Shakespeare corpus (prepared on first use in --cache_dir).
Reference in the same run: grain's own `BestFitPackIterDataset` (64 bins) on the same pieces, so the
efficiency and throughput ratios compare our packer against the stock one. If `deepseek_v4.train` can build
and run the `--preset` train step, its tokens/s is measured too and the loader's headroom is printed;
otherwise the tool says why it is unavailable.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable, Iterator

import grain
from absl import app, flags

from deepseek_v4 import data


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program (absl flags are
    process-global, and other programs and the tests import this module)."""
    flags.DEFINE_list("data_dirs", None, "Prepared directories; default: the embedded corpus (train).")
    flags.DEFINE_string("cache_dir", "~/.cache/deepseek_v4_jax", "Where the embedded corpus is prepared.")
    flags.DEFINE_integer("seq_len", 1024, "Row length T.")
    flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
    flags.DEFINE_list("num_workers", ["0"], "Loader worker counts to measure.")
    flags.DEFINE_float("seconds", 5.0, "Measuring time per throughput case (after warmup).")
    flags.DEFINE_string("preset", "nano", "Config preset whose train step is timed.")
    flags.DEFINE_integer("train_steps", 5, "Timed train steps (after one compile step).")


def _grain_reference(dirs: list[str], seq_len: int, batch_size: int, num_epochs: int | None) -> Iterator[dict]:
    """The same pieces, packed by grain's BestFitPackIterDataset (flushes all bins when one piece does not fit)."""
    ds = data.open_dataset(dirs[0])
    source = data.PieceSource(ds, seq_len, seed=0, process_index=0, process_count=1)
    pieces = grain.MapDataset.range(source.stream_length(num_epochs)).map(source)
    packed = grain.experimental.BestFitPackIterDataset(
        pieces.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)),
        length_struct={"tokens": seq_len, "targets": seq_len},
        num_packing_bins=data.PACKING_BINS,
    )
    renamed = packed.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"]})
    return iter(renamed.batch(batch_size))


def _epoch_efficiency(batches: Iterator[dict]) -> tuple[float, int]:
    """Non-padding fraction over a whole epoch (padding rows of a short last batch excluded), tokens."""
    used = total = 0
    for b in batches:
        seg = b["segment_ids"]
        rows = seg[(seg > 0).any(axis=1)]
        used += int((rows > 0).sum())
        total += rows.size
    return used / total, used


def _throughput(make: Callable[[], Iterator[dict]], seconds: float) -> tuple[float, float, float]:
    """(row positions/s, non-padding tokens/s, seconds to the first batch) in steady state."""
    start = time.perf_counter()
    it = make()
    next(it)
    first = time.perf_counter() - start
    for _ in range(3):
        next(it)
    positions = used = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        b = next(it)
        positions += b["segment_ids"].size
        used += int((b["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
    if hasattr(it, "close"):
        it.close()
    return positions / elapsed, used / elapsed, first


def _train_step_tokens_per_s(
    preset: str, seq_len: int, batch_size: int, steps: int, batches: Iterator[dict]
) -> tuple[float | None, str]:
    """Tokens/s of the preset's jitted train step on loader batches, or (None, why it is unavailable).

    Follows experiments/pretrain.py: a mesh over the local devices, the state built sharded, global batches.
    """
    try:
        import jax
        from flax import nnx

        from deepseek_v4 import DeepseekV4, get_config, train
        from sharding import mesh as mesh_lib
        from sharding import rules

        cfg = get_config(preset)
        settings = train.TrainSettings(steps=1000, warmup_steps=1)
        mesh = mesh_lib.make_mesh(None)
        with jax.set_mesh(mesh):

            def build():
                return DeepseekV4(cfg, rngs=nnx.Rngs(0))

            abstract_params = nnx.state(nnx.eval_shape(build), nnx.Param)
            specs = jax.tree.map(lambda x: x.spec, rules.param_shardings(abstract_params, mesh))
            tx = train.make_optimizer(settings, mesh=mesh, partition_specs=specs)
            graphdef, abstract = train.abstract_state(build, tx, 0)
            _, state = train.create_state(build, tx, 0, train.state_shardings(abstract, mesh))
            step = train.make_train_step(graphdef, cfg, tx, settings, phase="dense")
            batch_sharding = rules.named_sharding(("batch", "seq"), mesh, "activation")
            state, metrics = step(state, data.to_global(next(batches), batch_sharding))  # compiles
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, data.to_global(next(batches), batch_sharding))
            jax.block_until_ready(metrics)
        return steps * batch_size * seq_len / (time.perf_counter() - start), ""
    except Exception as e:  # noqa: BLE001  (any failure means: not measurable in this checkout)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    seq_len, batch_size = FLAGS.seq_len, FLAGS.batch_size
    try:
        dirs = FLAGS.data_dirs or [data.default_corpus(os.path.expanduser(FLAGS.cache_dir), "train")]
        data.open_dataset(dirs[0])
    except ValueError as e:
        raise SystemExit(f"bench_data: error: {e}") from None
    workers = [int(w) for w in FLAGS.num_workers]
    print(f"data: {', '.join(dirs)}; seq_len {seq_len}, batch {batch_size}, packing bins {data.PACKING_BINS}")

    def ours(num_workers: int = 0, num_epochs: int | None = None) -> Iterator[dict]:
        return data.make_train_iterator(
            dirs[:1], None, seq_len, batch_size, seed=0, num_workers=num_workers, num_epochs=num_epochs
        )

    eff, tokens = _epoch_efficiency(ours(num_epochs=1))
    ref_eff, ref_tokens = _epoch_efficiency(_grain_reference(dirs, seq_len, batch_size, 1))
    assert tokens == ref_tokens, "both packers must see every token of the epoch"
    print(
        f"packing efficiency over one epoch ({tokens:,} tokens): ours {eff:.4%}, "
        f"grain BestFitPack {ref_eff:.4%} (padding x{(1 - eff) / max(1 - ref_eff, 1e-12):.2f} of grain's)"
    )

    ref_rate, ref_used, _ = _throughput(lambda: _grain_reference(dirs, seq_len, batch_size, None), FLAGS.seconds)
    print(f"loader throughput, grain BestFitPack reference: {ref_rate:,.0f} positions/s ({ref_used:,.0f} tokens/s)")
    rates = {}
    for w in workers:
        rate, used, first = _throughput(lambda w=w: ours(num_workers=w), FLAGS.seconds)
        rates[w] = used
        print(
            f"loader throughput, ours, {w} workers: {rate:,.0f} positions/s ({used:,.0f} tokens/s, "
            f"x{rate / ref_rate:.2f} of the reference; first batch after {first:.2f} s)"
        )

    train_rate, why = _train_step_tokens_per_s(FLAGS.preset, seq_len, batch_size, FLAGS.train_steps, ours())
    if train_rate is None:
        print(f"train step ({FLAGS.preset}): unavailable ({why})")
    else:
        best = max(rates.values())
        print(
            f"train step ({FLAGS.preset}, batch {batch_size}x{seq_len}): {train_rate:,.0f} tokens/s; "
            f"loader headroom x{best / train_rate:.1f}"
        )
    print(
        f"{datetime.date.today()} seq_len {seq_len} batch {batch_size}: efficiency {eff:.4%}, "
        f"tokens/s {', '.join(f'{w}w {r:,.0f}' for w, r in rates.items())}"
    )


if __name__ == "__main__":
    define_flags()
    app.run(main)
