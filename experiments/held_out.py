"""The held-out batches and `Evaluator` of a run (pretraining and `tools.evaluate` share them).

The held-out data has its own iterator (fixed seed, endless, so every process takes the same number of batches):
the training iterator is never read. With `--data=synthetic` the default held-out rows are synthetic rows of
another seed (the embedded corpus's ids may exceed a small test vocabulary); otherwise the default is the embedded
corpus's validation split (two plays the training split does not hold).
"""

from __future__ import annotations

import jax
import numpy as np

from deepseek_v4 import data, evaluation, tokenizer
from deepseek_v4.synthetic import SyntheticIterator
from sharding import host_data

HELD_OUT_SEED = 0  # the held-out order does not follow --seed: runs with other seeds evaluate on the same rows
SYNTHETIC_SEED_OFFSET = 1_000_003  # synthetic held-out rows: a seed no training run of a small --seed uses


def check_data(ev: evaluation.EvalSettings) -> None:
    """Raise a one-line ValueError if an `--eval_data` directory is not a prepared dataset (before any compile)."""
    for d in (d for d in ev.eval_data.split(",") if d):
        try:
            data.open_dataset(d)
        except ValueError as e:
            raise ValueError(f"--eval_data: {e}") from None


def held_out_batches(ev: evaluation.EvalSettings, *, train_data: str, seq_len: int, batch_size: int,
                     seed: int, vocab_size: int, data_cache: str,
                     batch_sharding: jax.sharding.Sharding | None = None) -> tuple[list[dict[str, np.ndarray]],
                                                                         np.ndarray | None]:
    """This process's `ev.eval_batches` held-out batches and the token byte table (None for synthetic rows).

    Args:
      batch_size: global rows per batch (split over processes like the training batch).
      batch_sharding: the batch layout; its row groups (`host_data.row_group`) split the rows (default: one part
        per process).

    Raises:
      ValueError: a held-out directory that is not a prepared dataset, or too small for the process count.
    """
    group = host_data.row_group(batch_sharding) if batch_sharding is not None else None
    pid, count = (group.index, group.count) if group else (jax.process_index(), jax.process_count())
    per_process = batch_size // count
    if not ev.eval_data and train_data == "synthetic":
        it = SyntheticIterator(per_process, seq_len, seed + SYNTHETIC_SEED_OFFSET, vocab_size,
                               first_row=pid * per_process)
        return evaluation.take_batches(it, ev.eval_batches), None
    dirs = ([d for d in ev.eval_data.split(",") if d] if ev.eval_data
            else [data.default_corpus(data_cache, "validation", progress=pid == 0)])
    it = data.make_train_iterator(dirs, None, seq_len, per_process, HELD_OUT_SEED, pid, count)
    table = tokenizer.get_tokenizer().byte_lengths()
    return evaluation.take_batches(it, ev.eval_batches), table[:vocab_size]


def make_evaluator(ev: evaluation.EvalSettings, *, graphdef, batch_sharding: jax.sharding.Sharding, loss_chunk: int,
                   train_data: str, seq_len: int, batch_size: int, seed: int, vocab_size: int,
                   data_cache: str) -> evaluation.Evaluator:
    """An `Evaluator` on the held-out batches `ev` names (see `held_out_batches`)."""
    batches, table = held_out_batches(ev, train_data=train_data, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                      vocab_size=vocab_size, data_cache=data_cache, batch_sharding=batch_sharding)
    return evaluation.Evaluator(graphdef, batches, batch_sharding, byte_lengths=table, loss_chunk=loss_chunk,
                                settings=ev)


def for_run(run, ev: evaluation.EvalSettings) -> evaluation.Evaluator | None:
    """The evaluator of a `run.Run` (None when `--eval_every=0` or the run is already complete)."""
    if ev.eval_every == 0 or run.complete:
        return None
    opts = run.opts
    return make_evaluator(ev, graphdef=run.plan.graphdef, batch_sharding=run.batch_sharding,
                          loss_chunk=run.settings.loss_chunk, train_data=opts.data, seq_len=opts.seq_len,
                          batch_size=opts.batch_size, seed=opts.seed, vocab_size=run.cfg.vocab_size,
                          data_cache=opts.data_cache)
