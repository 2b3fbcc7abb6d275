"""V4 attention: the shared backbone (sliding window + sink + grouped output) with CSA and HCA extensions.

docs/model.md, "Attention". The heavy math (window + compressed attention, the lightning indexer) lives in
`pallas_kernels`; this module computes their inputs (queries, the shared K=V head, compressed entries,
indexer queries and keys) and the output projection.

Packed sequences (our extension; the reference has no packing): windows never cross a document; compressed
windows are aligned to the row, an entry is usable only if its own m tokens lie in one document, and for CSA the
overlapping slots that fall in another document get zero weight, so no entry pools tokens of two documents.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_v4 import layers, quant, rope
from deepseek_v4.config import Config
from pallas_kernels.dense_attention import dense_attention, dense_attention_and_entry_mass
from pallas_kernels.lightning_indexer import indexer_scores, lightning_indexer
from pallas_kernels.sparse_attention import sparse_attention
from sharding import rules

# Logical axes (sharding/rules.py) of the kernel arguments: batch over the data axes, query heads over "tensor".
Q_AXES = ("batch", "seq", "heads", "head_dim")
TOKEN_AXES = ("batch", "seq")
ENTRY_AXES = ("batch", "kv_seq", "head_dim")
ENTRY_SEG_AXES = ("batch", "kv_seq")
DENSE_ARG_AXES = (Q_AXES, ("batch", "seq", "head_dim"), ENTRY_AXES, ENTRY_SEG_AXES, ("heads",), TOKEN_AXES)
SPARSE_ARG_AXES = (Q_AXES, ("batch", "seq", "head_dim"), ENTRY_AXES, TOKEN_AXES + (None,), ("heads",), TOKEN_AXES)
# The indexer score sums over indexer heads, so only the batch is split (heads stay whole on each shard).
INDEXER_ARG_AXES = (TOKEN_AXES + (None, None), ENTRY_AXES, TOKEN_AXES + (None,), ENTRY_SEG_AXES, TOKEN_AXES)


def per_shard(kernel, args, in_axes, out_axes, out_shape):
    """`kernel(*args)` on local shards: under `jax.shard_map` over the active mesh, specs from sharding/rules.py.

    The kernels see local shards only (docs/kernels.md). Without an active mesh (`jax.set_mesh`) or on one
    device this is `kernel(*args)`. Gradients of inputs that a spec leaves replicated over a mesh axis are summed
    over that axis (shard_map's transpose with check_vma=False, which Pallas calls need).

    Args:
      kernel: a kernel entry point with its static arguments bound, taking `args` positionally, one output.
      args: the (global) arrays.
      in_axes: one tuple of logical axis names per argument.
      out_axes: logical axis names of the output.
      out_shape: the (global) output shape.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(*args)
    in_specs = tuple(rules.spec(ax, "activation", shape=a.shape, mesh=mesh) for a, ax in zip(args, in_axes))
    out_spec = rules.spec(out_axes, "activation", shape=out_shape, mesh=mesh)
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)


@dataclasses.dataclass(frozen=True)
class Context:
    """Per-forward inputs every layer needs.  Shapes: all [B, T] int32."""

    tokens: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    sparse_attention: bool = True  # False: CSA attends to every admissible entry (the dense warm-up phase)
    indexer_loss: bool = False  # compute the indexer's KL loss and recall (training only)


