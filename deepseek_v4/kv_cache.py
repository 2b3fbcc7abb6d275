"""The compressed KV cache of one attention layer, and attention of a chunk of new tokens against it.

Fixed shapes for a cache of `max_len` tokens per sequence (docs/model.md, "Inference cache"):

    every layer: `window` [B, W, H], ring buffer of the rotated K=V head, slot = position % W;
    CSA, HCA:    `feat_kv`, `feat_gate` [B, R, F], compressor features of the last R = 2m (CSA: the open window
                 and the previous one, the overlap) or m (HCA) tokens, slot = position % R;
                 `entries` [B, max_len // m, H], rotated;
    CSA:         `idx_feat_kv`, `idx_feat_gate` [B, 2m, 2 HI], the indexer compressor's tail;
                 `idx_keys` [B, max_len // m, HI].

Each sequence b holds one document whose positions 0 .. n_b - 1 are in the cache (`n` [B], kept by the caller).
A chunk appends `valid_b` tokens at positions n_b .. n_b + valid_b - 1 (the rest of its S rows is padding that
changes nothing): prefill is a loop of chunks, a decode step a chunk of one token. Every stored value is a
function of its position only, so rolling back (speculative decoding) is setting n lower: a slot is read only
for the position it must hold, and rewritten before a query at or after that position can see it.

The chunk reuses the layer's own pieces (`Attention.queries`, `key_value`, `Compressor.features` / `pool`,
`rotate_entries`, `indexer_queries` / `indexer_keys`, `output`) and the kernels' masking rules
(docs/kernels.md): window key j visible to query t iff t - W < j <= t; entry c iff its last token (c+1)m - 1 <= t;
CSA attends to the indexer's top-k of the admissible entries, HCA to all of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_v4 import layers
from deepseek_v4.attention import Attention, Context, EntrySlots
from pallas_kernels.attention_base.common import sink_softmax
from pallas_kernels.lightning_indexer import block_scores


def init_layer_cache(attn: Attention, batch: int, max_len: int) -> dict:
    """Zeroed cache of one attention layer (zeros keep never-written slots finite)."""
    cfg = attn.cfg
    dt = layers.dtype_of(cfg.dtype)
    cache = {"window": jnp.zeros((batch, cfg.sliding_window, cfg.head_dim), dt)}
    if attn.kind != "sliding":
        m = attn.ratio
        width = attn.compressor.wkv.shape[-1]
        tail = 2 * m if attn.kind == "csa" else m
        cache["feat_kv"] = jnp.zeros((batch, tail, width), jnp.float32)
        cache["feat_gate"] = jnp.zeros((batch, tail, width), jnp.float32)
        cache["entries"] = jnp.zeros((batch, max_len // m, cfg.head_dim), dt)
    if attn.kind == "csa":
        width = attn.indexer.compressor.wkv.shape[-1]
        cache["idx_feat_kv"] = jnp.zeros((batch, 2 * m, width), jnp.float32)
        cache["idx_feat_gate"] = jnp.zeros((batch, 2 * m, width), jnp.float32)
        cache["idx_keys"] = jnp.zeros((batch, max_len // m, cfg.index_head_dim), jnp.float32)
    return cache


def layer_cache_bytes(cache: dict) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in cache.values())


def ring_positions(n: jax.Array, size: int) -> jax.Array:
    """Position each slot of a ring of `size` holds when positions < n are written: [B] -> [B, size] (< 0: none)."""
    last = (n - 1)[:, None]
    return last - (last - jnp.arange(size, dtype=jnp.int32)) % size


def ring_append(ring: jax.Array, chunk: jax.Array, n: jax.Array, valid: jax.Array) -> jax.Array:
    """The ring after writing chunk rows 0 .. valid-1 at positions n .. n + valid - 1.

    Shapes: ring [B, R, ...], chunk [B, S, ...], n / valid [B] -> [B, R, ...].
    """
    size, s = ring.shape[1], chunk.shape[1]
    newest = ring_positions(n + valid, size)  # [B, R]
    from_chunk = newest >= n[:, None]
    row = jnp.clip(newest - n[:, None], 0, s - 1)
    row = row.reshape(row.shape + (1,) * (ring.ndim - 2))
    picked = jnp.take_along_axis(chunk, row, axis=1)
    return jnp.where(from_chunk.reshape(row.shape), picked.astype(ring.dtype), ring)


def ring_in_order(ring: jax.Array, n: jax.Array) -> jax.Array:
    """The ring's R slots ordered by position n - R .. n - 1: [B, R, ...] -> [B, R, ...]."""
    size = ring.shape[1]
    slot = (n[:, None] - size + jnp.arange(size, dtype=jnp.int32)) % size
    return jnp.take_along_axis(ring, slot.reshape(slot.shape + (1,) * (ring.ndim - 2)), axis=1)


