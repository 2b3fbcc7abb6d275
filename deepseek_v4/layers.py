"""Small building blocks shared by the model: parameter creation with logical axes, RMSNorm.

Every parameter is an `nnx.Param` whose metadata `logical_axes` names each dimension; `sharding/rules.py` maps
those names to mesh axes. Non-trainable state uses the `nnx.Variable` subclasses below so optimizers built with
`wrt=nnx.Param` never see it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_v4 import fp8_gemm, params, quant
from deepseek_v4.config import Config


class RouterBias(nnx.Variable):
    """The aux-loss-free balancing bias of a learned router: updated by a sign rule, not by gradients."""


class HashTable(nnx.Variable):
    """The frozen token-id -> expert-ids table of a hash-routed MoE layer."""


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def normal_param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype), logical_axes=axes)


def const_param(shape, axes, value: float, dtype=jnp.float32) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm over the last axis with float32 statistics; unweighted when `scale` is None. Returns float32."""
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm; the weight is kept in float32 like the reference."""

    def __init__(self, dim: int, eps: float, axis_name: str = "embed"):
        self.scale = const_param((dim,), (axis_name,), 1.0)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def qweight(w: jax.Array, cfg: Config, param: str) -> jax.Array:
    """A GEMM weight as the forward sees it under `cfg.quant` (straight-through gradient to the master weight).

    `param` is the weight's path inside its layer or MTP module (e.g. "attn.wq_b"), a row of
    `deepseek_v4.params.PARAMS` stored FP8 or as a routed expert; its layout transform gives the layout below.
    FP8 weights are quantised in 128x128 blocks of their official [out, in] matrix, so training sees exactly the
    values an FP8 export holds: layout "matrix" = [in, out] (blocks are square, so the transpose is free);
    "heads" = [in, N, H] (one matrix [in, N*H]); "grouped" = [G, I, O] (the official [G*O, I] matrix); leading
    axes of "matrix" (experts) are batch axes. Routed experts use MXFP4 along the input axis in "fp4".
    """
    kind = params.quantised(param)
    if cfg.quant == "none":
        return w
    if kind.storage == params.EXPERT and cfg.quant == "fp4":
        return quant.fake_quant_mxfp4(w, axis=-2)
    layout = kind.fp8_layout
    if layout == "heads":
        return quant.fake_quant_fp8_blocks(w.reshape(w.shape[0], -1)).reshape(w.shape)
    if layout == "grouped":
        g, i, o = w.shape
        flat = quant.fake_quant_fp8_blocks(w.transpose(0, 2, 1).reshape(g * o, i))
        return flat.reshape(g, o, i).transpose(0, 2, 1)
    return quant.fake_quant_fp8_blocks(w)


def qact(x: jax.Array, cfg: Config) -> jax.Array:
    """An activation entering an FP8 GEMM: 1x128 tiles along the contraction (last) axis under `cfg.quant`."""
    return x if cfg.quant == "none" else quant.fake_quant_act_fp8(x)


def runs_fp8_gemm(cfg: Config, param: str) -> bool:
    """Whether the GEMM of weight `param` runs as a real FP8 GEMM (`fp8_gemm`) rather than the emulation.

    The one decision: under `quant` on a backend that executes FP8 GEMMs (GPU), every weight the parameter table
    stores FP8 (`params.FP8`: wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b, the shared expert, the MTP
    projections). The table keeps the router, head, embedding, mHC, compressors and the indexer's head weights in
    higher precision, so they never get here (docs/training.md, low precision).
    """
    return cfg.quant != "none" and fp8_gemm.native() and params.quantised(param).storage == params.FP8


def qlinear(x: jax.Array, w: jax.Array, cfg: Config, param: str, dtype=None) -> jax.Array:
    """The GEMM of an FP8-class weight: `qact(x) @ qweight(w)` in `dtype` (default x's), in the weight's layout.

    `param` names the weight's row of `deepseek_v4.params.PARAMS`, whose layout gives the product: "matrix"
    w [in, out]: x [..., in] -> [..., out]; "heads" w [in, N, H]: x [..., in] -> [..., N, H]; "grouped" w [G, I, O]:
    x [..., G, I] -> [..., G, O]. Where `runs_fp8_gemm` says so the forward is a real FP8 x FP8 GEMM with float32
    accumulation and the same scales, and so are its Dgrad and Wgrad (`fp8_gemm`); elsewhere the emulation.
    """
    layout = params.quantised(param).fp8_layout
    dt = dtype or x.dtype
    if runs_fp8_gemm(cfg, param):
        if layout == "grouped":
            y = fp8_gemm.fp8_grouped_linear(x, w)
        else:
            y = fp8_gemm.fp8_linear(x, w.reshape(w.shape[0], -1)).reshape(*x.shape[:-1], *w.shape[1:])
        return y.astype(dt)
    xq, wq = qact(x, cfg).astype(dt), qweight(w, cfg, param).astype(dt)
    if layout == "heads":
        return jnp.einsum("...q,qnh->...nh", xq, wq)
    if layout == "grouped":
        return jnp.einsum("...gi,gio->...go", xq, wq)
    return xq @ wq
