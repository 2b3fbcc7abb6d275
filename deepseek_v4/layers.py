"""Small building blocks shared by the model: parameter creation with logical axes, RMSNorm.

Every parameter is an `nnx.Param` whose metadata `logical_axes` names each dimension; `sharding/rules.py` maps
those names to mesh axes. Non-trainable state uses the `nnx.Variable` subclasses below so optimizers built with
`wrt=nnx.Param` never see it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


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
