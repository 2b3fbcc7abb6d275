"""Rotary position embedding as V4 uses it: interleaved pairs on the trailing `rope_dim` channels of a head.

Sliding-only layers (and the MTP block) use plain RoPE with `rope_theta`; CSA/HCA layers use
`compress_rope_theta` with YaRN frequency correction and no magnitude (mscale) factor (docs/model.md, RoPE).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_v4.config import Config


def inv_frequencies(cfg: Config, compressed: bool) -> np.ndarray:
    """Inverse frequencies, one per rotated pair: [rope_dim // 2] float32."""
    dim = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    inv = (1.0 / pos_freqs).astype(np.float32)
    if not compressed:
        return inv

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    interpolation = (1.0 / (cfg.rope_scaling_factor * pos_freqs)).astype(np.float32)
    return (interpolation * (1 - extrapolation) + inv * extrapolation).astype(np.float32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin of position * frequency.

    Shapes: positions [B, T] -> cos, sin [B, T, rope_dim // 2] (float32).
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the trailing 2 * cos.shape[-1] channels of x in interleaved pairs (2i, 2i+1).

    Shapes: x [B, T, ..., H]; cos, sin [B, T, R/2] broadcast over the middle axes. `inverse` rotates by the
    negative angle (the conjugate rotation V4 applies to the attention output).
    """
    half = cos.shape[-1]
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + (half,))
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + (half,))
    if inverse:
        sin = -sin
    nope, rope = x[..., : -2 * half], x[..., -2 * half :].astype(jnp.float32)
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rot_even = even * cos - odd * sin
    rot_odd = odd * cos + even * sin
    rotated = jnp.stack([rot_even, rot_odd], axis=-1).reshape(rope.shape).astype(x.dtype)
    return jnp.concatenate([nope, rotated], axis=-1)
