"""V4 attention: the shared backbone (sliding window + sink + grouped output) with CSA and HCA extensions.

docs/model.md, "Attention". The heavy math (window + compressed attention, the lightning indexer) lives in
`pallas_kernels`; this module computes their inputs (queries, the shared K=V head, compressed entries,
indexer queries and keys), the indexer's KL objective and the output projection. The pieces are functions
(`entry_slots`, `compress` = `pool` of `compressor_features`, `Attention.queries` / `key_value` /
`compressed_entries` / `rotate_entries` / `indexer_queries` / `indexer_keys` / `dense_core` / `output`) so that
the inference cache (deepseek_v4/kv_cache.py) reuses them. `Attention.__call__` is the layer's one dispatch;
the steps that look along the sequence come from `WholeSequence` (whole rows per device) or, under context
parallelism, `context_parallel.SplitSequence` (docs/sharding.md).

Packed sequences (docs/packing.md): windows never cross a document, and each document is compressed from its
own first token: its entry j pools its tokens [j*m, (j+1)*m) (CSA: plus the previous window of the same
document), is visible to that document's queries from its last token on, and never to another document; a
tail shorter than m gives no entry. Entries sit in slots of a [B, ceil(T/m)] array, slot c holding the entry
whose last token is in rows [c*m, (c+1)*m) (at most one: entries of a row end at least m rows apart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_v4 import layers, quant, rope
from deepseek_v4.config import Config
from pallas_kernels.dense_attention import dense_attention, dense_attention_and_entry_mass, entry_mass_by_query_block
from pallas_kernels.lightning_indexer import block_scores, indexer_scores, lightning_indexer, selected_indexer_scores
from pallas_kernels.sparse_attention import selected_entry_mass, sparse_attention
from sharding import rules

# Logical axes (sharding/rules.py) of the kernel arguments: batch over the data axes, query heads over "tensor".
Q_AXES = ("batch", "seq", "heads", "head_dim")
TOKEN_AXES = ("batch", "seq")
ENTRY_AXES = ("batch", "kv_seq", "head_dim")
ENTRY_SEG_AXES = ("batch", "kv_seq")
SELECTED_AXES = TOKEN_AXES + (None,)
DENSE_ARG_AXES = (Q_AXES, ("batch", "seq", "head_dim"), ENTRY_AXES, ENTRY_SEG_AXES, ENTRY_SEG_AXES, ("heads",),
                  TOKEN_AXES)
SPARSE_ARG_AXES = (Q_AXES, ("batch", "seq", "head_dim"), ENTRY_AXES, SELECTED_AXES, ("heads",), TOKEN_AXES)
# The indexer score sums over indexer heads, so only the batch is split (heads stay whole on each shard).
INDEXER_ARG_AXES = (TOKEN_AXES + (None, None), ENTRY_AXES, SELECTED_AXES, ENTRY_SEG_AXES, ENTRY_SEG_AXES, TOKEN_AXES)


_KERNEL_OPTIONS: dict = {}


@contextlib.contextmanager
def kernel_implementation(impl: str | None, interpret: bool | None = None):
    """Within the block, layers traced call the attention and indexer kernels with this `impl` / `interpret`
    (docs/kernels.md, "Implementation dispatch"), overriding `Config.attention_impl`. Takes effect at trace
    time."""
    saved = dict(_KERNEL_OPTIONS)
    _KERNEL_OPTIONS.update(impl=impl, interpret=interpret)
    try:
        yield
    finally:
        _KERNEL_OPTIONS.clear()
        _KERNEL_OPTIONS.update(saved)


def kernel_options(cfg: Config) -> dict:
    """`impl` / `interpret` of the attention and indexer kernel calls: those of an enclosing
    `kernel_implementation` block, else `cfg.attention_impl` ("auto" = None, the platform's best)."""
    if _KERNEL_OPTIONS:
        return dict(_KERNEL_OPTIONS)
    return {"impl": None if cfg.attention_impl == "auto" else cfg.attention_impl, "interpret": None}


def per_shard(kernel, args, in_axes, out_axes, out_shape):
    """`kernel(*args)` on local shards: under `jax.shard_map` over the active mesh, specs from sharding/rules.py.

    The kernels see local shards only (docs/kernels.md). Without an active mesh (`jax.set_mesh`) or on one
    device this is `kernel(*args)`. Gradients of inputs that a spec leaves replicated over a mesh axis are summed
    over that axis (shard_map's transpose with check_vma=False, which Pallas calls need).

    Args:
      kernel: a kernel entry point with its static arguments bound, taking `args` positionally.
      args: the (global) arrays.
      in_axes: one tuple of logical axis names per argument.
      out_axes: logical axis names of the output, or a list of them (one per output) for a tuple of outputs.
      out_shape: the (global) output shape, or a list of them.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args)
    in_specs = tuple(rules.spec(ax, "activation", shape=a.shape, mesh=mesh) for a, ax in zip(args, in_axes))
    if isinstance(out_axes, list):
        out_spec = tuple(rules.spec(ax, "activation", shape=sh, mesh=mesh) for ax, sh in zip(out_axes, out_shape))
    else:
        out_spec = rules.spec(out_axes, "activation", shape=out_shape, mesh=mesh)
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-forward inputs every layer needs.  Shapes: all [B, T] int32.

    CSA's phase (docs/training.md): `sparse_attention` False = every admissible entry (dense training and the
    indexer warm-up), True = the indexer's top-k. `indexer_loss` computes the indexer's KL and recall: against
    the dense entry distribution when dense, on the selected entries when sparse.
    """

    tokens: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    sparse_attention: bool = True
    indexer_loss: bool = False  # compute the indexer's KL loss and recall (training only)
    # Sparse phase with the earlier objective: KL against the dense entry mass, [B, T, C] tensors (quadratic
    # memory). Only the long-context benchmark's baseline sets it (tools/bench_long_context.py).
    dense_target_in_sparse_phase: bool = False
    # Context parallelism (sharding/context.py): with context_size > 1 the arrays above are in the load-balanced
    # layout and these two hold segment ids and positions in the natural order (the compressors' windows).
    context_size: int = 1
    natural_segment_ids: jax.Array | None = None
    natural_positions: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class EntrySlots:
    """Where the compressed entries of a row come from (docs/packing.md).  Shapes: all [B, C] int32.

    end: row of the entry's last token (c*m <= end < (c+1)*m); segment: its document, -1 = empty slot;
    start: row of its first token (end - m + 1, clipped to 0 for empty slots), whose position rotates it;
    has_previous: bool, the document holds a whole window before this one (CSA's overlap slots).
    """

    end: jax.Array
    segment: jax.Array
    start: jax.Array
    has_previous: jax.Array


def document_offsets(segment_ids: jax.Array) -> jax.Array:
    """Row index minus the row where its run of equal segment ids starts: [B, T] -> [B, T] int32."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return t - jax.lax.cummax(jnp.where(first, t, 0), axis=1)


def entry_slots(segment_ids: jax.Array, ratio: int) -> EntrySlots:
    """Per-document compression windows of a packed row, in C = ceil(T / ratio) slots.

    A document's entry j ends at its token (j+1)*m - 1; a tail shorter than m ends no entry. Padding (segment 0)
    is compressed like one more document, visible only to padding. T >= 1 always gives C >= 1.
    """
    b, t = segment_ids.shape
    c = -(-t // ratio)
    offsets = document_offsets(segment_ids)
    ends_here = (offsets + 1) % ratio == 0  # [B, T]
    ends_here = jnp.pad(ends_here, ((0, 0), (0, c * ratio - t))).reshape(b, c, ratio)
    has = jnp.any(ends_here, axis=-1)
    end = jnp.arange(c, dtype=jnp.int32) * ratio + jnp.argmax(ends_here, axis=-1).astype(jnp.int32)
    end = jnp.where(has, end, jnp.arange(c, dtype=jnp.int32) * ratio + ratio - 1)
    last = jnp.minimum(end, t - 1)
    seg = jnp.take_along_axis(segment_ids, last, axis=1)
    has_previous = has & (jnp.take_along_axis(offsets, last, axis=1) >= 2 * ratio - 1)
    return EntrySlots(end=end, segment=jnp.where(has, seg, -1).astype(jnp.int32),
                      start=jnp.maximum(end - ratio + 1, 0), has_previous=has_previous)


def compress(x: jax.Array, wkv: jax.Array, wgate: jax.Array, ape: jax.Array, norm_scale: jax.Array,
             slots: EntrySlots, ratio: int, overlap: bool, eps: float) -> jax.Array:
    """Token-level compressor: gated, per-channel softmax pooling of each entry's window of `ratio` tokens.

    With `overlap` (CSA and its indexer) every token carries 2*c features: the first half is its contribution
    to the next window's entry, the second half to its own window's entry; an entry pools 2*ratio slots, the
    previous window's only if it lies in the same document (else weight 0, as for a document's first entry).
    Shapes: x [B, T, D]; wkv/wgate [D, w*c] (w = 2 with overlap, else 1); ape [ratio, w*c]; slots [B, C]
      -> entries [B, C, c] float32 (normed, not rotated; empty slots hold finite values nothing sees).
    """
    kv, gate = compressor_features(x, wkv, wgate)
    return pool(kv, gate, ape, norm_scale, slots, ratio, overlap, eps)


def compressor_features(x: jax.Array, wkv: jax.Array, wgate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token compressor features (an inference cache keeps them for its not-yet-compressed tail).

    Shapes: x [B, T, D]; wkv/wgate [D, F] -> kv, gate [B, T, F] float32 (the gate before `ape`).
    """
    return (x @ wkv).astype(jnp.float32), (x @ wgate).astype(jnp.float32)


