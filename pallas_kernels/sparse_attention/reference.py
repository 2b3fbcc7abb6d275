"""Sparse attention, pure JAX: the specification of the Pallas kernels.

Each query attends, in one softmax with a per-head sink, to
* its sliding window of raw keys: t - window < j <= t, same segment (the single shared K=V head `kv`);
* the compressed entries its lightning indexer picked (`topk_idx`, -1 = empty slot).

Memory is linear in T: queries are processed in blocks of max(window, 64) against the previous and
the current key block, and the selected entries are gathered block by block (never a [T, T] or
[T, C] mask). Each block is rematerialised in the backward pass, so the saved state is the inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention_base.common import (
    PAD_SEGMENT,
    pad_axis,
    reference_query_block,
    sink_softmax,
    window_keys,
    window_mask,
)


def sparse_attention(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    topk_idx: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int = 128,
) -> jax.Array:
    """Sliding-window attention plus attention to the top-k selected compressed entries.

    Args:
      q: queries, already normed and rotated.
      kv: the shared key/value head, already rotated (the same vector is key and value).
      entries: compressed entries, one per slot.
      topk_idx: selected entries per query, -1 = empty slot; non-negative indices must be admissible
        for their query and distinct within a query (the lightning indexer guarantees both).
      sink: per-head sink logit (adds exp(sink) to the softmax denominator only).
      segment_ids: document ids (0 = padding, treated as one more segment).
      window: sliding-window length, counting the query itself.

    Returns:
      Attention output, dtype of q.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], topk_idx [B, T, K] int32, sink [N],
      segment_ids [B, T] int32 -> [B, T, N, H].
    """
    return _sparse(q, kv, entries, topk_idx, sink, segment_ids, window=window, with_mass=False)


def sparse_attention_and_selected_mass(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    topk_idx: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """`sparse_attention` plus the probability mass each query puts on each of its selected entries.

    mass[b, t, k] = sum_n p[b, t, n, topk_idx[b, t, k]] (in [0, N]; 0 for empty slots): the target of the
    lightning indexer's selected-set KL loss (normalise over K and stop its gradient at the call site).
    Linear memory: computed block by block from the gathered entries, like the output.

    Shapes:
      as `sparse_attention`; returns (out [B, T, N, H], mass [B, T, K] float32).
    """
    return _sparse(q, kv, entries, topk_idx, sink, segment_ids, window=window, with_mass=True)


def _sparse(q, kv, entries, topk_idx, sink, segment_ids, *, window: int, with_mass: bool):
    B, T, N, H = q.shape
    K = topk_idx.shape[-1]
    scale = H**-0.5
    block = reference_query_block(window)
    nb = -(-T // block)
    Tp = nb * block
    seg = pad_axis(segment_ids.astype(jnp.int32), 1, Tp, PAD_SEGMENT)
    keys, key_pos, key_seg = window_keys(pad_axis(kv, 1, Tp), seg, block)
    q_blocks = pad_axis(q, 1, Tp).reshape(B, nb, block, N, H).swapaxes(0, 1)
    q_pos = jnp.arange(Tp).reshape(nb, block)
    q_seg = seg.reshape(B, nb, block).swapaxes(0, 1)
    idx = pad_axis(topk_idx.astype(jnp.int32), 1, Tp, -1).reshape(B, nb, block, K).swapaxes(0, 1)
    if entries.shape[1] == 0:  # nothing to gather from: every slot is empty
        entries = jnp.zeros((B, 1, H), entries.dtype)
        idx = jnp.full_like(idx, -1)
    C = entries.shape[1]
    flat_entries = entries.reshape(B * C, H)  # one gather over the whole batch
    row_offset = (jnp.arange(B, dtype=jnp.int32) * C)[:, None, None]

    def one_block(xs):
        q_i, keys_i, kpos_i, kseg_i, qpos_i, qseg_i, idx_i = xs
        rows = (jnp.maximum(idx_i, 0) + row_offset).reshape(-1)
        selected = jnp.take(flat_entries, rows, axis=0, mode="clip").reshape(B, block, K, H)
        z_win = jnp.einsum("bqnh,bkh->bqnk", q_i, keys_i, preferred_element_type=jnp.float32)
        z_sel = jnp.einsum("bqnh,bqkh->bqnk", q_i, selected, preferred_element_type=jnp.float32)
        mask = jnp.concatenate([window_mask(qpos_i, qseg_i, kpos_i, kseg_i, window), idx_i >= 0], axis=-1)
        p = sink_softmax(jnp.concatenate([z_win, z_sel], axis=-1) * scale, mask[:, :, None, :], sink)
        p_win, p_sel = p[..., : 2 * block], p[..., 2 * block :]
        out = jnp.einsum("bqnk,bkh->bqnh", p_win, keys_i.astype(jnp.float32))
        out += jnp.einsum("bqnk,bqkh->bqnh", p_sel, selected.astype(jnp.float32))
        if with_mass:
            return out.astype(q.dtype), jnp.sum(p_sel, axis=2)
        return out.astype(q.dtype)

    res = lax.map(jax.checkpoint(one_block), (q_blocks, keys, key_pos, key_seg, q_pos, q_seg, idx))
    if with_mass:
        out, mass = res
        return out.swapaxes(0, 1).reshape(B, Tp, N, H)[:, :T], mass.swapaxes(0, 1).reshape(B, Tp, K)[:, :T]
    return res.swapaxes(0, 1).reshape(B, Tp, N, H)[:, :T]
