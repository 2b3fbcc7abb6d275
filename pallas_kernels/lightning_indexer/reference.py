"""Lightning indexer (CSA top-k selection), pure JAX: the specification of the Pallas kernels.

score[t, c] = sum_h weights[t, h] * NI**-0.5 * relu(q_idx[t, h] . k_idx[c]) * HI**-0.5 (float32),
-inf where entry c is not admissible for query row t (entry_end[c] <= t + query_offset and
entry_segment[c] == segment_ids[t]; entry_end defaults to (c + 1) * m - 1, windows aligned to the row;
query_offset, default 0, is the absolute position of row 0).
The top-k keeps K = min(topk, C) entries per query in
descending score order (ties: lower index first); slots whose score is -inf become -1.

The top-k runs block by block over queries, so at most [B, block_q, C] scores exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention_base.common import (
    NEG_INF,
    PAD_SEGMENT,
    admissible_mask,
    pad_axis,
    query_offset_array,
    row_aligned_entry_end,
    tie_to,
)

DEFAULT_BLOCK_Q = 64


def _block_scores(q_i, w_i, qpos_i, qseg_i, k_idx, entry_segment, entry_end):
    """Masked scores of one query block: q_i [B, Q, NI, HI], w_i [B, Q, NI] -> [B, Q, C] float32."""
    NI, HI = q_i.shape[-2:]
    dots = jnp.einsum("bqnh,bch->bqnc", q_i, k_idx, preferred_element_type=jnp.float32)
    w = w_i.astype(jnp.float32) * NI**-0.5
    scores = jnp.einsum("bqnc,bqn->bqc", jax.nn.relu(dots) * HI**-0.5, w)
    return jnp.where(admissible_mask(qpos_i, qseg_i, entry_segment, entry_end), scores, NEG_INF)


def _blocks(q_idx, weights, segment_ids, block_q, query_offset=0):
    B, T, NI, HI = q_idx.shape
    nb = -(-T // block_q)
    Tp = nb * block_q
    q_b = pad_axis(q_idx, 1, Tp).reshape(B, nb, block_q, NI, HI).swapaxes(0, 1)
    w_b = pad_axis(weights, 1, Tp).reshape(B, nb, block_q, NI).swapaxes(0, 1)
    seg_b = pad_axis(segment_ids.astype(jnp.int32), 1, Tp, PAD_SEGMENT).reshape(B, nb, block_q).swapaxes(0, 1)
    pos_b = jnp.arange(Tp, dtype=jnp.int32).reshape(nb, block_q) + query_offset_array(query_offset)
    return (q_b, w_b, pos_b, seg_b), Tp


def indexer_scores(
    q_idx: jax.Array,
    k_idx: jax.Array,
    weights: jax.Array,
    entry_segment: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    entry_end: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
    block_q: int = DEFAULT_BLOCK_Q,
) -> jax.Array:
    """Masked index scores of every (query, entry) pair; differentiable (indexer KL training).

    Rows of early queries (no admissible entry) are all -inf: mask them out of the loss.
    The output is [B, T, C]: meant for the short sequences of the indexer warm-up.

    Shapes:
      q_idx [B, T, NI, HI], k_idx [B, C, HI], weights [B, T, NI], entry_segment [B, C] int32,
      segment_ids [B, T] int32 -> [B, T, C] float32.
    """
    B, T = segment_ids.shape
    xs, Tp = _blocks(q_idx, weights, segment_ids, block_q, query_offset)
    entry_end = row_aligned_entry_end(entry_segment, ratio) if entry_end is None else entry_end.astype(jnp.int32)
    entry_segment = entry_segment.astype(jnp.int32)

    def one_block(xs_i):
        return _block_scores(*xs_i, k_idx, entry_segment, entry_end)

    scores = lax.map(jax.checkpoint(one_block), xs)
    return scores.swapaxes(0, 1).reshape(B, Tp, -1)[:, :T]


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
    block_q: int = DEFAULT_BLOCK_Q,
) -> jax.Array:
    """Top-k admissible compressed entries per query, best first; -1 where fewer exist.

    Args:
      q_idx: indexer queries (rotated).
      k_idx: indexer keys, one per compressed entry (rotated).
      weights: per-query head weights (raw `weights_proj` output).
      entry_segment: document of entry c; -1 = an empty slot (never admissible).
      segment_ids: document ids (0 = padding).
      ratio: compression ratio m (tokens per entry).
      topk: entries kept per query; K = min(topk, C).
      entry_end: position of the last token entry c pools (>= c * ratio); None = (c + 1) * ratio - 1.
      query_offset: absolute position of query row 0 (int or int32 scalar, may be traced).
      block_q: queries scored at once.

    Returns:
      topk_idx [B, T, K] int32.

    Shapes:
      q_idx [B, T, NI, HI], k_idx [B, C, HI], weights [B, T, NI], entry_segment [B, C],
      segment_ids [B, T] -> [B, T, min(topk, C)].
    """
    B, T = segment_ids.shape
    C = k_idx.shape[1]
    K = min(topk, C)
    if K == 0:
        return jnp.zeros((B, T, 0), jnp.int32)
    xs, Tp = _blocks(q_idx, weights, segment_ids, block_q, query_offset)
    entry_end = row_aligned_entry_end(entry_segment, ratio) if entry_end is None else entry_end.astype(jnp.int32)
    entry_segment = entry_segment.astype(jnp.int32)

    def one_block(xs_i):
        values, idx = lax.top_k(_block_scores(*xs_i, k_idx, entry_segment, entry_end), K)
        return jnp.where(values == NEG_INF, -1, idx).astype(jnp.int32)

    idx = lax.map(one_block, xs)
    return idx.swapaxes(0, 1).reshape(B, Tp, K)[:, :T]


def selected_indexer_scores(
    q_idx: jax.Array,
    k_idx: jax.Array,
    weights: jax.Array,
    topk_idx: jax.Array,
    *,
    block_q: int = DEFAULT_BLOCK_Q,
) -> jax.Array:
    """Index scores of the selected entries only; differentiable (the indexer's selected-set KL).

    scores[b, t, k] = score of entry topk_idx[b, t, k] for query t, -inf where the slot is empty (-1).
    The selected keys are gathered one block of queries at a time (rematerialised in the backward pass),
    so memory is O(T * K), never [T, C].

    Shapes:
      q_idx [B, T, NI, HI], k_idx [B, C, HI], weights [B, T, NI], topk_idx [B, T, K] int32 -> [B, T, K] float32.
    """
    B, T, NI, HI = q_idx.shape
    K = topk_idx.shape[-1]
    C = k_idx.shape[1]
    if K == 0 or C == 0:
        return jnp.full((B, T, K), NEG_INF, jnp.float32)
    nb = -(-T // block_q)
    Tp = nb * block_q
    q_b = pad_axis(q_idx, 1, Tp).reshape(B, nb, block_q, NI, HI).swapaxes(0, 1)
    w_b = pad_axis(weights, 1, Tp).reshape(B, nb, block_q, NI).swapaxes(0, 1)
    idx_b = pad_axis(topk_idx.astype(jnp.int32), 1, Tp, -1).reshape(B, nb, block_q, K).swapaxes(0, 1)
    flat_keys = k_idx.reshape(B * C, HI)
    row_offset = (jnp.arange(B, dtype=jnp.int32) * C)[:, None, None]

    def one_block(xs):
        q_i, w_i, idx_i = xs
        rows = (jnp.maximum(idx_i, 0) + row_offset).reshape(-1)
        keys = jnp.take(flat_keys, rows, axis=0, mode="clip").reshape(B, block_q, K, HI)
        dots = jnp.einsum("bqnh,bqkh->bqnk", q_i, keys, preferred_element_type=jnp.float32)
        w = w_i.astype(jnp.float32) * NI**-0.5
        scores = jnp.einsum("bqnk,bqn->bqk", jax.nn.relu(dots) * HI**-0.5, w)
        return jnp.where(idx_i >= 0, scores, NEG_INF)

    scores = lax.map(jax.checkpoint(one_block), (q_b, w_b, idx_b))
    return scores.swapaxes(0, 1).reshape(B, Tp, K)[:, :T]


def block_scores(q_i, w_i, q_pos, q_seg, k_idx, entry_segment, entry_end) -> jax.Array:
    """Masked, differentiable scores of one block of queries against every entry (the dense KL by blocks).

    Shapes:
      q_i [B, Q, NI, HI], w_i [B, Q, NI], q_pos [Q], q_seg [B, Q], k_idx [B, C, HI], entry_segment /
      entry_end [B, C] int32 -> [B, Q, C] float32 (-inf where not admissible).
    """
    layout = (q_pos, q_seg, entry_segment.astype(jnp.int32), entry_end.astype(jnp.int32))
    q_pos, q_seg, entry_segment, entry_end = tie_to(layout, q_i, w_i, k_idx)  # recomputed, not saved per block
    return _block_scores(q_i, w_i, q_pos, q_seg, k_idx, entry_segment, entry_end)
