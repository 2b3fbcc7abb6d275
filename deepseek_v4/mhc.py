"""Manifold-constrained hyper-connections (mHC): the residual state is R parallel streams per token.

Each block has two mHC sites (before attention and before the MoE). A site computes, per token and from the
streams themselves, a collapse vector `pre` [R], an expansion vector `post` [R] and a doubly-stochastic mixing
matrix `comb` [R, R] (Sinkhorn-Knopp projection), then the block output y updates the streams as
X' = comb^T X + post (x) y (docs/model.md, mHC; the transpose matters, comb is not symmetric).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_v4 import layers
from deepseek_v4.config import Config


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """Project [..., R, R] logits onto (nearly) doubly-stochastic matrices, following the reference code.

    Row softmax (+eps), a column normalisation, then `iters - 1` rounds of (row, column) normalisation; every
    division adds eps to the sum.
    """
    m = jax.nn.softmax(logits, axis=-1) + eps
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

    def row_then_column(_, m):
        m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
        return m / (jnp.sum(m, axis=-2, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, row_then_column, m)


def hc_weights(x: jax.Array, fn: jax.Array, base: jax.Array, scale: jax.Array, cfg: Config):
    """The per-token mixing weights of one mHC site.

    Shapes: x [B, T, R, D]; fn [R*D, (2+R)*R]; base [(2+R)*R]; scale [3]
      -> pre [B, T, R], post [B, T, R], comb [B, T, R, R] (all float32; comb[j, k]: source j -> destination k).
    """
    r = cfg.hc_mult
    flat = layers.rms_norm(x.reshape(x.shape[:2] + (-1,)), None, cfg.rms_norm_eps)  # [B, T, R*D]
    mix = flat @ fn.astype(jnp.float32)  # [B, T, (2+R)*R]
    base = base.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(mix[..., :r] * scale[0] + base[:r]) + cfg.hc_eps
    post = 2.0 * jax.nn.sigmoid(mix[..., r : 2 * r] * scale[1] + base[r : 2 * r])
    comb_logits = mix[..., 2 * r :] * scale[2] + base[2 * r :]
    comb = sinkhorn(comb_logits.reshape(comb_logits.shape[:-1] + (r, r)), cfg.hc_sinkhorn_iters, cfg.hc_eps)
    return pre, post, comb


def collapse(x: jax.Array, pre: jax.Array) -> jax.Array:
    """Shapes: x [B, T, R, D], pre [B, T, R] -> [B, T, D]."""
    return jnp.einsum("btr,btrd->btd", pre, x.astype(jnp.float32)).astype(x.dtype)


def update(x: jax.Array, comb: jax.Array, post: jax.Array, y: jax.Array) -> jax.Array:
    """X' = comb^T X + post (x) y.  Shapes: x [B, T, R, D], comb [B, T, R, R], post [B, T, R], y [B, T, D]."""
    mixed = jnp.einsum("btjk,btjd->btkd", comb.astype(x.dtype), x)
    return mixed + post.astype(x.dtype)[..., None] * y.astype(x.dtype)[:, :, None, :]


class HyperConnection(nnx.Module):
    """One mHC site: parameters `fn`, `base` (static biases) and `scale` (gating factors), all float32."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.fn = layers.normal_param(rngs, (cfg.hc_mult * cfg.hidden_size, cfg.hc_dim), ("hc_in", None),
                                      cfg.initializer_range, jnp.float32)
        self.base = layers.const_param((cfg.hc_dim,), (None,), 0.0)
        self.scale = layers.const_param((3,), (None,), 1.0)

    def __call__(self, x: jax.Array):
        """Shapes: x [B, T, R, D] -> (pre [B, T, R], post [B, T, R], comb [B, T, R, R])."""
        return hc_weights(x, self.fn[...], self.base[...], self.scale[...], self.cfg)


class HyperHead(nnx.Module):
    """The final collapse of the streams before the LM head: a learned `pre` only, no Sinkhorn, no post."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs):
        self.cfg = cfg
        self.fn = layers.normal_param(rngs, (cfg.hc_mult * cfg.hidden_size, cfg.hc_mult), ("hc_in", None),
                                      cfg.initializer_range, jnp.float32)
        self.base = layers.const_param((cfg.hc_mult,), (None,), 0.0)
        self.scale = layers.const_param((1,), (None,), 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Shapes: x [B, T, R, D] -> [B, T, D]."""
        flat = layers.rms_norm(x.reshape(x.shape[:2] + (-1,)), None, self.cfg.rms_norm_eps)
        mix = flat @ self.fn[...].astype(jnp.float32)  # [B, T, R]
        pre = jax.nn.sigmoid(mix * self.scale[...][0] + self.base[...]) + self.cfg.hc_eps
        return collapse(x, pre)