def _new_entries(compressor, tail_kv, tail_gate, x, n, valid, overlap: bool):
    """Entries whose last token is in the chunk, pooled by the layer's compressor.

    Returns pooled [B, E, width] float32, their positions of last token [B, E] and validity [B, E], with
    E = S // m + 1 candidates (entry ends e0, e0 + m, ... from the first end at or after n).
    """
    m = compressor.ratio
    kv, gate = compressor.features(x)  # [B, S, F]
    tail = tail_kv.shape[1]
    seq_kv = jnp.concatenate([ring_in_order(tail_kv, n), kv], axis=1)  # row j <-> position n - tail + j
    seq_gate = jnp.concatenate([ring_in_order(tail_gate, n), gate], axis=1)
    s = x.shape[1]
    e = (n // m)[:, None] * m + m - 1 + m * jnp.arange(s // m + 1, dtype=jnp.int32)  # [B, E]
    ok = e < (n + valid)[:, None]
    end = e - n[:, None] + tail
    slots = EntrySlots(end=end, segment=jnp.where(ok, 1, -1), start=end - m + 1,
                       has_previous=ok & (e >= 2 * m - 1) if overlap else jnp.zeros_like(ok))
    pooled = compressor.pool(seq_kv, seq_gate, slots)
    return pooled, e, ok, (ring_append(tail_kv, kv, n, valid), ring_append(tail_gate, gate, n, valid))


def _write_entries(store: jax.Array, values: jax.Array, e: jax.Array, ok: jax.Array, m: int) -> jax.Array:
    slot = jnp.where(ok, e // m, store.shape[1])  # out of range = dropped
    b = jnp.broadcast_to(jnp.arange(store.shape[0])[:, None], slot.shape)
    return store.at[b, slot].set(values.astype(store.dtype), mode="drop")


def attend_cached(attn: Attention, x: jax.Array, ctx: Context, n: jax.Array, valid: jax.Array, cache: dict):
    """The attention sub-layer on a chunk, against and into the cache.

    Shapes: x [B, S, D] (normed), ctx.positions [B, S] = n + row, n / valid [B] -> out [B, S, D], new cache.
    """
    cfg = attn.cfg
    x = x.astype(layers.dtype_of(cfg.dtype))
    b, s = x.shape[:2]
    pos = ctx.positions
    cos, sin = attn.rope_tables(pos)
    c_q, q = attn.queries(x, cos, sin)
    kv = attn.key_value(x, cos, sin)
    new = {"window": ring_append(cache["window"], kv, n, valid)}
    window = cfg.sliding_window
    keys = jnp.concatenate([cache["window"], kv], axis=1)  # [B, W + S, H]
    key_pos = jnp.concatenate([ring_positions(n, window), pos], axis=1)
    qp, kp = pos[:, :, None], key_pos[:, None, :]
    win_mask = (kp >= 0) & (kp <= qp) & (kp > qp - window)  # [B, S, W + S]
    z = jnp.einsum("bqnh,bkh->bqnk", q, keys, preferred_element_type=jnp.float32)
    values = keys
    if attn.kind != "sliding":
        m = attn.ratio
        pooled, e, ok, (new["feat_kv"], new["feat_gate"]) = _new_entries(
            attn.compressor, cache["feat_kv"], cache["feat_gate"], x, n, valid, attn.kind == "csa")
        entries = _write_entries(cache["entries"], attn.rotate_entries(pooled, e - m + 1, x.dtype), e, ok, m)
        new["entries"] = entries
        entry_end = (jnp.arange(entries.shape[1], dtype=jnp.int32) + 1) * m - 1  # [C]
        if attn.kind == "hca":
            ent_mask = jnp.broadcast_to(entry_end[None, None, :] <= qp, (b, s, entries.shape[1]))
            z_ent = jnp.einsum("bqnh,bch->bqnc", q, entries, preferred_element_type=jnp.float32)
            ent_values, ent_eq = entries, "bqnk,bkh->bqnh"
        else:
            ipooled, _, _, (new["idx_feat_kv"], new["idx_feat_gate"]) = _new_entries(
                attn.indexer.compressor, cache["idx_feat_kv"], cache["idx_feat_gate"], x, n, valid, True)
            k_idx = _write_entries(cache["idx_keys"], attn.indexer_keys(ipooled, e - m + 1), e, ok, m)
            new["idx_keys"] = k_idx
            q_idx, w_idx = attn.indexer_queries(x, c_q, cos, sin)
            # Query row i sits at position n + i: entry c is admissible iff its end minus n <= i.
            rel_end = entry_end[None, :] - n[:, None]
            scores = block_scores(q_idx, w_idx, jnp.arange(s, dtype=jnp.int32), jnp.ones((b, s), jnp.int32),
                                  k_idx, jnp.ones_like(rel_end), rel_end)  # [B, S, C]
            top, idx = jax.lax.top_k(scores, min(cfg.index_topk, entries.shape[1]))
            ent_mask = top != -jnp.inf  # [B, S, K]
            picked = jnp.where(ent_mask, idx, 0)[..., None]
            ent_values = jnp.take_along_axis(entries[:, None], picked, axis=2)  # [B, S, K, H]
            z_ent = jnp.einsum("bqnh,bqkh->bqnk", q, ent_values, preferred_element_type=jnp.float32)
            ent_eq = "bqnk,bqkh->bqnh"
        z = jnp.concatenate([z, z_ent], axis=-1)
        mask = jnp.concatenate([win_mask, ent_mask], axis=-1)
    else:
        mask, ent_values = win_mask, None
    p = sink_softmax(z * cfg.head_dim**-0.5, mask[:, :, None, :], attn.attn_sink[...])
    n_win = keys.shape[1]
    o = jnp.einsum("bqnk,bkh->bqnh", p[..., :n_win], values.astype(jnp.float32))
    if ent_values is not None:
        o += jnp.einsum(ent_eq, p[..., n_win:], ent_values.astype(jnp.float32))
    return attn.output(o.astype(q.dtype), cos, sin), new