def pool(kv: jax.Array, gate: jax.Array, ape: jax.Array, norm_scale: jax.Array, slots: EntrySlots, ratio: int,
         overlap: bool, eps: float) -> jax.Array:
    """`compress` on precomputed features: kv, gate [B, T, F] float32, slots [B, C] -> entries [B, C, c]."""
    b, t, _ = kv.shape
    c = slots.end.shape[1]
    rows = slots.start[..., None] + jnp.arange(ratio, dtype=jnp.int32)  # [B, C, m]

    def gather(a, r):  # a [B, T, F], r [B, C, m] -> [B, C, m, F]
        idx = jnp.clip(r, 0, t - 1).reshape(b, c * ratio, 1)
        return jnp.take_along_axis(a, idx, axis=1).reshape(b, c, ratio, a.shape[-1])

    own_kv, own_gate = gather(kv, rows), gather(gate, rows) + ape.astype(jnp.float32)
    if overlap:
        width = kv.shape[-1] // 2
        prev_kv = gather(kv[..., :width], rows - ratio)
        prev_gate = gather(gate[..., :width], rows - ratio) + ape[:, :width].astype(jnp.float32)
        prev_gate = jnp.where(slots.has_previous[..., None, None], prev_gate, -jnp.inf)
        own_kv = jnp.concatenate([prev_kv, own_kv[..., width:]], axis=2)  # [B, C, 2m, c]
        own_gate = jnp.concatenate([prev_gate, own_gate[..., width:]], axis=2)
    pooled = jnp.sum(own_kv * jax.nn.softmax(own_gate, axis=2), axis=2)  # [B, C, c]
    return layers.rms_norm(pooled, norm_scale, eps)