def compress(x: jax.Array, wkv: jax.Array, wgate: jax.Array, ape: jax.Array, norm_scale: jax.Array,
             segment_ids: jax.Array, ratio: int, overlap: bool, eps: float) -> tuple[jax.Array, jax.Array]:
    """Token-level compressor: gated, per-channel softmax pooling of each window of `ratio` tokens.

    With `overlap` (CSA and its indexer) every token carries 2*c features: the first half is its contribution
    to the next window's entry, the second half to its own window's entry; entry i pools 2*ratio slots.
    Shapes: x [B, T, D]; wkv/wgate [D, w*c] (w = 2 with overlap, else 1); ape [ratio, w*c]
      -> entries [B, C, c] float32 (normed, not rotated), entry_segment [B, C] int32 (-1 = spans documents).
    """
    b, t, _ = x.shape
    c = t // ratio
    usable = c * ratio
    xs = x[:, :usable]
    kv = (xs @ wkv).astype(jnp.float32).reshape(b, c, ratio, -1)  # [B, C, m, w*c]
    gate = (xs @ wgate).astype(jnp.float32).reshape(b, c, ratio, -1) + ape.astype(jnp.float32)
    seg = segment_ids[:, :usable].reshape(b, c, ratio)
    same = jnp.all(seg == seg[..., :1], axis=-1)
    entry_segment = jnp.where(same, seg[..., 0], -1).astype(jnp.int32)
    if overlap:
        width = kv.shape[-1] // 2
        prev_kv = jnp.pad(kv[:, :-1, :, :width], ((0, 0), (1, 0), (0, 0), (0, 0)))
        prev_gate = jnp.pad(gate[:, :-1, :, :width], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)
        prev_seg = jnp.pad(seg[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1)
        prev_gate = jnp.where((prev_seg == seg[..., :1])[..., None], prev_gate, -jnp.inf)
        kv = jnp.concatenate([prev_kv, kv[..., width:]], axis=2)  # [B, C, 2m, c]
        gate = jnp.concatenate([prev_gate, gate[..., width:]], axis=2)
    pooled = jnp.sum(kv * jax.nn.softmax(gate, axis=2), axis=2)  # [B, C, c]
    return layers.rms_norm(pooled, norm_scale, eps), entry_segment


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

    def __call__(self, x: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        return compress(x, self.wkv[...].astype(x.dtype), self.wgate[...].astype(x.dtype), self.ape[...],
                        self.norm.scale[...], segment_ids, self.ratio, self.overlap, self.eps)


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

    def __call__(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Shapes: x [B, T, D] (normed) -> out [B, T, D], indexer_loss [], indexer_recall []."""
        cfg = self.cfg
        dt = layers.dtype_of(cfg.dtype)
        x = x.astype(dt)
        compressed = self.kind != "sliding"
        inv_freq = rope.inv_frequencies(cfg, compressed)
        cos, sin = rope.rope_angles(ctx.positions, inv_freq)
        seg = ctx.segment_ids
        with jax.named_scope("attn/qkv"):
            xq = layers.qact(x, cfg)
            c_q = self.q_norm(xq @ layers.qweight(self.wq_a[...], cfg, "attn.wq_a").astype(dt)).astype(dt)  # [B, T, Q]
            wq_b = layers.qweight(self.wq_b[...], cfg, "attn.wq_b").astype(dt)
            q = jnp.einsum("btq,qnh->btnh", layers.qact(c_q, cfg), wq_b)  # [B, T, N, H]
            q = rope.apply_rope(layers.rms_norm(q, None, cfg.rms_norm_eps).astype(dt), cos, sin)
            kv = self.kv_norm(xq @ layers.qweight(self.wkv[...], cfg, "attn.wkv").astype(dt)).astype(dt)
            kv = rope.apply_rope(kv, cos, sin)  # [B, T, H]
        zero = jnp.zeros((), jnp.float32)
        loss, recall = zero, zero
        sink = self.attn_sink[...]
        if not compressed:
            empty = jnp.zeros((x.shape[0], 0, cfg.head_dim), dt)
            empty_seg = jnp.zeros((x.shape[0], 0), jnp.int32)
            dense = functools.partial(dense_attention, ratio=cfg.csa_ratio, window=cfg.sliding_window)
            o = per_shard(dense, (q, kv, empty, empty_seg, sink, seg), DENSE_ARG_AXES, Q_AXES, q.shape)
        else:
            with jax.named_scope("attn/compress"):
                entries, entry_seg = self.compressor(x, seg)
                entry_pos = ctx.positions[:, :: self.ratio][:, : entries.shape[1]]
                e_cos, e_sin = rope.rope_angles(entry_pos, inv_freq)
                entries = rope.apply_rope(entries, e_cos, e_sin).astype(dt)  # [B, C, H]
            if self.kind == "hca":
                dense = functools.partial(dense_attention, ratio=self.ratio, window=cfg.sliding_window)
                o = per_shard(dense, (q, kv, entries, entry_seg, sink, seg), DENSE_ARG_AXES, Q_AXES, q.shape)
            else:
                o, loss, recall = self._csa(x, c_q, q, kv, entries, entry_seg, entry_pos, cos, sin, ctx)
        with jax.named_scope("attn/out"):
            o = rope.apply_rope(o, cos, sin, inverse=True)  # [B, T, N, H]
            b, t = o.shape[:2]
            o = o.reshape(b, t, cfg.o_groups, -1)  # [B, T, G, N*H/G]
            wo_a = layers.qweight(self.wo_a[...], cfg, "attn.wo_a").astype(dt)
            o = jnp.einsum("btgi,gio->btgo", layers.qact(o, cfg), wo_a).reshape(b, t, -1)  # [B, T, G*O]
            out = layers.qact(o, cfg) @ layers.qweight(self.wo_b[...], cfg, "attn.wo_b").astype(dt)  # [B, T, D]
        return out, loss, recall

    def _csa(self, x, c_q, q, kv, entries, entry_seg, entry_pos, cos, sin, ctx: Context):
        cfg, idx = self.cfg, self.indexer
        seg = ctx.segment_ids
        inv_freq = rope.inv_frequencies(cfg, True)
        with jax.named_scope("attn/indexer"):
            # The indexer learns only from its own KL loss, so its inputs are detached from the main model.
            xi, cqi = jax.lax.stop_gradient(x), jax.lax.stop_gradient(c_q)
            k_idx, _ = idx.compressor(xi, seg)
            e_cos, e_sin = rope.rope_angles(entry_pos, inv_freq)
            k_idx = rope.apply_rope(k_idx, e_cos, e_sin)  # [B, C, HI]
            wq_b = layers.qweight(idx.wq_b[...], cfg, "attn.indexer.wq_b").astype(cqi.dtype)
            q_idx = rope.apply_rope(jnp.einsum("btq,qnh->btnh", layers.qact(cqi, cfg), wq_b), cos, sin)
            w_idx = xi @ idx.weights_proj[...].astype(xi.dtype)  # [B, T, NI]
            if cfg.quant == "fp4":  # QAT of the indexer's query/key path (the release stores its keys in MXFP4)
                q_idx, k_idx = quant.fake_quant_mxfp4(q_idx), quant.fake_quant_mxfp4(k_idx)
        zero = jnp.zeros((), jnp.float32)
        loss, recall = zero, zero
        topk = None
        if ctx.sparse_attention or ctx.indexer_loss:
            indexer = functools.partial(lightning_indexer, ratio=self.ratio, topk=cfg.index_topk)
            args = (jax.lax.stop_gradient(q_idx), jax.lax.stop_gradient(k_idx), jax.lax.stop_gradient(w_idx),
                    entry_seg, seg)
            topk_shape = q_idx.shape[:2] + (min(cfg.index_topk, k_idx.shape[1]),)
            topk = per_shard(indexer, args, INDEXER_ARG_AXES, TOKEN_AXES + (None,), topk_shape)
        mass = None
        if ctx.sparse_attention:
            sparse = functools.partial(sparse_attention, window=cfg.sliding_window)
            o = per_shard(sparse, (q, kv, entries, topk, self.attn_sink[...], seg), SPARSE_ARG_AXES, Q_AXES, q.shape)
        elif ctx.indexer_loss:  # reference only, pure JAX: XLA partitions it (its mass sums over the heads)
            o, mass = dense_attention_and_entry_mass(q, kv, entries, entry_seg, self.attn_sink[...], seg,
                                                     ratio=self.ratio, window=cfg.sliding_window)
        else:
            dense = functools.partial(dense_attention, ratio=self.ratio, window=cfg.sliding_window)
            o = per_shard(dense, (q, kv, entries, entry_seg, self.attn_sink[...], seg), DENSE_ARG_AXES, Q_AXES, q.shape)
        if ctx.indexer_loss:
            if mass is None:  # sparse phase: the dense attention mass is computed only as the indexer's target
                _, mass = dense_attention_and_entry_mass(q, kv, entries, entry_seg, self.attn_sink[...], seg,
                                                         ratio=self.ratio, window=cfg.sliding_window)
            loss, recall = self._indexer_kl(mass, q_idx, k_idx, w_idx, entry_seg, topk, seg)
        return o, loss, recall

    def _indexer_kl(self, mass, q_idx, k_idx, w_idx, entry_seg, topk, seg):
        """KL(main attention's entry distribution || indexer distribution), the target stop-gradiented.

        The target is the attention probability mass each query puts on each admissible compressed entry,
        summed over heads and L1-normalised (DeepSeek-V3.2's indexer objective). Recall = the target mass
        covered by the indexer's top-k selection.
        """
        mass = jax.lax.stop_gradient(mass)  # [B, T, C]
        total = jnp.sum(mass, axis=-1, keepdims=True)
        has = total[..., 0] > 0  # queries with at least one admissible entry
        target = mass / jnp.where(total > 0, total, 1.0)
        scores = indexer_scores(q_idx, k_idx, w_idx, entry_seg, seg, ratio=self.ratio)  # [B, T, C]
        admissible = jnp.isfinite(scores)
        logp = jax.nn.log_softmax(jnp.where(admissible, scores, -1e30), axis=-1)
        kl = jnp.sum(jnp.where(target > 0, target * (jnp.log(jnp.where(target > 0, target, 1.0)) - logp), 0.0), -1)
        n = jnp.maximum(jnp.sum(has), 1)
        loss = jnp.sum(jnp.where(has, kl, 0.0)) / n
        picked = jnp.take_along_axis(target, jnp.maximum(topk, 0), axis=-1) * (topk >= 0)
        recall = jnp.sum(jnp.where(has, jnp.sum(picked, -1), 0.0)) / n
        return loss, recall
