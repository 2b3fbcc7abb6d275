"""Mixture of experts: sqrt-softplus router (learned or hash-routed), clamped-SwiGLU experts, shared expert.

See docs/model.md (mixture of experts). Selection uses `scores + router_bias` (the aux-loss-free balancing
bias, learned layers only); the gating weights are the unbiased scores of the selected experts, normalised to
sum to one and multiplied by `routed_scaling_factor`. Hash layers select a fixed set of experts per token id
(`tid2eid`).

Routing replay ("keep routing", docs/training.md): `MoE.__call__(..., expert_ids=...)` takes the experts to use
instead of selecting them (e.g. the ones an RL rollout chose); the gating weights are still computed from the
current router's scores of those experts, so the router keeps its gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from deepseek_v4 import fp8_gemm, layers
from deepseek_v4.config import Config
from sharding.expert_parallel import expert_ffn


def swiglu(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, limit: float, act_quant=None) -> jax.Array:
    """Clamped SwiGLU: silu(min(x w1, limit)) * clip(x w3, -limit, limit), then w2.

    `act_quant` (optional) is applied to the hidden activation entering w2. Shapes: x [..., D], w1/w3 [D, F],
    w2 [F, D] -> [..., D].
    """
    gate = jnp.minimum(x @ w1, limit)
    up = jnp.clip(x @ w3, -limit, limit)
    h = jax.nn.silu(gate) * up
    return (h if act_quant is None else act_quant(h)) @ w2


def route(x: jax.Array, gate: jax.Array, bias: jax.Array | None, hash_idx: jax.Array | None, top_k: int,
          scaling: float, expert_ids: jax.Array | None = None):
    """Router: scores, selected experts and their gating weights.

    `expert_ids` (optional, [N, K]) replaces the selection (routing replay); the weights are the current scores of
    those experts, normalised as usual.

    Shapes: x [N, D]; gate [D, E]; bias [E] (learned layers) or hash_idx [N, K] (hash layers)
      -> scores [N, E] f32, idx [N, K] int32, weights [N, K] f32 (sum to `scaling` per token).
    """
    logits = x.astype(jnp.float32) @ gate.astype(jnp.float32)  # [N, E]
    scores = jnp.sqrt(jax.nn.softplus(logits))
    if expert_ids is not None:
        idx = expert_ids.astype(jnp.int32)
    elif hash_idx is not None:
        idx = hash_idx.astype(jnp.int32)
    else:
        _, idx = jax.lax.top_k(scores + bias.astype(jnp.float32), top_k)
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20) * scaling
    return scores, idx, weights


def routed_experts_reference(x: jax.Array, idx: jax.Array, weights: jax.Array, w1: jax.Array, w3: jax.Array,
                             w2: jax.Array, limit: float, act_quant=None) -> jax.Array:
    """The readable spec of the routed sum: sum over each token's selected experts of weight * expert(x).

    Written out densely over all experts (E/K times the routed FLOPs); the model's paths are tested against it.
    Shapes: x [N, D], idx/weights [N, K], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    """
    num_experts = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # [N, E]
    gate = jnp.minimum(jnp.einsum("nd,edf->nef", x, w1), limit)
    up = jnp.clip(jnp.einsum("nd,edf->nef", x, w3), -limit, limit)
    h = jax.nn.silu(gate) * up
    if act_quant is not None:
        h = act_quant(h)
    return jnp.einsum("nef,efd->nd", h * combine.astype(x.dtype)[..., None], w2)  # weights before w2 (reference)


def routed_experts_dense(x: jax.Array, idx: jax.Array, weights: jax.Array, w1: jax.Array, w3: jax.Array,
                         w2: jax.Array, limit: float, act_quant=None) -> jax.Array:
    """`moe_impl="dense"`: every expert on every token (`expert_ffn` on [E, N, D]), then the weighted sum.

    E/K times the routed FLOPs; kept for comparison and tiny expert counts.
    Shapes: x [N, D], idx/weights [N, K], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    """
    num_experts = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(idx, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # [N, E]
    ye = expert_ffn(jnp.broadcast_to(x, (num_experts,) + x.shape), w1, w3, w2, limit, act_quant)  # [E, N, D]
    return jnp.einsum("ne,end->nd", combine.astype(x.dtype), ye)


def routed_experts_grouped(x: jax.Array, idx: jax.Array, weights: jax.Array, w1: jax.Array, w3: jax.Array,
                           w2: jax.Array, limit: float, act_quant=None, weight_format: str = "float",
                           activation_format: str = "float") -> jax.Array:
    """`moe_impl="grouped"`: only the selected (token, expert) pairs, as ragged groups: tokens are sorted by
    expert and `expert_ffn` runs the grouped expert matmul (Pallas on GPU/TPU, ragged_dot elsewhere).
    With FP8 activations the gating weight scales the rows after w2 (in float32) instead of the hidden
    activation, so the hidden activation reaches the kernel as the E4M3 tiles the emulation computes.

    Shapes: x [N, D], idx/weights [N, K], w1/w3 [E, D, F], w2 [E, F, D] -> [N, D].
    """
    n, k = idx.shape
    flat = idx.reshape(-1)  # [N*K]
    order = jnp.argsort(flat)
    token = order // k
    sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)  # [E]
    scale = weights.reshape(-1)[order][:, None]
    if activation_format == "fp8":
        ys = expert_ffn(x[token], w1, w3, w2, limit, act_quant, group_sizes=sizes, weight_format=weight_format,
                        activation_format=activation_format)
        ys = (ys.astype(jnp.float32) * scale).astype(x.dtype)
        return jnp.zeros_like(x).at[token].add(ys)
    # The gating weight scales the hidden activation (before w2), as in the reference.
    hidden_hook = (lambda h: h * scale.astype(h.dtype)) if act_quant is None else (
        lambda h: act_quant(h) * scale.astype(h.dtype))
    ys = expert_ffn(x[token], w1, w3, w2, limit, hidden_hook, group_sizes=sizes,
                    weight_format=weight_format)  # [N*K, D], grouped by expert
    return jnp.zeros_like(x).at[token].add(ys)


def expert_weight_format(cfg: Config) -> str:
    """How the routed-expert weights reach the expert FFN: "float" (fake-quantised by `layers.qweight` under
    `quant`, or plain), or, for `moe_impl="grouped"` under `quant`, the stored format the grouped kernel decodes
    ("fp8": 128x128 E4M3 blocks; "fp4": MXFP4) from the float master weights."""
    if cfg.moe_impl != "grouped" or cfg.quant == "none":
        return "float"
    return cfg.quant


def expert_activation_format(cfg: Config) -> str:
    """How the routed experts' token activations reach the grouped kernel: "fp8" (E4M3 1x128 tiles, FP8 x FP8
    products, DeepSeek's FP8 backward) with FP8 expert weights on a backend that runs the FP8 GEMMs
    (`fp8_gemm.native`, as `layers.runs_fp8_gemm`), else "float" (the compute dtype, fake-quantised under `quant`)."""
    return "fp8" if expert_weight_format(cfg) == "fp8" and fp8_gemm.native() else "float"


def routed_experts(x: jax.Array, idx: jax.Array, weights: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array,
                   mask: jax.Array, cfg: Config, act_quant=None) -> tuple[jax.Array, jax.Array]:
    """The routed-expert sum of one MoE layer with the implementation `cfg.moe_impl` selects.

    "padded": tokens sorted by expert into [E, C, D] buffers, C = the balanced load T*K/E, then quarter-size
    overflow rounds as the busiest expert needs (dropless; `sharding.routed_experts`, also the expert-parallel
    path on a mesh);
    "grouped": ragged groups and the grouped expert matmul: all (token, expert) pairs sorted by expert on one
    expert shard, or, on a mesh that splits the experts, the expert-parallel dispatch with the grouped matmul on
    each shard's received rows; "dense": every expert on every token. All of them run
    `sharding.expert_parallel.expert_ffn`. Padding tokens (mask False) take no expert slot on the expert-parallel
    dispatch: their routed output is 0 (they carry no loss). The weights are as `expert_weight_format(cfg)` says.

    Raises:
      ValueError: "dense" on a mesh that splits the experts.

    Shapes: x [N, D], idx/weights [N, K], w1/w3 [E, D, F], w2 [E, F, D], mask [N] bool -> y [N, D], dropped [].
    """
    fmt, act = expert_weight_format(cfg), expert_activation_format(cfg)
    split = sharding.expert_parallel.expert_parallelism() > 1
    if cfg.moe_impl == "padded" or (cfg.moe_impl == "grouped" and split):
        live = jnp.where(mask[:, None], idx, -1)
        return sharding.routed_experts(x, live, weights, w1, w3, w2, swiglu_limit=cfg.swiglu_limit,
                                       act_quant=act_quant, local_ffn=cfg.moe_impl, weight_format=fmt,
                                       activation_format=act)
    if split:
        raise ValueError(f"moe_impl={cfg.moe_impl!r} cannot split experts over the mesh's expert axis; use "
                         "moe_impl='padded' or 'grouped' (the expert-parallel dispatch)")
    if cfg.moe_impl == "grouped":
        y = routed_experts_grouped(x, idx, weights, w1, w3, w2, cfg.swiglu_limit, act_quant, fmt, act)
    else:
        y = routed_experts_dense(x, idx, weights, w1, w3, w2, cfg.swiglu_limit, act_quant)
    return y, jnp.zeros((), jnp.int32)


def default_hash_table(cfg: Config, layer: int) -> jax.Array:
    """A deterministic token -> K distinct experts table for hash-routed layers trained from scratch.

    DeepSeek ships its table with the weights and does not publish the hash; this one is a fixed pseudo-random
    choice per (layer, token id), roughly balanced over experts. Shape [V, K] int32.
    """
    key = jax.random.fold_in(jax.random.key(0x5EED), layer)
    keys = jax.random.uniform(key, (cfg.vocab_size, cfg.n_routed_experts))
    return jax.lax.top_k(keys, cfg.num_experts_per_tok)[1].astype(jnp.int32)


@dataclasses.dataclass
class MoeStats:
    """Routing statistics of one MoE layer (all float32)."""

    expert_counts: jax.Array  # [E] routed (token, slot) pairs per expert, padding excluded
    balance_loss: jax.Array  # [] sequence-wise balance loss (V3 form), unweighted
    dropped: jax.Array  # [] (token, slot) pairs dropped by a capacity limit (0 on the dropless paths)
    expert_ids: jax.Array  # [B, T, K] int32 the experts each token was routed to (what routing replay takes)


jax.tree_util.register_dataclass(MoeStats, data_fields=["expert_counts", "balance_loss", "dropped", "expert_ids"],
                                 meta_fields=[])



def balance_loss(scores: jax.Array, idx: jax.Array, mask: jax.Array, num_experts: int, top_k: int) -> jax.Array:
    """Sequence-wise balance loss sum_i f_i P_i averaged over rows (DeepSeek-V3 form).

    f_i = E / (K T) * (tokens of the row routed to i); P_i = mean over the row of the sum-normalised scores.
    Shapes: scores [B, T, E], idx [B, T, K], mask [B, T] -> [].
    """
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [B]
    counts = jnp.sum(jax.nn.one_hot(idx, num_experts) * mask[..., None, None], axis=(1, 2))  # [B, E]
    f = counts * num_experts / (top_k * n[:, None])
    p = scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
    p = jnp.sum(p * mask[..., None], axis=1) / n[:, None]  # [B, E]
    return jnp.mean(jnp.sum(f * p, axis=-1))


class Experts(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        pd, std = layers.dtype_of(cfg.param_dtype), cfg.initializer_range
        self.w1 = layers.normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pd)
        self.w3 = layers.normal_param(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pd)
        self.w2 = layers.normal_param(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, pd)


class SharedExpert(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        pd, std = layers.dtype_of(cfg.param_dtype), cfg.initializer_range
        self.w1 = layers.normal_param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w3 = layers.normal_param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.w2 = layers.normal_param(rngs, (f, d), ("mlp", "embed"), std, pd)


def shared_expert(x: jax.Array, shared: SharedExpert, cfg: Config) -> jax.Array:
    """The shared expert: `swiglu` whose three GEMMs are FP8-class linears (`layers.qlinear`: real FP8 GEMMs where
    `layers.runs_fp8_gemm`, else the emulation of `quant`). Shapes: x [N, D] -> [N, D] in x's dtype."""
    def linear(a, name):
        return layers.qlinear(a, getattr(shared, name)[...], cfg, f"ffn.shared.{name}")

    limit = cfg.swiglu_limit
    h = jax.nn.silu(jnp.minimum(linear(x, "w1"), limit)) * jnp.clip(linear(x, "w3"), -limit, limit)
    return linear(h, "w2")


