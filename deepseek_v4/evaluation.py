"""Held-out evaluation: loss, MTP loss, bits per byte and loss by token position on a fixed set of batches.

An `Evaluator` takes its batches once, when it is built, from an iterator of its own (never the training one), and
scores the same batches at every call, so two evaluations of the same parameters agree exactly and evaluations of
different steps compare like with like. The forward pass is one jitted function per attention mode (dense or
sparse CSA), compiled on first use; parameters and extras come straight from the train state (not donated).

Reported (means over the tokens that carry a loss, padding excluded):
  eval_loss            next-token cross entropy (nats per token)
  eval_mtp_loss        cross entropy of the MTP modules, averaged over depths (as in training)
  eval_bits_per_byte   sum of next-token losses / ln 2 / UTF-8 bytes of the predicted tokens (with a byte table;
                       BOS, EOS and other added tokens count 0 bytes but keep their loss)
  eval_loss_pos_<lo>-<hi>  next-token loss of the tokens whose position in their document is in [lo, hi); the
                       buckets are 0-1K, 1K-4K, 4K-16K, ... (x4 each), those that start below seq_len

see docs/training.md (held-out evaluation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import data, train
from deepseek_v4 import loss as loss_lib
from deepseek_v4.config import setting

FIRST_BUCKET = 1024  # positions [0, 1K) form the first bucket; each next bucket is 4x as long
BUCKET_GROWTH = 4


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """When and on what a run evaluates (the entry points generate `--eval_*` flags from these fields)."""

    eval_every: int = setting(10, "Steps between held-out evaluations (and at the last step); 0 disables.")
    eval_batches: int = setting(2, "Batches per evaluation (the same batches every time).")
    eval_data: str = setting("", "Held-out data: comma-separated directories written by tools.prepare_data "
                             "(default: the embedded corpus's validation split; with --data=synthetic, synthetic "
                             "rows of another seed).")

    def __post_init__(self):
        if self.eval_every < 0:
            raise ValueError(f"--eval_every must be >= 0, got {self.eval_every}")
        if self.eval_batches < 1:
            raise ValueError(f"--eval_batches must be >= 1, got {self.eval_batches}")

    def due(self, step: int, last_step: int) -> bool:
        """Whether the run evaluates after `step` (every `eval_every` steps and at the last one)."""
        return self.eval_every > 0 and (step % self.eval_every == 0 or step == last_step)


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """[lo, hi) position ranges 0-1K, 1K-4K, 4K-16K, ... that start below `seq_len`."""
    out, lo, hi = [], 0, FIRST_BUCKET
    while lo < seq_len:
        out.append((lo, hi))
        lo, hi = hi, hi * BUCKET_GROWTH
    return out


def _size_name(n: int) -> str:
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def bucket_key(lo: int, hi: int) -> str:
    """The metric name of a position bucket, e.g. eval_loss_pos_1K-4K."""
    return f"eval_loss_pos_{_size_name(lo)}-{_size_name(hi)}"


def take_batches(iterator: Iterator[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    """The next `n` batches of `iterator`, copied (an iterator may reuse its buffers)."""
    return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(n)]


def _sums(params: Any, extras: Any, batch: dict[str, jax.Array], byte_lengths: jax.Array | None, *,
          graphdef: nnx.GraphDef, sparse: bool, edges: tuple[int, ...], chunk: int) -> dict[str, jax.Array]:
    """Loss sums and token counts of one batch (summed over batches on the host, divided at the end).

    Shapes: batch [B, T] entries; byte_lengths [V]; out: scalars, `pos_nll` / `pos_tokens` [buckets].
    """
    model = nnx.merge(graphdef, params, extras)
    out = model.forward_train(batch["tokens"], batch["segment_ids"], batch["positions"], sparse_attention=sparse,
                              indexer_loss=False)
    head = model.head[...]
    weights = train.token_weights(batch)  # [B, T]
    counted = (weights != 0).astype(jnp.float32)
    nll = loss_lib.token_cross_entropy(out.hidden, head, batch["targets"], chunk_size=chunk) * weights  # [B, T]
    bucket = jnp.searchsorted(jnp.asarray(edges, jnp.int32), batch["positions"], side="right") - 1  # [B, T]
    in_bucket = jax.nn.one_hot(bucket, len(edges), dtype=jnp.float32)  # [B, T, buckets]
    sums = {
        "nll": jnp.sum(nll),
        "tokens": jnp.sum(counted),
        "pos_nll": jnp.einsum("bt,btk->k", nll, in_bucket),
        "pos_tokens": jnp.einsum("bt,btk->k", counted, in_bucket),
    }
    if byte_lengths is not None:
        sums["bytes"] = jnp.sum(byte_lengths[batch["targets"]].astype(jnp.float32) * counted)
    for k, hidden in enumerate(out.mtp_hidden, start=1):
        targets_k, weights_k = train.mtp_token_weights(batch, k)
        sums[f"mtp_nll_{k}"] = loss_lib.chunked_cross_entropy(hidden, head, targets_k, weights_k, chunk_size=chunk)
        sums[f"mtp_tokens_{k}"] = jnp.sum((weights_k != 0).astype(jnp.float32))
    return sums


class Evaluator:
    """Scores a train state on fixed held-out batches (see the module docstring).

    Args:
      graphdef: the model's graph (from `train.plan_state`).
      batches: this process's host batches, each a dict of [B, T] arrays in the training batch format.
      batch_sharding: how a global batch is laid out (the run's ("batch", "seq") sharding).
      byte_lengths: [vocab] UTF-8 bytes per token id (`Tokenizer.byte_lengths`); None: no bits per byte.
      loss_chunk: tokens per chunk of head logits.
      settings: when the run evaluates (`due`).
    """

    def __init__(self, graphdef: nnx.GraphDef, batches: Sequence[dict[str, np.ndarray]],
                 batch_sharding: jax.sharding.Sharding, *, byte_lengths: np.ndarray | None = None,
                 loss_chunk: int = loss_lib.DEFAULT_CHUNK, settings: EvalSettings | None = None):
        if not batches:
            raise ValueError("an evaluation needs at least one batch")
        self.settings = settings or EvalSettings()
        self.seq_len = int(batches[0]["tokens"].shape[1])
        self.buckets = position_buckets(self.seq_len)
        self._graphdef, self._chunk = graphdef, loss_chunk
        self._host, self._sharding = list(batches), batch_sharding
        self._global: list[dict[str, jax.Array]] | None = None
        self._table: jax.Array | None = None
        self._byte_lengths = None if byte_lengths is None else np.asarray(byte_lengths, np.int32)
        self._fns: dict[bool, Any] = {}
        self.traces = 0  # how many times the eval function was traced (tests check it stays at one per mode)

    def _fn(self, sparse: bool):
        if sparse not in self._fns:
            edges = tuple(lo for lo, _ in self.buckets)
            body = functools.partial(_sums, graphdef=self._graphdef, sparse=sparse, edges=edges, chunk=self._chunk)

            def traced(*args):
                self.traces += 1
                return body(*args)

            self._fns[sparse] = jax.jit(traced)
        return self._fns[sparse]

    def __call__(self, state: train.TrainState, *, sparse: bool = True) -> dict[str, float]:
        """The eval metrics of `state` (see the module docstring). Call under the run's mesh."""
        if self._global is None:  # on device once, in the run's layout
            self._global = [data.to_global(b, self._sharding) for b in self._host]
            self._table = None if self._byte_lengths is None else jnp.asarray(self._byte_lengths)
        fn = self._fn(sparse)
        per_batch = [fn(state.params, state.extras, b, self._table) for b in self._global]
        totals = jax.tree.map(lambda *xs: np.sum(np.stack(xs), axis=0), *jax.device_get(per_batch))
        return summarise(totals, self.buckets)


def summarise(totals: dict[str, np.ndarray], buckets: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Metric values from summed `_sums` outputs (losses are per-token means; empty buckets are left out)."""
    tokens = max(float(totals["tokens"]), 1.0)
    rec = {"eval_loss": float(totals["nll"]) / tokens}
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in totals if k.startswith("mtp_nll_"))
    if depths:
        rec["eval_mtp_loss"] = float(np.mean([float(totals[f"mtp_nll_{k}"]) / max(float(totals[f"mtp_tokens_{k}"]),
                                                                                    1.0) for k in depths]))
    if "bytes" in totals and float(totals["bytes"]) > 0:
        rec["eval_bits_per_byte"] = float(totals["nll"]) / math.log(2) / float(totals["bytes"])
    for (lo, hi), nll, count in zip(buckets, totals["pos_nll"], totals["pos_tokens"]):
        if count > 0:
            rec[bucket_key(lo, hi)] = float(nll) / float(count)
    rec["eval_tokens"] = int(totals["tokens"])
    return rec
