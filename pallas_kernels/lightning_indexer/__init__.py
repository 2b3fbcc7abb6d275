"""Lightning indexer: per query, the top-k admissible compressed entries of a CSA layer.

`lightning_indexer(q_idx, k_idx, weights, entry_segment, segment_ids, *, ratio, topk, entry_end=None,
query_offset=0, impl=None)`;
`indexer_scores` (reference only, differentiable) returns the masked [B, T, C] scores for the
indexer's KL loss on short sequences; `block_scores` the same for one block of queries (the dense KL by
blocks); `selected_indexer_scores` (reference, differentiable) the scores of the selected entries only,
[B, T, K] (the sparse phase's selected-set KL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention_base.common import check_entry_end, query_offset_array
from pallas_kernels.dispatch import Impl, check_block_sizes, resolve_impl
from pallas_kernels.lightning_indexer import pallas_gpu, pallas_tpu, reference
from pallas_kernels.lightning_indexer.reference import block_scores, indexer_scores, selected_indexer_scores


def _check(q_idx, k_idx, weights, entry_segment, segment_ids, ratio, topk):
    if q_idx.ndim != 4:
        raise ValueError(f"q_idx must be [B, T, NI, HI], got shape {q_idx.shape}")
    B, T, NI, HI = q_idx.shape
    if k_idx.ndim != 3 or k_idx.shape[0] != B or k_idx.shape[2] != HI:
        raise ValueError(f"k_idx must be [B, C, HI] with B={B}, HI={HI}, got {k_idx.shape}")
    if weights.shape != (B, T, NI):
        raise ValueError(f"weights must be [B, T, NI] = {(B, T, NI)}, got {weights.shape}")
    if entry_segment.shape != k_idx.shape[:2] or not jnp.issubdtype(entry_segment.dtype, jnp.integer):
        raise ValueError(f"entry_segment must be integer [B, C] = {k_idx.shape[:2]}, got {entry_segment.shape}")
    if segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integer [B, T] = {(B, T)}, got {segment_ids.shape}")
    if ratio < 1 or topk < 0:
        raise ValueError(f"need ratio >= 1 and topk >= 0, got ratio={ratio}, topk={topk}")


def lightning_indexer(
    q_idx: jax.Array,
    k_idx: jax.Array,
    weights: jax.Array,
    entry_segment: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    topk: int,
    entry_end: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
    impl: Impl = None,
    block_sizes: pallas_gpu.BlockSizes | pallas_tpu.BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Top-k admissible compressed entries per query, best first; -1 where fewer exist.

    score[t, c] = sum_h weights[t, h] * NI**-0.5 * relu(q_idx[t, h] . k_idx[c]) * HI**-0.5 (float32);
    entry c is admissible for query row t iff entry_end[c] <= t + query_offset and entry_segment[c] ==
    segment_ids[t].
    Runs on what it is given (per shard under a mesh; the score sums over indexer heads, so a shard must hold
    all NI heads). See docs/kernels.md.

    Args:
      q_idx: indexer queries (rotated).
      k_idx: indexer keys, one per compressed entry (rotated).
      weights: per-query head weights (raw `weights_proj` output).
      entry_segment: document of entry c; -1 = an empty slot (never admissible).
      segment_ids: document ids (0 = padding).
      ratio: compression ratio m (tokens per entry).
      topk: entries kept per query; K = min(topk, C) (C = 0 gives K = 0).
      entry_end: position of the last token entry c pools, >= c * ratio; None = (c + 1) * ratio - 1 (row-aligned).
      query_offset: position of query row 0 (a Python int or an int32 scalar, may be traced or negative);
        entry_end is in the same frame (under context parallelism: the whole sequence's).
      impl: "reference", "pallas", "pallas_gpu", "pallas_tpu", or None (Pallas on GPU/TPU, reference on CPU).
      block_sizes: tile sizes of the chosen kernel module (its own `BlockSizes` class).
      interpret: run the Pallas kernel in interpret mode (required for Pallas on CPU).

    Returns:
      topk_idx [B, T, K] int32 (not differentiable; train the indexer with `indexer_scores`).

    Shapes:
      q_idx [B, T, NI, HI], k_idx [B, C, HI], weights [B, T, NI], entry_segment [B, C],
      segment_ids [B, T] -> [B, T, min(topk, C)].
    """
    _check(q_idx, k_idx, weights, entry_segment, segment_ids, ratio, topk)
    check_entry_end(entry_end, entry_segment)
    query_offset_array(query_offset)
    which, interp = resolve_impl(impl, interpret)
    if which == "reference":
        return reference.lightning_indexer(q_idx, k_idx, weights, entry_segment, segment_ids, ratio=ratio, topk=topk,
                                           entry_end=entry_end, query_offset=query_offset)
    module = pallas_gpu if which == "pallas_gpu" else pallas_tpu
    return module.lightning_indexer(
        q_idx, k_idx, weights, entry_segment, segment_ids, ratio=ratio, topk=topk, entry_end=entry_end,
        query_offset=query_offset, block_sizes=check_block_sizes(module, block_sizes), interpret=interp,
    )


__all__ = ["block_scores", "indexer_scores", "lightning_indexer", "selected_indexer_scores"]