class MoE(nnx.Module):
    """Routed experts + shared expert. `hash_layer` selects experts by token id instead of by score."""

    def __init__(self, cfg: Config, layer: int, hash_layer: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.hash_layer = hash_layer
        self.gate = layers.normal_param(rngs, (cfg.hidden_size, cfg.n_routed_experts), ("embed", None),
                                        cfg.initializer_range, jnp.float32)
        if hash_layer:
            self.tid2eid = layers.HashTable(default_hash_table(cfg, layer))
        else:
            self.router_bias = layers.RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32))
        self.experts = Experts(cfg, rngs)
        if cfg.n_shared_experts:
            self.shared = SharedExpert(cfg, rngs)

    def __call__(self, x: jax.Array, tokens: jax.Array, mask: jax.Array,
                 expert_ids: jax.Array | None = None) -> tuple[jax.Array, MoeStats]:
        """Shapes: x [B, T, D] (normed block input), tokens [B, T] int32, mask [B, T] bool, expert_ids (optional
        routing replay) [B, T, K] int32 -> [B, T, D], stats."""
        cfg = self.cfg
        b, t, d = x.shape
        dt = layers.dtype_of(cfg.dtype)
        flat = x.reshape(b * t, d)
        with jax.named_scope("moe/route"):
            hash_idx = self.tid2eid[...][tokens.reshape(-1)] if self.hash_layer else None
            bias = None if self.hash_layer else self.router_bias[...]
            replay = None if expert_ids is None else expert_ids.reshape(b * t, -1)
            scores, idx, weights = route(flat, self.gate[...], bias, hash_idx, cfg.num_experts_per_tok,
                                         cfg.routed_scaling_factor, replay)
        xq = layers.qact(flat.astype(dt), cfg)
        aq = None if cfg.quant == "none" else (lambda h: layers.qact(h, cfg))
        with jax.named_scope("moe/experts"):
            ex = self.experts
            if expert_weight_format(cfg) == "float":
                w1, w3, w2 = (layers.qweight(getattr(ex, w)[...], cfg, f"ffn.experts.{w}").astype(dt)
                              for w in ("w1", "w3", "w2"))
            else:  # float master weights; the grouped kernel receives them in their stored format
                w1, w3, w2 = (getattr(ex, w)[...] for w in ("w1", "w3", "w2"))
            y, dropped = routed_experts(xq, idx, weights, w1, w3, w2, mask.reshape(-1), cfg, aq)
        if cfg.n_shared_experts:
            y = y + shared_expert(flat.astype(dt), self.shared, cfg)
        e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
        fmask = mask.reshape(-1).astype(jnp.float32)
        counts = jnp.sum(jax.nn.one_hot(idx, e) * fmask[:, None, None], axis=(0, 1))
        bal = balance_loss(scores.reshape(b, t, e), idx.reshape(b, t, k), mask, e, k)
        return y.reshape(b, t, d).astype(x.dtype), MoeStats(counts, bal, dropped, idx.reshape(b, t, k))
