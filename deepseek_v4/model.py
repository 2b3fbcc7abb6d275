"""The DeepSeek-V4 model as Flax NNX modules.

    tokens -> embed -> expand to R mHC streams -> prefix layers (unrolled: hash-routed / irregular first layers)
           -> scanned stack of identical units (e.g. an (HCA, CSA) pair) -> hc_head collapse -> norm -> head
    MTP (depth 1): streams + embedding of the next token -> one sliding-window block -> its own collapse + norm
           -> the shared head, predicting the token two positions ahead.

Each layer: mHC site -> attention -> mHC update -> mHC site -> MoE -> mHC update (docs/model.md, "Layer plan").

Dimension letters (einsum strings) and logical axis names (parameter metadata `logical_axes`):
    B batch, T/S length, D model ("embed"), Q query latent ("q_lora"), N heads ("heads"), H head dim ("head_dim"),
    G output groups ("o_groups"), O per-group width ("o_lora"), E experts ("experts"), F expert hidden
    ("expert_mlp", shared expert "mlp"), V vocabulary ("vocab"), L scanned layers ("layers"), C compressed
    entries, R mHC streams, K top-k.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from deepseek_v4 import attention, context_parallel, layers, mhc, moe
from deepseek_v4.config import Config
from sharding import context as cp

STREAM_AXES = ("batch", "seq", "hc", "embed")  # logical layout of the residual streams [B, T, R, D]


def layer_plan(cfg: Config) -> tuple[int, int, int]:
    """(prefix, unit, repeats): layers [0, prefix) are unrolled; the rest are `repeats` copies of a `unit`-layer
    pattern, scanned. Hash-routed layers are always in the prefix (each has its own table)."""
    ratios = cfg.layer_ratios
    n = len(ratios)
    for start in range(cfg.num_hash_layers, n):
        rest = ratios[start:]
        for unit in range(1, len(rest) + 1):
            if len(rest) % unit == 0 and rest == rest[:unit] * (len(rest) // unit):
                if len(rest) // unit >= 2 or start == n - unit:
                    return start, unit, len(rest) // unit
    return n, 0, 0


class Block(nnx.Module):
    """One transformer layer on the R residual streams."""

    def __init__(self, cfg: Config, layer: int, ratio: int, hash_layer: bool, rngs: nnx.Rngs):
        self.attn_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hc_attn = mhc.HyperConnection(cfg, rngs)
        self.hc_ffn = mhc.HyperConnection(cfg, rngs)
        self.attn = attention.Attention(cfg, ratio, rngs)
        self.ffn = moe.MoE(cfg, layer, hash_layer, rngs)

    def __call__(self, x: jax.Array, ctx: attention.Context, expert_ids: jax.Array | None = None):
        """Shapes: x [B, T, R, D] (expert_ids: routing replay [B, T, K]) -> [B, T, R, D], (MoeStats,
        indexer_loss [], indexer_recall [])."""
        x, stats, (idx_loss, idx_recall) = self.apply(x, ctx, lambda h: self._attend(h, ctx), expert_ids)
        return x, (stats, idx_loss, idx_recall)

    def _attend(self, h: jax.Array, ctx: attention.Context):
        y, idx_loss, idx_recall = self.attn(h, ctx)
        return y, (idx_loss, idx_recall)

    def apply(self, x: jax.Array, ctx: attention.Context, attend, expert_ids: jax.Array | None = None):
        """The layer with its attention given: `attend(h [B, T, D]) -> (y [B, T, D], extra)` (the full forward
        calls `self.attn`; an inference cache calls the same sub-layer pieces on its stored state).
        `expert_ids` [B, T, K] (optional) replays a routing: the MoE uses these experts (moe.py).

        Shapes: x [B, T, R, D] -> [B, T, R, D], MoeStats, extra.
        """
        pre, post, comb = self.hc_attn(x)
        y, extra = attend(self.attn_norm(mhc.collapse(x, pre)))
        x = mhc.update(x, comb, post, y)
        pre, post, comb = self.hc_ffn(x)
        y, stats = self.ffn(self.ffn_norm(mhc.collapse(x, pre)).astype(x.dtype), ctx.tokens, ctx.segment_ids > 0,
                             expert_ids)
        x = mhc.update(x, comb, post, y)
        return x, stats, extra


class Unit(nnx.Module):
    """The repeating group of layers that the stack scans over."""

    def __init__(self, cfg: Config, ratios: tuple[int, ...], rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, -1, r, False, rngs) for r in ratios])

    def __call__(self, x: jax.Array, ctx: attention.Context, expert_ids: jax.Array | None = None):
        """expert_ids (optional): routing replay per block [unit, B, T, K]."""
        auxes = []
        for j, block in enumerate(self.blocks):
            x, aux = block(x, ctx, None if expert_ids is None else expert_ids[j])
            auxes.append(aux)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes)


def call_block(block: "Block", x: jax.Array, ctx: attention.Context, remat: bool,
               expert_ids: jax.Array | None = None):
    """`block(x, ctx, expert_ids)`, recomputed in the backward pass (only x is kept) when `remat` is set."""
    if not remat:
        return block(x, ctx, expert_ids)
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, y: nnx.merge(graphdef, st)(y, ctx, expert_ids), prevent_cse=False)(state, x)


class MTP(nnx.Module):
    """One multi-token-prediction module: predicts token t+2 from the main streams at t and the token at t+1."""

    def __init__(self, cfg: Config, ratio: int, rngs: nnx.Rngs):
        dt, std = layers.dtype_of(cfg.param_dtype), cfg.initializer_range
        d = cfg.hidden_size
        self.cfg = cfg
        self.e_proj = layers.normal_param(rngs, (d, d), ("embed", "embed_out"), std, dt)
        self.h_proj = layers.normal_param(rngs, (d, d), ("embed", "embed_out"), std, dt)
        self.enorm = layers.RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = layers.RMSNorm(d, cfg.rms_norm_eps)
        self.block = Block(cfg, -1, ratio, False, rngs)
        self.hc_head = mhc.HyperHead(cfg, rngs)
        self.norm = layers.RMSNorm(d, cfg.rms_norm_eps)

    def __call__(self, streams: jax.Array, next_embed: jax.Array, ctx: attention.Context, dt, remat: bool = False):
        """Shapes: streams [B, T, R, D], next_embed [B, T, D] -> streams [B, T, R, D], hidden [B, T, D], aux."""
        x, aux = call_block(self.block, self.block_input(streams, next_embed, dt), ctx, remat)
        return x, self.norm(self.hc_head(x)), aux

    def block_input(self, streams: jax.Array, next_embed: jax.Array, dt) -> jax.Array:
        """The block's input streams from the main streams and the next token's embedding: [B, T, R, D]."""
        cfg = self.cfg  # both projections are FP8 GEMMs of the export: `quant` sees them as it stores them
        e = layers.qlinear(self.enorm(next_embed), self.e_proj[...], cfg, "e_proj", dt)  # [B, T, D]
        h = layers.qlinear(self.hnorm(streams), self.h_proj[...], cfg, "h_proj", dt)  # [B, T, R, D]
        return h + e[:, :, None, :]


@dataclasses.dataclass
class TrainOutputs:
    """What the training loss needs from one forward pass."""

    hidden: jax.Array  # [B, T, D] final normed hidden states (the head's input), float32; context layout
    mtp_hidden: tuple[jax.Array, ...]  # per MTP depth k: [B, T, D]; position t predicts the token at t + 1 + k
    expert_counts: jax.Array  # [n_learned_moe_layers, E] routed (token, slot) pairs per expert, padding excluded
    hash_expert_counts: jax.Array  # [n_hash_layers, E] the same for hash-routed layers (load metrics only)
    balance_loss: jax.Array  # [] sum over learned-routing layers of the sequence-wise balance loss
    dropped_tokens: jax.Array  # [] (token, slot) pairs dropped by expert capacity over all layers (0 if dropless)
    indexer_loss: jax.Array  # [] mean over CSA layers of the indexer KL (zero unless requested)
    indexer_recall: jax.Array  # [] mean over CSA layers of the indexer's top-k recall of attention mass
    expert_ids: jax.Array  # [num_hidden_layers, B, T, K] int32 each main layer's routing (context layout)


jax.tree_util.register_dataclass(
    TrainOutputs,
    data_fields=["hidden", "mtp_hidden", "expert_counts", "hash_expert_counts", "balance_loss", "dropped_tokens",
                 "indexer_loss", "indexer_recall", "expert_ids"],
    meta_fields=[],
)


class DeepseekV4(nnx.Module):
    """DeepSeek-V4 (Flash, Pro or any V4-shaped config).

    `model(tokens)` gives float32 logits [B, T, V]; `model.forward_train(...)` gives what the loss needs without
    materialising the logits.
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = layers.dtype_of(cfg.param_dtype), cfg.initializer_range
        d, v = cfg.hidden_size, cfg.vocab_size
        self.embed = layers.normal_param(rngs, (v, d), ("vocab", "embed"), std, pd)
        prefix, unit, repeats = layer_plan(cfg)
        ratios = cfg.layer_ratios
        self.prefix = nnx.List([Block(cfg, i, ratios[i], i < cfg.num_hash_layers, rngs) for i in range(prefix)])
        self.unit_ratios = ratios[prefix: prefix + unit]
        self.repeats = repeats
        if repeats:
            self.stack = self._make_stack(cfg, self.unit_ratios, repeats, rngs)
        self.hc_head = mhc.HyperHead(cfg, rngs)
        self.norm = layers.RMSNorm(d, cfg.rms_norm_eps)
        self.head = layers.normal_param(rngs, (d, v), ("embed", "vocab"), std, pd)
        self.mtp = nnx.List([MTP(cfg, r, rngs) for r in cfg.mtp_ratios])

    @staticmethod
    def _make_stack(cfg: Config, unit_ratios, repeats: int, rngs: nnx.Rngs) -> Unit:
        @nnx.split_rngs(splits=repeats)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(r: nnx.Rngs) -> Unit:
            return Unit(cfg, unit_ratios, r)

        stack = create(rngs)
        for _, var in nnx.iter_graph(stack):
            if isinstance(var, nnx.Variable) and var.has_metadata("logical_axes"):
                var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
        return stack

    # ---- forward ---------------------------------------------------------------------------------
    def _context(self, tokens, segment_ids, positions, sparse_attention, indexer_loss,
                 dense_target_in_sparse_phase=False) -> attention.Context:
        tokens = jnp.asarray(tokens, jnp.int32)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        segment_ids, positions = jnp.asarray(segment_ids, jnp.int32), jnp.asarray(positions, jnp.int32)
        size = self.context_size(tokens.shape[1])
        if size == 1:
            return attention.Context(tokens, segment_ids, positions, sparse_attention, indexer_loss,
                                     dense_target_in_sparse_phase)
        return attention.Context(cp.to_layout(tokens, size), cp.to_layout(segment_ids, size),
                                 cp.to_layout(positions, size), sparse_attention, indexer_loss,
                                 dense_target_in_sparse_phase, size, segment_ids, positions)

    def context_size(self, length: int) -> int:
        """The active mesh's `context` size; a one-line ValueError when the layout cannot split `length` tokens.

        With a size N > 1 the model runs on the load-balanced layout (sharding/context.py): its inputs are given
        in the natural order and permuted here; `forward_train`'s outputs stay in the layout (the loss permutes
        its targets the same way, `sequence_layout`).
        """
        size = cp.context_size()
        if size > 1:
            cp.check_length(length, size, *context_parallel.model_granularity(self.cfg))
        return size

    def _trunk(self, ctx: attention.Context, expert_ids: jax.Array | None = None):
        """expert_ids (optional): routing replay per main layer [num_hidden_layers, B, T, K] (context layout)."""
        cfg = self.cfg
        dt = layers.dtype_of(cfg.dtype)
        emb = jnp.take(self.embed[...], ctx.tokens, axis=0).astype(dt)  # [B, T, D]
        x = jnp.broadcast_to(emb[:, :, None, :], emb.shape[:2] + (cfg.hc_mult, cfg.hidden_size))  # [B, T, R, D]
        x = sharding.constrain(x, STREAM_AXES)
        auxes = []
        for i, block in enumerate(self.prefix):
            ids = None if expert_ids is None else expert_ids[i]
            x, aux = call_block(block, x, ctx, cfg.remat_policy == "full", ids)
            auxes.append(jax.tree.map(lambda a: a[None], aux))
        if self.repeats:
            graphdef, state = nnx.split(self.stack)

            def body(x, xs):
                layer_state, ids = xs
                x, aux = nnx.merge(graphdef, layer_state)(x, ctx, ids)
                return sharding.constrain(x, STREAM_AXES), aux

            if cfg.remat_policy == "full":
                body = jax.checkpoint(body, prevent_cse=False)
            ids = None
            if expert_ids is not None:  # [repeats, unit, B, T, K] in the scan's order
                n = len(self.prefix)
                ids = expert_ids[n:].reshape((self.repeats, len(self.unit_ratios)) + expert_ids.shape[1:])
            x, aux = jax.lax.scan(body, x, (state, ids))  # aux leaves: [L, unit, ...]
            auxes.append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), aux))
        aux = jax.tree.map(lambda *a: jnp.concatenate(a), *auxes)  # leaves: [num_layers, ...]
        return x, emb, aux

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Shapes: tokens [B, T] int32 (segment_ids, positions [B, T]) -> float32 logits [B, T, V]."""
        ctx = self._context(tokens, segment_ids, positions, True, False)
        x, _, _ = self._trunk(ctx)
        hidden = self.norm(self.hc_head(x))
        return cp.from_layout(hidden @ self.head[...].astype(jnp.float32), ctx.context_size)

    def forward_train(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                      positions: jax.Array | None = None, *, sparse_attention: bool = True,
                      indexer_loss: bool = False, dense_target_in_sparse_phase: bool = False,
                      expert_ids: jax.Array | None = None) -> TrainOutputs:
        """The training forward: hidden states for a chunked loss, MTP hidden states, routing and indexer stats.

        `sparse_attention` / `indexer_loss` select CSA's phase (attention.Context, docs/training.md);
        `dense_target_in_sparse_phase` is the benchmark baseline's earlier [B, T, C] objective. `expert_ids`
        [num_hidden_layers, B, T, K] int32 (natural order) replays a routing in the main layers ("keep routing":
        the experts a rollout chose, gate weights from the current router); MTP modules route freely.
        """
        cfg = self.cfg
        ctx = self._context(tokens, segment_ids, positions, sparse_attention, indexer_loss,
                            dense_target_in_sparse_phase)
        if expert_ids is not None:
            expert_ids = cp.to_layout(jnp.asarray(expert_ids, jnp.int32), ctx.context_size, axis=2)
        x, emb, (stats, idx_loss, idx_recall) = self._trunk(ctx, expert_ids)
        hidden = self.norm(self.hc_head(x))
        mtp_hidden, mtp_stats, mtp_loss, mtp_recall = [], [], [], []
        streams, next_emb = x, emb
        for k, module in enumerate(self.mtp):
            if ctx.context_size == 1:
                next_emb = jnp.pad(next_emb[:, 1:], ((0, 0), (0, 1), (0, 0)))  # embedding of the token k+1 ahead
            else:  # the shift runs on the natural order (it crosses chunks and ranks), then goes to the layout
                ahead = jnp.pad(jnp.asarray(tokens, jnp.int32)[:, k + 1:], ((0, 0), (0, k + 1)), constant_values=-1)
                ahead = cp.to_layout(ahead, ctx.context_size)
                next_emb = jnp.where((ahead >= 0)[..., None], jnp.take(self.embed[...], jnp.maximum(ahead, 0), axis=0),
                                     0).astype(emb.dtype)
            streams, h, (s, il, ir) = module(streams, next_emb, ctx, layers.dtype_of(cfg.dtype),
                                             cfg.remat_policy == "full")
            mtp_hidden.append(h)
            mtp_stats.append(jax.tree.map(lambda a: a[None], s))
            mtp_loss.append(il[None])
            mtp_recall.append(ir[None])
        hash_layers = min(cfg.num_hash_layers, cfg.num_hidden_layers)
        counts = [stats.expert_counts[hash_layers:]] + [s.expert_counts for s in mtp_stats]
        balance = [stats.balance_loss[hash_layers:]] + [s.balance_loss for s in mtp_stats]
        csa = np.asarray([r == cfg.csa_ratio for r in cfg.layer_ratios])
        n_csa = max(int(csa.sum()), 1)
        return TrainOutputs(
            hidden=hidden,
            mtp_hidden=tuple(mtp_hidden),
            expert_counts=jnp.concatenate(counts),
            hash_expert_counts=stats.expert_counts[:hash_layers],
            balance_loss=jnp.sum(jnp.concatenate(balance)),
            dropped_tokens=jnp.sum(stats.dropped) + sum(jnp.sum(s.dropped) for s in mtp_stats),
            indexer_loss=jnp.sum(jnp.where(csa, idx_loss, 0.0)) / n_csa,
            indexer_recall=jnp.sum(jnp.where(csa, idx_recall, 0.0)) / n_csa,
            expert_ids=stats.expert_ids,
        )

    # ---- non-gradient updates -------------------------------------------------------------------
    def update_router_bias(self, expert_counts: jax.Array, speed: float) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts by `speed`, lower overloaded ones.

        Shapes: expert_counts [n_learned_moe_layers, E] (from TrainOutputs; prefix, then stack, then MTP rows).
        """
        signs = jnp.sign(jnp.mean(expert_counts, axis=-1, keepdims=True) - expert_counts)  # [layers, E]
        prefix = [b.ffn for b in self.prefix if not b.ffn.hash_layer]
        for row, module in enumerate(prefix):
            module.router_bias[...] = module.router_bias[...] + speed * signs[row]
        row = len(prefix)
        if self.repeats:
            unit = len(self.unit_ratios)
            stack_signs = signs[row: row + unit * self.repeats].reshape(self.repeats, unit, -1)  # [L, unit, E]
            for j, block in enumerate(self.stack.blocks):
                block.ffn.router_bias[...] = block.ffn.router_bias[...] + speed * stack_signs[:, j]
            row += unit * self.repeats
        for m in self.mtp:
            m.block.ffn.router_bias[...] = m.block.ffn.router_bias[...] + speed * signs[row]
            row += 1

