"""Lightning indexer (CSA top-k selection), pure JAX: the specification of the Pallas kernels.

score[t, c] = sum_h weights[t, h] * NI**-0.5 * relu(q_idx[t, h] . k_idx[c]) * HI**-0.5 (float32),
-inf where entry c is not admissible for query t ((c + 1) * m - 1 <= t and
entry_segment[c] == segment_ids[t]). The top-k keeps K = min(topk, C) entries per query in
descending score order (ties: lower index first); slots whose score is -inf become -1.

The top-k runs block by block over queries, so at most [B, block_q, C] scores exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention_base.common import NEG_INF, PAD_SEGMENT, admissible_mask, pad_axis

DEFAULT_BLOCK_Q = 64


def _block_scores(q_i, w_i, qpos_i, qseg_i, k_idx, entry_segment, ratio):
    """Masked scores of one query block: q_i [B, Q, NI, HI], w_i [B, Q, NI] -> [B, Q, C] float32."""
    NI, HI = q_i.shape[-2:]
    dots = jnp.einsum("bqnh,bch->bqnc", q_i, k_idx, preferred_element_type=jnp.float32)
    w = w_i.astype(jnp.float32) * NI**-0.5
    scores = jnp.einsum("bqnc,bqn->bqc", jax.nn.relu(dots) * HI**-0.5, w)
    return jnp.where(admissible_mask(qpos_i, qseg_i, entry_segment, ratio), scores, NEG_INF)


def _blocks(q_idx, weights, segment_ids, block_q):
    B, T, NI, HI = q_idx.shape
    nb = -(-T // block_q)
    Tp = nb * block_q
    q_b = pad_axis(q_idx, 1, Tp).reshape(B, nb, block_q, NI, HI).swapaxes(0, 1)
    w_b = pad_axis(weights, 1, Tp).reshape(B, nb, block_q, NI).swapaxes(0, 1)
    seg_b = pad_axis(segment_ids.astype(jnp.int32), 1, Tp, PAD_SEGMENT).reshape(B, nb, block_q).swapaxes(0, 1)
    pos_b = jnp.arange(Tp).reshape(nb, block_q)
    return (q_b, w_b, pos_b, seg_b), Tp


def indexer_scores(
    q_idx: jax.Array,
    k_idx: jax.Array,
    weights: jax.Array,
    entry_segment: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
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
    xs, Tp = _blocks(q_idx, weights, segment_ids, block_q)
    entry_segment = entry_segment.astype(jnp.int32)

    def one_block(xs_i):
        return _block_scores(*xs_i, k_idx, entry_segment, ratio)

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
    block_q: int = DEFAULT_BLOCK_Q,
) -> jax.Array:
    """Top-k admissible compressed entries per query, best first; -1 where fewer exist.

    Args:
      q_idx: indexer queries (rotated).
      k_idx: indexer keys, one per compressed entry (rotated).
      weights: per-query head weights (raw `weights_proj` output).
      entry_segment: segment of entry c if its whole window lies in one segment, else -1.
      segment_ids: document ids (0 = padding).
      ratio: compression ratio m (tokens per entry).
      topk: entries kept per query; K = min(topk, C).
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
    xs, Tp = _blocks(q_idx, weights, segment_ids, block_q)
    entry_segment = entry_segment.astype(jnp.int32)

    def one_block(xs_i):
        values, idx = lax.top_k(_block_scores(*xs_i, k_idx, entry_segment, ratio), K)
        return jnp.where(values == NEG_INF, -1, idx).astype(jnp.int32)

    idx = lax.map(one_block, xs)
    return idx.swapaxes(0, 1).reshape(B, Tp, K)[:, :T]
