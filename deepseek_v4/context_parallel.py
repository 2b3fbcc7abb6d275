"""Attention under context parallelism: one V4 attention layer when the sequence is split over `context`.

The sequence arrives in the load-balanced layout of sharding/context.py (rank r holds natural chunks r and
2N-1-r, Tc tokens each). Per-token work (projections, rope, output) runs on those arrays as usual; what looks
along the sequence runs per chunk inside `shard_map` (docs/sharding.md, "Context parallelism"):
  - sliding window: a chunk borrows the last `window` rows of K=V and segment ids of the chunk before it (halo);
  - compressors: a chunk borrows the previous chunk's last m (CSA: 2m) rows of the compressor's projections, so
    an entry whose window straddles the boundary is pooled once, by the chunk holding its last token, exactly as
    on one device (per-document windows come from the natural-order segment ids, docs/packing.md);
  - compressed entries and the indexer's keys: each rank pools its chunks' slots, then all-gathers them over
    `context` into the natural slot order; a query sees them through the usual admissibility rule (entry_end <=
    its sequence position, same document), so the gathered set padded with not-yet-visible entries is the
    rank's visible set; CSA's top-k picks from the whole gathered set (global entry indices).
A chunk's frame is [halo rows; chunk rows]: the kernels run on it and the halo rows' outputs are dropped. The
window is local to the frame; entries keep their sequence positions (entry_end), and the kernels get the
frame's first position as `query_offset` (docs/kernels.md), so every kernel (reference or Pallas) runs here.
`SplitSequence` holds these steps under the method names of `attention.WholeSequence`: `Attention.__call__`
is the one dispatch for both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from deepseek_v4 import attention as attn
from deepseek_v4 import quant, rope
from pallas_kernels.dense_attention import dense_attention, entry_mass_by_query_block
from pallas_kernels.lightning_indexer import block_scores, lightning_indexer, selected_indexer_scores
from pallas_kernels.sparse_attention import selected_entry_mass, sparse_attention
from sharding import context as cp

HALO_SEGMENT = -3  # segment id of the rows before the sequence's first chunk: matches no query, entry or padding
LAYOUT_ENTRY_AXES = ("batch", "seq", "head_dim")  # entries in layout slot order: split over context like tokens
NATURAL_SLOT_AXES = ("batch", "kv_seq")  # slot metadata in natural order: whole on every context rank
TOKEN_HEADS_WHOLE = ("batch", "seq", None, "head_dim")  # queries with every head (sums over heads)
# The sparse steps' arguments (q, kv, segment ids, top-k, entries, sink).
SPARSE_AXES = (attn.Q_AXES, ("batch", "seq", "head_dim"), attn.TOKEN_AXES, attn.SELECTED_AXES, LAYOUT_ENTRY_AXES,
               ("heads",))


def model_granularity(cfg) -> tuple[int, int]:
    """(granularity, halo) of the layout for `cfg`: chunks hold whole compression slots and one window."""
    ratios = [r for r in set(cfg.layer_ratios) | set(cfg.mtp_ratios) if r]
    granularity = max(ratios, default=1)
    return granularity, max(cfg.sliding_window, 2 * cfg.csa_ratio)


def _frames(size: int, halo: int, with_halo: tuple, filled: tuple):
    """Per chunk j in (0, 1): ([halo; chunk] frames of `with_halo` arrays, of `filled` (value, array) pairs), g_j.

    `with_halo` arrays take the previous chunk's last rows (segment ids: HALO_SEGMENT before the first chunk);
    `filled` ones take a constant (their halo rows are only there to line up with the frame).
    """
    tails = [cp.previous_chunk_tails(a, halo, size) for a in with_halo]
    tc = (with_halo[0] if with_halo else filled[0][1]).shape[1] // 2
    out = []
    for j in (0, 1):
        g = cp.chunk_index(j, size)
        frames = []
        for a, t in zip(with_halo, tails):
            h = t[j]
            if jnp.issubdtype(a.dtype, jnp.integer):
                h = jnp.where(g == 0, HALO_SEGMENT, h)
            frames.append(jnp.concatenate([h, a[:, j * tc:(j + 1) * tc]], axis=1))
        for value, a in filled:
            pad = jnp.full((a.shape[0], halo) + a.shape[2:], value, a.dtype)
            frames.append(jnp.concatenate([pad, a[:, j * tc:(j + 1) * tc]], axis=1))
        out.append((frames, g))
    return out, tc


def _both_chunks(per_chunk, halo: int):
    """Drop the halo rows of two chunk outputs and put them back to back: -> [B, 2*Tc, ...] (or a tuple)."""
    if isinstance(per_chunk[0], tuple):
        return tuple(jnp.concatenate([o[k][:, halo:] for o in per_chunk], axis=1) for k in range(len(per_chunk[0])))
    return jnp.concatenate([o[:, halo:] for o in per_chunk], axis=1)


def _entries(size: int, ratio: int, overlap: bool, eps: float, kv, gate, ape, norm_scale, start, end, has_previous):
    """shard_map body: this rank's chunks' compressed entries, [B, 2*Tc/m, c] in layout slot order."""
    halo = (2 if overlap else 1) * ratio
    frames, tc = _frames(size, halo, (kv, gate), ())
    per_chunk = tc // ratio
    out = []
    for (fk, fg), g in frames:
        shift = g * tc - halo
        take = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=g * per_chunk, slice_size=per_chunk,
                                 axis=1)
        slots = attn.EntrySlots(end=take(end) - shift, segment=jnp.zeros_like(take(end)),
                                start=take(start) - shift, has_previous=take(has_previous))
        out.append(attn.pool(fk, fg, ape, norm_scale, slots, ratio, overlap, eps))
    return jnp.concatenate(out, axis=1)


def compressed_entries(compressor, x: jax.Array, slots: attn.EntrySlots, natural_positions: jax.Array,
                       rope_tables, size: int) -> jax.Array:
    """The compressor's entries under context parallelism, rotated by their first token's position, float32.

    Shapes: x [B, T, D] (layout), slots [B, C] (natural), natural_positions [B, T] -> [B, C, c] (layout slot
    order, split over `context` like the tokens).
    """
    kv = (x @ compressor.wkv[...].astype(x.dtype)).astype(jnp.float32)
    gate = (x @ compressor.wgate[...].astype(x.dtype)).astype(jnp.float32)
    body = functools.partial(_entries, size, compressor.ratio, compressor.overlap, compressor.eps)
    width = compressor.norm.scale.shape[0]
    args = (kv, gate, compressor.ape[...], compressor.norm.scale[...], slots.start, slots.end, slots.has_previous)
    axes = (("batch", "seq", None), ("batch", "seq", None), (None, None), (None,)) + (NATURAL_SLOT_AXES,) * 3
    shape = slots.end.shape + (width,)
    entries = attn.per_shard(body, args, axes, LAYOUT_ENTRY_AXES, shape)
    start_pos = cp.to_layout(jnp.take_along_axis(natural_positions, slots.start, axis=1), size)
    cos, sin = rope_tables(start_pos)
    return rope.apply_rope(entries, cos, sin)


def _window_kernel(size, halo, kernel, q, kv, seg, *rest):
    """shard_map body for window-only attention (sliding layers)."""
    frames, _ = _frames(size, halo, (kv, seg), ((0, q),))
    return _both_chunks([kernel(fq, fk, fs, *rest) for (fk, fs, fq), _ in frames], halo)


class SplitSequence:
    """The steps of an attention layer that look along the sequence, with rows split over `context` (layout
    order): the methods of `attention.WholeSequence`, each per chunk frame inside `shard_map`."""

    def __init__(self, layer, ctx):
        self.layer, self.ctx, self.cfg, self.size = layer, ctx, layer.cfg, ctx.context_size
        self.options = attn.kernel_options(layer.cfg)

    def compressed_entries(self, x: jax.Array) -> tuple[attn.EntrySlots, jax.Array]:
        """Slots [B, C] (natural order) and rotated entries [B, C, H] (layout slot order, x's dtype)."""
        layer, ctx = self.layer, self.ctx
        slots = attn.entry_slots(ctx.natural_segment_ids, layer.ratio)
        entries = compressed_entries(layer.compressor, x, slots, ctx.natural_positions, layer.rope_tables,
                                     self.size)
        return slots, entries.astype(x.dtype)

    def indexer_inputs(self, x, c_q, slots, cos, sin):
        """The lightning indexer's queries [B, T, NI, HI], keys [B, C, HI] (layout slot order), head weights."""
        layer = self.layer
        xi, cqi = jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q)
        k_idx = compressed_entries(layer.indexer.compressor, xi, slots, self.ctx.natural_positions,
                                   layer.rope_tables, self.size)
        q_idx, w_idx = layer.indexer_queries(xi, cqi, cos, sin)  # the queries' FP4 QAT happens there
        if self.cfg.quant == "fp4":  # the keys' as in `Attention.indexer_keys` (the release stores them in MXFP4)
            k_idx = quant.fake_quant_mxfp4(k_idx)
        return q_idx, k_idx, w_idx

    def dense_core(self, q, kv, entries, slots, segment_ids) -> jax.Array:
        """Window + every admissible entry (entries None: sliding layers), per chunk. Shapes: -> [B, T, N, H]."""
        cfg, size, layer = self.cfg, self.size, self.layer
        window = halo = cfg.sliding_window
        options = self.options
        sink = layer.attn_sink[...]
        if entries is None:
            def kernel(fq, fk, fs, sink):
                b = fq.shape[0]
                none = jnp.zeros((b, 0), jnp.int32)
                return dense_attention(fq, fk, jnp.zeros((b, 0, cfg.head_dim), fq.dtype), none, sink, fs,
                                       ratio=cfg.csa_ratio, window=window, entry_end=none, **options)

            body = functools.partial(_window_kernel, size, halo, kernel)
            return attn.per_shard(body, (q, kv, segment_ids, sink),
                                  (attn.Q_AXES, ("batch", "seq", "head_dim"), attn.TOKEN_AXES, ("heads",)),
                                  attn.Q_AXES, q.shape)

        def body(q, kv, seg, entries, entry_seg, entry_end, sink):
            frames, tc = _frames(size, halo, (kv, seg), ((0, q),))
            entries = cp.natural_chunks(entries, size)
            outs = [dense_attention(fq, fk, entries, entry_seg, sink, fs, ratio=layer.ratio, window=window,
                                    entry_end=entry_end, query_offset=g * tc - halo, **options)
                    for (fk, fs, fq), g in frames]
            return _both_chunks(outs, halo)

        args = (q, kv, segment_ids, entries, slots.segment, slots.end, sink)
        axes = (attn.Q_AXES, ("batch", "seq", "head_dim"), attn.TOKEN_AXES, LAYOUT_ENTRY_AXES, NATURAL_SLOT_AXES,
                NATURAL_SLOT_AXES, ("heads",))
        return attn.per_shard(body, args, axes, attn.Q_AXES, q.shape)

    def select(self, q_idx, k_idx, w_idx, slots, segment_ids) -> jax.Array:
        """The lightning indexer's top-k [B, T, K] per chunk (global entry indices; no gradient)."""
        cfg, size, ratio, options = self.cfg, self.size, self.layer.ratio, self.options
        k = min(cfg.index_topk, slots.end.shape[1])

        def select(q_idx, w_idx, seg, k_idx, entry_seg, entry_end):
            frames, tc = _frames(size, 0, (), ((0, q_idx), (0, w_idx), (HALO_SEGMENT, seg)))
            k_idx = cp.natural_chunks(k_idx, size)
            return _both_chunks([lightning_indexer(fq, k_idx, fw, entry_seg, fs, ratio=ratio, topk=cfg.index_topk,
                                                   entry_end=entry_end, query_offset=g * tc, **options)
                                 for (fq, fw, fs), g in frames], 0)

        args = tuple(jax.lax.stop_gradient(a) for a in (q_idx, w_idx)) + (
            segment_ids, jax.lax.stop_gradient(k_idx), slots.segment, slots.end)
        axes = (attn.TOKEN_AXES + (None, None), attn.TOKEN_AXES + (None,), attn.TOKEN_AXES, LAYOUT_ENTRY_AXES,
                NATURAL_SLOT_AXES, NATURAL_SLOT_AXES)
        shape = q_idx.shape[:2] + (k,)
        return jax.checkpoint(lambda *a: attn.per_shard(select, a, axes, attn.SELECTED_AXES, shape))(*args)

    def _attend(self, fn, q, kv, seg, topk, entries, sink):
        """shard_map body: `fn` (sparse attention or its selected mass) per chunk frame."""
        size, window = self.size, self.cfg.sliding_window
        frames, _ = _frames(size, window, (kv, seg), ((0, q), (-1, topk)))
        entries = cp.natural_chunks(entries, size)
        return _both_chunks([fn(fq, fk, entries, ft, sink, fs, window=window) for (fk, fs, fq, ft), _ in frames],
                            window)

    def sparse_core(self, q, kv, entries, topk, segment_ids) -> jax.Array:
        kernel = functools.partial(sparse_attention, **self.options)
        return attn.per_shard(functools.partial(self._attend, kernel), self._sparse_args(q, kv, entries, topk,
                                                                                         segment_ids),
                              SPARSE_AXES, attn.Q_AXES, q.shape)

    def _sparse_args(self, q, kv, entries, topk, segment_ids):
        return (q, kv, segment_ids, topk, entries, self.layer.attn_sink[...])

    def selected_mass_and_scores(self, q, kv, entries, topk, segment_ids, q_idx, k_idx, w_idx):
        """The selected-set KL's inputs, [B, T, K]: every head on each shard (the mass sums over heads)."""
        size = self.size
        mass_axes = (TOKEN_HEADS_WHOLE,) + SPARSE_AXES[1:5] + ((None,),)
        mass = attn.per_shard(functools.partial(self._attend, selected_entry_mass),
                              self._sparse_args(q, kv, entries, topk, segment_ids), mass_axes, attn.SELECTED_AXES,
                              topk.shape)

        def scores_body(q_idx, w_idx, topk, k_idx):
            return selected_indexer_scores(q_idx, cp.natural_chunks(k_idx, size), w_idx, topk)

        scores = attn.per_shard(scores_body, (q_idx, w_idx, topk, k_idx),
                                (attn.TOKEN_AXES + (None, None), attn.TOKEN_AXES + (None,), attn.SELECTED_AXES,
                                 LAYOUT_ENTRY_AXES), attn.SELECTED_AXES, topk.shape)
        return mass, scores

    def dense_indexer_kl(self, q, kv, entries, slots, segment_ids, q_idx, k_idx, w_idx, topk):
        """The warm-up's indexer objective (attention.dense_indexer_kl) per chunk frame: per-query KL, recall and
        whether the query has target mass come out of the shard_map; their means are over the whole batch."""
        size, ratio = self.size, self.layer.ratio
        window = halo = self.cfg.sliding_window
        q, kv, entries, sink = (jax.lax.stop_gradient(a) for a in (q, kv, entries, self.layer.attn_sink[...]))

        def body(q, kv, seg, topk, q_idx, w_idx, entries, k_idx, entry_seg, entry_end, sink):
            frames, tc = _frames(size, halo, (kv, seg), ((0, q), (-1, topk), (0, q_idx), (0, w_idx)))
            entries, k_idx = cp.natural_chunks(entries, size), cp.natural_chunks(k_idx, size)

            def block_fn(mass, q_pos, q_seg, q_idx_b, w_idx_b, topk_b):  # q_pos: sequence positions
                scores = block_scores(q_idx_b, w_idx_b, q_pos, q_seg, k_idx, entry_seg, entry_end)
                kl, target, has = attn._kl_terms(mass, scores, jnp.isfinite(scores))
                picked = jnp.sum(jnp.take_along_axis(target, jnp.maximum(topk_b, 0), axis=-1) * (topk_b >= 0), -1)
                return kl, picked, has

            outs = [entry_mass_by_query_block(fq, fk, entries, entry_seg, sink, fs, ratio=ratio, window=window,
                                              entry_end=entry_end, query_offset=g * tc - halo, block_fn=block_fn,
                                              block_args=(fqi, fw, ft))
                    for (fk, fs, fq, ft, fqi, fw), g in frames]
            return _both_chunks(outs, halo)

        args = (q, kv, segment_ids, topk, q_idx, w_idx, entries, k_idx, slots.segment, slots.end, sink)
        axes = (TOKEN_HEADS_WHOLE, ("batch", "seq", "head_dim"), attn.TOKEN_AXES, attn.SELECTED_AXES,
                attn.TOKEN_AXES + (None, None), attn.TOKEN_AXES + (None,), LAYOUT_ENTRY_AXES, LAYOUT_ENTRY_AXES,
                NATURAL_SLOT_AXES, NATURAL_SLOT_AXES, (None,))
        kl, picked, has = attn.per_shard(body, args, axes, [attn.TOKEN_AXES] * 3, [segment_ids.shape] * 3)
        n = jnp.maximum(jnp.sum(has), 1)
        return jnp.sum(jnp.where(has, kl, 0.0)) / n, jnp.sum(jnp.where(has, picked, 0.0)) / n