class Compressor(nnx.Module):
    def __init__(self, cfg: Config, ratio: int, width: int, overlap: bool, rngs: nnx.Rngs, norm_axis: str):
        w = (2 if overlap else 1) * width
        dt = layers.dtype_of(cfg.param_dtype)
        self.ratio, self.overlap, self.eps = ratio, overlap, cfg.rms_norm_eps
        self.wkv = layers.normal_param(rngs, (cfg.hidden_size, w), ("embed", "compress_dim"), cfg.initializer_range, dt)
        self.wgate = layers.normal_param(rngs, (cfg.hidden_size, w), ("embed", "compress_dim"), cfg.initializer_range,
                                         dt)
        self.ape = layers.const_param((ratio, w), (None, "compress_dim"), 0.0)
        self.norm = layers.RMSNorm(width, cfg.rms_norm_eps, norm_axis)

    def __call__(self, x: jax.Array, slots: EntrySlots) -> jax.Array:
        """Shapes: x [B, T, D], slots [B, C] -> entries [B, C, width] float32 (normed, not rotated)."""
        return self.pool(*self.features(x), slots)

    def features(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Shapes: x [B, T, D] -> kv, gate [B, T, w*width] float32."""
        return compressor_features(x, self.wkv[...].astype(x.dtype), self.wgate[...].astype(x.dtype))

    def pool(self, kv: jax.Array, gate: jax.Array, slots: EntrySlots) -> jax.Array:
        """Entries from features (`features`): kv, gate [B, T, F], slots [B, C] -> [B, C, width] float32."""
        return pool(kv, gate, self.ape[...], self.norm.scale[...], slots, self.ratio, self.overlap, self.eps)


class Indexer(nnx.Module):
    """The lightning indexer of a CSA layer: its own compressor at index_head_dim, queries from c^Q, head weights."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        dt, std = layers.dtype_of(cfg.param_dtype), cfg.initializer_range
        self.wq_b = layers.normal_param(rngs, (cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim),
                                        ("q_lora", "index_heads", "index_head_dim"), std, dt)
        self.weights_proj = layers.normal_param(rngs, (cfg.hidden_size, cfg.index_n_heads), ("embed", "index_heads"),
                                                std, dt)
        self.compressor = Compressor(cfg, cfg.csa_ratio, cfg.index_head_dim, True, rngs, "index_head_dim")


class Attention(nnx.Module):
    """One attention sub-layer; `ratio` 0 = sliding window only, csa_ratio = CSA, hca_ratio = HCA."""

    def __init__(self, cfg: Config, ratio: int, rngs: nnx.Rngs):
        self.cfg, self.ratio = cfg, ratio
        self.kind = cfg.layer_kind(ratio)
        dt, std = layers.dtype_of(cfg.param_dtype), cfg.initializer_range
        d, q, n, h, g, o = (cfg.hidden_size, cfg.q_lora_rank, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups,
                            cfg.o_lora_rank)
        self.wq_a = layers.normal_param(rngs, (d, q), ("embed", "q_lora"), std, dt)
        self.q_norm = layers.RMSNorm(q, cfg.rms_norm_eps, "q_lora")
        self.wq_b = layers.normal_param(rngs, (q, n, h), ("q_lora", "heads", "head_dim"), std, dt)
        self.wkv = layers.normal_param(rngs, (d, h), ("embed", "head_dim"), std, dt)
        self.kv_norm = layers.RMSNorm(h, cfg.rms_norm_eps, "head_dim")
        self.wo_a = layers.normal_param(rngs, (g, n * h // g, o), ("o_groups", "o_group_in", "o_lora"), std, dt)
        self.wo_b = layers.normal_param(rngs, (g * o, d), ("o_proj", "embed"), std, dt)
        self.attn_sink = layers.const_param((n,), ("heads",), 0.0)
        if self.kind != "sliding":
            self.compressor = Compressor(cfg, ratio, h, self.kind == "csa", rngs, "head_dim")
        if self.kind == "csa":
            self.indexer = Indexer(cfg, rngs)

    # ------------------------------------------------------------------ projections (reusable pieces)

    def rope_tables(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope.rope_angles(positions, rope.inv_frequencies(self.cfg, self.kind != "sliding"))

    def queries(self, x: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """Shapes: x [B, T, D] -> c_q [B, T, Q] (the low-rank query, also the indexer's input), q [B, T, N, H]."""
        cfg, dt = self.cfg, x.dtype
        c_q = self.q_norm(layers.qlinear(x, self.wq_a[...], cfg, "attn.wq_a")).astype(dt)
        q = layers.qlinear(c_q, self.wq_b[...], cfg, "attn.wq_b")  # [B, T, N, H]
        return c_q, rope.apply_rope(layers.rms_norm(q, None, cfg.rms_norm_eps).astype(dt), cos, sin)

    def key_value(self, x: jax.Array, cos, sin) -> jax.Array:
        """Shapes: x [B, T, D] -> kv [B, T, H] (the single key = value head, rotated)."""
        cfg, dt = self.cfg, x.dtype
        kv = self.kv_norm(layers.qlinear(x, self.wkv[...], cfg, "attn.wkv")).astype(dt)
        return rope.apply_rope(kv, cos, sin)

    def compressed_entries(self, x: jax.Array, slots: EntrySlots, positions: jax.Array) -> jax.Array:
        """Shapes: x [B, T, D], slots [B, C], positions [B, T] -> entries [B, C, H] (rotated, x's dtype)."""
        entry_pos = jnp.take_along_axis(positions, slots.start, axis=1)
        return self.rotate_entries(self.compressor(x, slots), entry_pos, x.dtype)

    def rotate_entries(self, pooled: jax.Array, entry_pos: jax.Array, dtype) -> jax.Array:
        """Pooled entries [B, C, H] float32, position of each entry's first token [B, C] -> rotated, `dtype`."""
        e_cos, e_sin = self.rope_tables(entry_pos)
        return rope.apply_rope(pooled, e_cos, e_sin).astype(dtype)

    def indexer_inputs(self, x: jax.Array, c_q: jax.Array, slots: EntrySlots, positions: jax.Array, cos, sin):
        """The lightning indexer's queries [B, T, NI, HI], keys [B, C, HI] and head weights [B, T, NI].

        Its inputs are detached from the main model: the indexer learns only from its own KL loss.
        """
        xi, cqi = jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q)
        k_idx = self.indexer_keys(self.indexer.compressor(xi, slots), jnp.take_along_axis(positions, slots.start, 1))
        q_idx, w_idx = self.indexer_queries(xi, cqi, cos, sin)
        return q_idx, k_idx, w_idx

    def indexer_keys(self, pooled: jax.Array, entry_pos: jax.Array) -> jax.Array:
        """The indexer's keys from its compressor's pooled entries [B, C, HI] at entry positions [B, C]."""
        e_cos, e_sin = self.rope_tables(entry_pos)
        k_idx = rope.apply_rope(pooled, e_cos, e_sin)  # [B, C, HI]
        # QAT of the indexer's query/key path (the release stores its keys in MXFP4)
        return quant.fake_quant_mxfp4(k_idx) if self.cfg.quant == "fp4" else k_idx

    def indexer_queries(self, x: jax.Array, c_q: jax.Array, cos, sin) -> tuple[jax.Array, jax.Array]:
        """The indexer's queries [B, T, NI, HI] and head weights [B, T, NI] from x [B, T, D], c_q [B, T, Q]."""
        cfg, idx = self.cfg, self.indexer
        q_idx = rope.apply_rope(layers.qlinear(c_q, idx.wq_b[...], cfg, "attn.indexer.wq_b"), cos, sin)
        w_idx = x @ idx.weights_proj[...].astype(x.dtype)  # [B, T, NI]
        return (quant.fake_quant_mxfp4(q_idx) if cfg.quant == "fp4" else q_idx), w_idx

    def output(self, o: jax.Array, cos, sin) -> jax.Array:
        """Shapes: o [B, T, N, H] (attention output, rotated) -> [B, T, D]."""
        cfg = self.cfg
        dt = o.dtype
        o = rope.apply_rope(o, cos, sin, inverse=True)
        b, t = o.shape[:2]
        o = o.reshape(b, t, cfg.o_groups, -1)  # [B, T, G, N*H/G]
        o = layers.qlinear(o, self.wo_a[...], cfg, "attn.wo_a").reshape(b, t, -1)  # [B, T, G*O]
        return layers.qlinear(o, self.wo_b[...], cfg, "attn.wo_b")

    def dense_core(self, q, kv, entries, slots: EntrySlots | None, segment_ids) -> jax.Array:
        """Window + every admissible entry (sliding layers: no entries). Shapes: -> [B, T, N, H]."""
        cfg = self.cfg
        if slots is None:
            entries = jnp.zeros((q.shape[0], 0, cfg.head_dim), q.dtype)
            slots = EntrySlots(*(jnp.zeros((q.shape[0], 0), jnp.int32) for _ in range(3)),
                               jnp.zeros((q.shape[0], 0), bool))
        ratio = self.ratio or cfg.csa_ratio

        def kernel(q, kv, entries, entry_seg, entry_end, sink, seg):
            return dense_attention(q, kv, entries, entry_seg, sink, seg, ratio=ratio, window=cfg.sliding_window,
                                   entry_end=entry_end, **kernel_options(cfg))

        args = (q, kv, entries, slots.segment, slots.end, self.attn_sink[...], segment_ids)
        return per_shard(kernel, args, DENSE_ARG_AXES, Q_AXES, q.shape)

    # ------------------------------------------------------------------ the layer

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Shapes: x [B, T, D] (normed) -> out [B, T, D], indexer_loss [], indexer_recall [].

        The one dispatch of the layer, for whole rows and for rows split over `context` alike: the steps that
        look along the sequence come from `sequence_steps(ctx)`.
        """
        cfg = self.cfg
        steps = self.sequence_steps(ctx)
        x = x.astype(layers.dtype_of(cfg.dtype))
        cos, sin = self.rope_tables(ctx.positions)
        seg = ctx.segment_ids
        with jax.named_scope("attn/qkv"):
            c_q, q = self.queries(x, cos, sin)
            kv = self.key_value(x, cos, sin)
        zero = jnp.zeros((), jnp.float32)
        loss, recall = zero, zero
        if self.kind == "sliding":
            o = steps.dense_core(q, kv, None, None, seg)
        else:
            with jax.named_scope("attn/compress"):
                slots, entries = steps.compressed_entries(x)
            if self.kind == "hca":
                o = steps.dense_core(q, kv, entries, slots, seg)
            else:
                o, loss, recall = self._csa(steps, x, c_q, q, kv, entries, slots, cos, sin, ctx)
        with jax.named_scope("attn/out"):
            out = self.output(o, cos, sin)
        return out, loss, recall

    def sequence_steps(self, ctx: Context):
        """`WholeSequence` (every device holds whole rows), or `context_parallel.SplitSequence` (rows split over
        `context`, ctx.context_size > 1): the same methods, so `__call__` is one dispatch for both."""
        if ctx.context_size > 1:
            from deepseek_v4 import context_parallel  # imports this module

            return context_parallel.SplitSequence(self, ctx)
        return WholeSequence(self, ctx)

    def _csa(self, steps, x, c_q, q, kv, entries, slots: EntrySlots, cos, sin, ctx: Context):
        """CSA's phases (docs/training.md): dense, dense with the indexer's KL, sparse (top-k), sparse with KL."""
        cfg = self.cfg
        seg = ctx.segment_ids
        zero = jnp.zeros((), jnp.float32)
        if not (ctx.sparse_attention or ctx.indexer_loss):
            return steps.dense_core(q, kv, entries, slots, seg), zero, zero
        if ctx.dense_target_in_sparse_phase and ctx.context_size > 1:
            raise ValueError("dense_target_in_sparse_phase (the benchmark's quadratic baseline) does not run under "
                             "context parallelism")
        with jax.named_scope("attn/indexer"):
            q_idx, k_idx, w_idx = steps.indexer_inputs(x, c_q, slots, cos, sin)
        topk = steps.select(q_idx, k_idx, w_idx, slots, seg)
        if not ctx.sparse_attention:  # dense attention, the indexer trained on the dense distribution
            o = steps.dense_core(q, kv, entries, slots, seg)
            loss, recall = steps.dense_indexer_kl(q, kv, entries, slots, seg, q_idx, k_idx, w_idx, topk)
            return o, loss, recall
        o = steps.sparse_core(q, kv, entries, topk, seg)
        if not ctx.indexer_loss:
            return o, zero, zero
        if ctx.dense_target_in_sparse_phase:
            sink = self.attn_sink[...]
            _, mass = dense_attention_and_entry_mass(q, kv, entries, slots.segment, sink, seg, ratio=self.ratio,
                                                     window=cfg.sliding_window, entry_end=slots.end)
            scores = indexer_scores(q_idx, k_idx, w_idx, slots.segment, seg, ratio=self.ratio, entry_end=slots.end)
            kl, target, has = _kl_terms(mass, scores, jnp.isfinite(scores))
            picked = jnp.sum(jnp.take_along_axis(target, jnp.maximum(topk, 0), -1) * (topk >= 0), -1)
            n = jnp.maximum(jnp.sum(has), 1)
            return o, jnp.sum(jnp.where(has, kl, 0.0)) / n, jnp.sum(jnp.where(has, picked, 0.0)) / n
        mass, scores = steps.selected_mass_and_scores(q, kv, entries, topk, seg, q_idx, k_idx, w_idx)
        loss, recall = selected_set_kl(mass, scores, topk)
        return o, loss, recall


class WholeSequence:
    """The steps of an attention layer that look along the sequence, when every device holds whole rows.

    Each step runs its kernel per shard (`per_shard`: batch split, query heads over `tensor`).
    `context_parallel.SplitSequence` has the same methods for rows split over `context`.
    """

    def __init__(self, layer: Attention, ctx: Context):
        self.layer, self.ctx, self.cfg = layer, ctx, layer.cfg

    def compressed_entries(self, x: jax.Array) -> tuple[EntrySlots, jax.Array]:
        """Slots [B, C] and rotated entries [B, C, H] (x's dtype) of x [B, T, D]."""
        slots = entry_slots(self.ctx.segment_ids, self.layer.ratio)
        return slots, self.layer.compressed_entries(x, slots, self.ctx.positions)

    def indexer_inputs(self, x, c_q, slots: EntrySlots, cos, sin):
        return self.layer.indexer_inputs(x, c_q, slots, self.ctx.positions, cos, sin)

    def dense_core(self, q, kv, entries, slots: EntrySlots | None, segment_ids) -> jax.Array:
        return self.layer.dense_core(q, kv, entries, slots, segment_ids)

    def select(self, q_idx, k_idx, w_idx, slots: EntrySlots, segment_ids) -> jax.Array:
        """The lightning indexer's top-k [B, T, K] (no gradient)."""
        cfg, ratio = self.cfg, self.layer.ratio

        def select(q_idx, k_idx, w_idx, entry_seg, entry_end, seg):
            return lightning_indexer(q_idx, k_idx, w_idx, entry_seg, seg, ratio=ratio, topk=cfg.index_topk,
                                     entry_end=entry_end, **kernel_options(cfg))

        args = tuple(jax.lax.stop_gradient(a) for a in (q_idx, k_idx, w_idx)) + (slots.segment, slots.end,
                                                                                 segment_ids)
        topk_shape = q_idx.shape[:2] + (min(cfg.index_topk, k_idx.shape[1]),)
        # Under jax.checkpoint, JAX's partial evaluation for the gradient cannot hoist the top-k's per-block
        # admissibility masks out of the layer scan as one stacked [T, C] residual (they depend only on the row's
        # layout); nothing is recomputed, the top-k has no gradient.
        return jax.checkpoint(lambda *a: per_shard(select, a, INDEXER_ARG_AXES, SELECTED_AXES, topk_shape))(*args)

    def dense_indexer_kl(self, q, kv, entries, slots: EntrySlots, segment_ids, q_idx, k_idx, w_idx, topk):
        return dense_indexer_kl(q, kv, entries, slots, self.layer.attn_sink[...], segment_ids, q_idx, k_idx, w_idx,
                                topk, ratio=self.layer.ratio, window=self.cfg.sliding_window)

    def sparse_core(self, q, kv, entries, topk, segment_ids) -> jax.Array:
        kernel = functools.partial(sparse_attention, window=self.cfg.sliding_window, **kernel_options(self.cfg))
        args = (q, kv, entries, topk, self.layer.attn_sink[...], segment_ids)
        return per_shard(kernel, args, SPARSE_ARG_AXES, Q_AXES, q.shape)

    def selected_mass_and_scores(self, q, kv, entries, topk, segment_ids, q_idx, k_idx, w_idx):
        """The selected-set KL's inputs, [B, T, K], in pure JAX on the global arrays: XLA partitions them (the
        mass sums over every head, so it must not run per head shard)."""
        mass = selected_entry_mass(q, kv, entries, topk, self.layer.attn_sink[...], segment_ids,
                                   window=self.cfg.sliding_window)
        return mass, selected_indexer_scores(q_idx, k_idx, w_idx, topk)


def _kl_terms(mass, scores, valid):
    """Per-query KL(normalised stop-gradient mass || softmax(scores)) over `valid` slots, and the target.

    Shapes: mass, scores, valid [..., S] -> kl [...], target [..., S], has [...] (some target mass).
    """
    mass = jax.lax.stop_gradient(mass)
    total = jnp.sum(mass, axis=-1, keepdims=True)
    target = mass / jnp.where(total > 0, total, 1.0)
    logp = jax.nn.log_softmax(jnp.where(valid, scores, -1e30), axis=-1)
    kl = jnp.sum(jnp.where(target > 0, target * (jnp.log(jnp.where(target > 0, target, 1.0)) - logp), 0.0), -1)
    return kl, target, total[..., 0] > 0


def selected_set_kl(mass: jax.Array, scores: jax.Array, topk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The sparse phase's indexer objective on each query's selected entries (DeepSeek-V3.2 / V4).

    Target: the main attention's probability on the selected entries, summed over heads, renormalised over
    them (stop-gradiented); prediction: the indexer's softmax over the same entries. Recall: the target mass
    on the better half of the selection (the indexer's top ceil(K/2)): 1 = the indexer ranks what attention
    uses first. Queries with no selected entry are left out of both means. docs/training.md.
    Shapes: mass [B, T, K] float32, scores [B, T, K] (-inf on empty slots), topk [B, T, K] -> loss [], recall [].
    """
    kl, target, has = _kl_terms(mass, scores, topk >= 0)
    n = jnp.maximum(jnp.sum(has), 1)
    top_half = jnp.sum(target[..., : -(-target.shape[-1] // 2)], axis=-1)
    return jnp.sum(jnp.where(has, kl, 0.0)) / n, jnp.sum(jnp.where(has, top_half, 0.0)) / n


def dense_indexer_kl(q, kv, entries, slots: EntrySlots, sink, segment_ids, q_idx, k_idx, w_idx, topk, *,
                     ratio: int, window: int) -> tuple[jax.Array, jax.Array]:
    """The warm-up's indexer objective: KL(dense entry distribution || indexer softmax over admissible entries).

    Target: the main attention's probability on every admissible entry, summed over heads, renormalised
    (stop-gradiented). Recall: the target mass on the indexer's top-k. Computed one block of queries at a time
    (memory O(T * block), never [B, T, C]); queries with no admissible entry are left out. docs/training.md.
    """
    q, kv, entries, sink = (jax.lax.stop_gradient(a) for a in (q, kv, entries, sink))

    def block_fn(mass, q_pos, q_seg, q_idx_b, w_idx_b, topk_b):
        scores = block_scores(q_idx_b, w_idx_b, q_pos, q_seg, k_idx, slots.segment, slots.end)
        kl, target, has = _kl_terms(mass, scores, jnp.isfinite(scores))
        picked = jnp.sum(jnp.take_along_axis(target, jnp.maximum(topk_b, 0), axis=-1) * (topk_b >= 0), axis=-1)
        return kl, picked, has

    kl, picked, has = entry_mass_by_query_block(
        q, kv, entries, slots.segment, sink, segment_ids, ratio=ratio, window=window, entry_end=slots.end,
        block_fn=block_fn, block_args=(q_idx, w_idx, topk))
    n = jnp.maximum(jnp.sum(has), 1)
    return jnp.sum(jnp.where(has, kl, 0.0)) / n, jnp.sum(jnp.where(has, picked, 0.0)) / n
