"""Dense attention, pure JAX: the specification of the Pallas kernels.

Each query attends, in one softmax with a per-head sink, to its sliding window of raw keys and to
every admissible compressed entry: entry c is admissible for query t iff entry_end[c] <= t and
entry_segment[c] == segment_ids[t] (entry_end defaults to (c + 1) * m - 1: windows aligned to the row), with t
the query's absolute position: its row plus `query_offset` (the window stays in rows).
It serves HCA layers, CSA's
dense phase (ratio 4, every admissible entry, no top-k) and sliding-window layers (C = 0), so any ratio
works.

Memory: queries are processed in blocks of max(window, 64) against the previous and the current
key block and all C entries; a block's state is rematerialised in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention_base.common import (
    PAD_SEGMENT,
    admissible_mask,
    pad_axis,
    query_offset_array,
    reference_query_block,
    row_aligned_entry_end,
    sink_softmax,
    tie_to,
    window_keys,
    window_mask,
)


def _dense(q, kv, entries, entry_segment, sink, segment_ids, *, ratio: int, window: int, with_mass: bool,
           entry_end=None, query_offset=0, block_fn=None, block_args=()):
    B, T, N, H = q.shape
    scale = H**-0.5
    block = reference_query_block(window)
    nb = -(-T // block)
    Tp = nb * block
    seg = pad_axis(segment_ids.astype(jnp.int32), 1, Tp, PAD_SEGMENT)
    keys, key_pos, key_seg = window_keys(pad_axis(kv, 1, Tp), seg, block)
    q_blocks = pad_axis(q, 1, Tp).reshape(B, nb, block, N, H).swapaxes(0, 1)
    q_pos = jnp.arange(Tp).reshape(nb, block)
    q_seg = seg.reshape(B, nb, block).swapaxes(0, 1)
    if entry_end is None:
        entry_end = row_aligned_entry_end(entry_segment, ratio)
    entry_segment, entry_end = entry_segment.astype(jnp.int32), entry_end.astype(jnp.int32)
    offset = query_offset_array(query_offset)

    def probabilities(q_i, keys_i, kpos_i, kseg_i, qpos_i, qseg_i, tied=()):
        layout = (qpos_i, qseg_i, entry_segment, entry_end, offset)
        qpos_i, qseg_i, e_seg, e_end, off = tie_to(layout, q_i, keys_i, *tied)
        z_win = jnp.einsum("bqnh,bkh->bqnk", q_i, keys_i, preferred_element_type=jnp.float32)
        z_ent = jnp.einsum("bqnh,bch->bqnc", q_i, entries, preferred_element_type=jnp.float32)
        mask = jnp.concatenate(
            [
                window_mask(qpos_i, qseg_i, kpos_i, kseg_i, window),
                admissible_mask(qpos_i + off, qseg_i, e_seg, e_end),
            ],
            axis=-1,
        )
        p = sink_softmax(jnp.concatenate([z_win, z_ent], axis=-1) * scale, mask[:, :, None, :], sink)
        return p[..., : 2 * block], p[..., 2 * block :]

    xs = (q_blocks, keys, key_pos, key_seg, q_pos, q_seg)
    if block_fn is not None:  # per query block: block_fn(mass, q_pos, q_seg, *block_args)
        args = tuple(pad_axis(a, 1, Tp).reshape(B, nb, block, *a.shape[2:]).swapaxes(0, 1) for a in block_args)

        def reduce_block(xs_i):
            _, p_ent = probabilities(*xs_i[:6], tied=xs_i[6:])
            return block_fn(jnp.sum(p_ent, axis=2), xs_i[4] + offset, xs_i[5], *xs_i[6:])

        res = lax.map(jax.checkpoint(reduce_block), xs + args)
        return jax.tree.map(lambda r: r.swapaxes(0, 1).reshape(B, Tp, *r.shape[3:])[:, :T], res)

    def one_block(xs):
        keys_i = xs[1]
        p_win, p_ent = probabilities(*xs)
        out = jnp.einsum("bqnk,bkh->bqnh", p_win, keys_i.astype(jnp.float32))
        out += jnp.einsum("bqnc,bch->bqnh", p_ent, entries.astype(jnp.float32))
        if with_mass:
            return out.astype(q.dtype), jnp.sum(p_ent, axis=2)
        return out.astype(q.dtype)

    res = lax.map(jax.checkpoint(one_block), xs)
    if with_mass:
        out, mass = res
        return out.swapaxes(0, 1).reshape(B, Tp, N, H)[:, :T], mass.swapaxes(0, 1).reshape(B, Tp, -1)[:, :T]
    return res.swapaxes(0, 1).reshape(B, Tp, N, H)[:, :T]


def dense_attention(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    entry_segment: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    window: int = 128,
    entry_end: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
) -> jax.Array:
    """Sliding-window attention plus dense attention to every admissible compressed entry.

    Args:
      q: queries, already normed and rotated.
      kv: the shared key/value head, already rotated (the same vector is key and value).
      entries: compressed entries, one per slot.
      entry_segment: document of entry c; -1 = an empty slot (never visible).
      sink: per-head sink logit (adds exp(sink) to the softmax denominator only).
      segment_ids: document ids (0 = padding, treated as one more segment).
      ratio: compression ratio m (tokens per entry).
      window: sliding-window length, counting the query itself.
      entry_end: [B, C] position of the last token entry c pools (>= c * ratio); None = (c + 1) * ratio - 1.
      query_offset: absolute position of query row 0 (int or int32 scalar, may be traced): entry c is
        admissible for row t iff entry_end[c] <= t + query_offset (and same document).

    Returns:
      Attention output, dtype of q.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], entry_segment [B, C] int32, sink [N],
      segment_ids [B, T] int32 -> [B, T, N, H].
    """
    return _dense(q, kv, entries, entry_segment, sink, segment_ids, ratio=ratio, window=window, with_mass=False,
                  entry_end=entry_end, query_offset=query_offset)


def dense_attention_and_entry_mass(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    entry_segment: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    window: int = 128,
    entry_end: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
) -> tuple[jax.Array, jax.Array]:
    """`dense_attention` plus the probability mass each query puts on each compressed entry.

    The mass is summed over heads (so it lies in [0, N]); it is the target of the lightning
    indexer's KL loss in CSA's dense phase (normalise it over C, and stop its gradient, at the
    call site). Non-admissible entries get exactly 0. The [B, T, C] output is quadratic in T: meant
    for the short sequences of the indexer warm-up.

    Shapes:
      as `dense_attention`; returns (out [B, T, N, H], mass [B, T, C] float32).
    """
    return _dense(q, kv, entries, entry_segment, sink, segment_ids, ratio=ratio, window=window, with_mass=True,
                  entry_end=entry_end, query_offset=query_offset)


def entry_mass_by_query_block(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    entry_segment: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    window: int = 128,
    entry_end: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
    block_fn,
    block_args: tuple = (),
):
    """Reduces the head-summed entry mass one query block at a time: memory O(T * block), never [B, T, C].

    For each query block of max(window, 64) tokens calls
    `block_fn(mass [B, Q, C], q_pos [Q], q_seg [B, Q], *args)` (q_pos absolute: row + query_offset) where `args`
    are the matching query blocks of
    `block_args` (arrays [B, T, ...]); each block is rematerialised in the backward pass. The mass is the one
    of `dense_attention_and_entry_mass` (differentiable). Returns block_fn's outputs (each [B, Q, ...]),
    stacked back to [B, T, ...]. Used for the indexer's dense KL objective (docs/training.md).
    """
    return _dense(q, kv, entries, entry_segment, sink, segment_ids, ratio=ratio, window=window, with_mass=True,
                  entry_end=entry_end, query_offset=query_offset, block_fn=block_fn, block_args=block_args)
