"""Low-precision number formats of DeepSeek-V4: FP8 E4M3 and MXFP4 E2M1 with UE8M0 scales.

A leaf module (it imports only numpy, ml_dtypes and JAX): the expert-matmul kernels decode these formats, and
the model's quantisation module re-exports them next to its straight-through fake quantisation. Storage
layouts and the official checkpoint names are in docs/checkpoints.md; the kernels' use in docs/kernels.md.

* **FP8 weights**: E4M3 (`float8_e4m3fn`, max 448) values, one UE8M0 (`float8_e8m0fnu`, a power of two) scale
  per 128x128 block. A weight stored [out, in] gets a scale [ceil(out/128), ceil(in/128)]; edge blocks are
  partial. Blocks are square, so the same functions serve a weight stored [in, out] (the scale is transposed).
* **FP8 activations**: E4M3 values, one UE8M0 scale per 1x128 tile along the last (contraction) axis.
* **MXFP4 weights**: E2M1 (`float4_e2m1fn`, max 6) values, one UE8M0 scale per 32 consecutive elements along
  the input (contraction) axis. Two values per byte, **low nibble = even index**, stored as int8
  [out, in/2] with scale [out, in/32]. Nibble codes 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign.

Scale rule (ours; the checkpoints fix the format, not the quantiser): the scale of a block is the smallest
power of two 2**e with amax / 2**e <= qmax (448 for E4M3, 6 for E2M1), i.e. the scale is rounded *up*, so no
value saturates or overflows. e is computed exactly from the float32 bits (`frexp`), not through `log2`.
An all-zero block gets e = 0 (scale 1). e is clipped to the UE8M0 range [-127, 127]; blocks with
amax < 2**-118 (FP8) or 2**-125 (FP4) therefore lose precision, which no trained weight comes near.
Values are rounded to nearest, ties to even: FP8 by the float8 casts of ml_dtypes and XLA; E2M1 by ml_dtypes'
float4 cast for numpy and, for JAX, by comparisons that give the same bits (`_e2m1_round`).
All math runs in float32: inputs of other float dtypes are cast first.

Every function works on numpy arrays (the exporter) and on JAX arrays (training): the same code runs with
`numpy` or `jax.numpy`, so both give the same bits for float32 inputs in the normal range (XLA on CPU may flush
float32 subnormals to zero, numpy does not). Numpy inputs are checked: NaN or inf raises ValueError.

Layouts: functions take the weight as it is stored. The official files store [out, in]
(`axis=-1` is the input axis); our model stores experts [E, D, F] = [E, in, out] (`axis=-2`). Leading axes
(experts, layers) are batch axes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0  # largest float4_e2m1fn
FP8_BLOCK = 128  # weight blocks are FP8_BLOCK x FP8_BLOCK
ACT_BLOCK = 128  # activation tiles are 1 x ACT_BLOCK along the contraction axis
FP4_BLOCK = 32  # MXFP4 blocks are 1 x FP4_BLOCK along the input axis
E8M0_BIAS = 127
# Value of each 4-bit E2M1 code (bit 3 = sign), the table the packed nibbles index.
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)

Array = Any  # numpy.ndarray or jax.Array


def _xp(x: Array):
    """numpy for numpy inputs, jax.numpy for JAX arrays and tracers."""
    return np if isinstance(x, (np.ndarray, np.generic)) else jnp


def _bitcast(xp, x: Array, dtype) -> Array:
    if xp is np:
        return x.view(dtype)
    return jax.lax.bitcast_convert_type(x, dtype)


def check_floating(x: Array, name: str) -> None:
    """Raises ValueError unless x is floating point and (numpy inputs) finite."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if isinstance(x, np.ndarray) and not np.isfinite(x.astype(np.float32)).all():
        raise ValueError(f"{name} contains NaN or inf; cannot quantise non-finite values")


def _axis(x: Array, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {x.ndim}")
    return axis % x.ndim


def _pow2_exponent(xp, amax: Array, qmax: float) -> Array:
    """Smallest e with amax <= qmax * 2**e (exact), 0 where amax == 0, clipped to the UE8M0 range. int32."""
    m, k = xp.frexp(amax.astype(np.float32))
    mq, kq = math.frexp(qmax)
    e = k.astype(np.int32) - kq + (m > mq).astype(np.int32)
    e = xp.where(amax > 0, e, 0)
    return xp.clip(e, -E8M0_BIAS, E8M0_BIAS).astype(np.int32)


def _exp2(xp, e: Array) -> Array:
    """2**e as float32 for an int32 array e (exact, including 2**-127)."""
    return xp.ldexp(xp.ones(e.shape, np.float32), e)


def _e8m0_from_exponent(xp, e: Array) -> Array:
    return _bitcast(xp, (e + E8M0_BIAS).astype(np.uint8), ml_dtypes.float8_e8m0fnu)


def e8m0_to_float32(scale: Array) -> Array:
    """UE8M0 scales (float8_e8m0fnu) to float32 powers of two. Shape unchanged."""
    xp = _xp(scale)
    if scale.dtype != ml_dtypes.float8_e8m0fnu:
        raise ValueError(f"scale must have dtype float8_e8m0fnu, got {scale.dtype}")
    bits = _bitcast(xp, scale, np.uint8).astype(np.int32)
    if xp is np and (bits == 255).any():
        raise ValueError("scale contains the UE8M0 NaN code 0xFF")
    return _exp2(xp, bits - E8M0_BIAS)


def _pad_to(xp, x: Array, multiples: dict[int, int]) -> Array:
    pad = [(0, 0)] * x.ndim
    for ax, mult in multiples.items():
        pad[ax] = (0, -x.shape[ax] % mult)
    return xp.pad(x, pad) if any(p for _, p in pad) else x


# ---- FP8 weights, 128x128 blocks -------------------------------------------------------------------------


def quantize_fp8_blocks(w: Array) -> tuple[Array, Array]:
    """Quantise a weight to FP8 E4M3 with one UE8M0 scale per 128x128 block of its last two axes.

    Args:
      w: float weight [..., R, C] (official layout R = out, C = in). Any sizes; edge blocks are partial.

    Returns:
      (values float8_e4m3fn [..., R, C], scale float8_e8m0fnu [..., ceil(R/128), ceil(C/128)]),
      with w ~= values * scale (scale broadcast over its block).

    Raises:
      ValueError: w is not floating point, has rank < 2, or (numpy) contains NaN/inf.
    """
    check_floating(w, "weight")
    if w.ndim < 2:
        raise ValueError(f"FP8 block quantisation needs a rank >= 2 weight, got shape {w.shape}")
    xp = _xp(w)
    r, c = w.shape[-2:]
    wp = _pad_to(xp, w.astype(np.float32), {w.ndim - 2: FP8_BLOCK, w.ndim - 1: FP8_BLOCK})
    nr, nc = wp.shape[-2] // FP8_BLOCK, wp.shape[-1] // FP8_BLOCK
    blocks = wp.reshape(*wp.shape[:-2], nr, FP8_BLOCK, nc, FP8_BLOCK)  # [..., R, C] -> [..., r, 128, c, 128]
    e = _pow2_exponent(xp, xp.abs(blocks).max(axis=(-3, -1)), FP8_MAX)  # [..., r, c]
    q = (blocks * _exp2(xp, -e)[..., :, None, :, None]).astype(ml_dtypes.float8_e4m3fn)
    q = q.reshape(wp.shape)[..., :r, :c]
    return q, _e8m0_from_exponent(xp, e)


def _expand_block_scale(xp, scale_f32: Array, shape: tuple[int, ...]) -> Array:
    """[..., ceil(R/128), ceil(C/128)] -> [..., R, C]."""
    s = xp.repeat(xp.repeat(scale_f32, FP8_BLOCK, axis=-2), FP8_BLOCK, axis=-1)
    return s[..., : shape[-2], : shape[-1]]


def dequantize_fp8_blocks(values: Array, scale: Array, dtype=np.float32) -> Array:
    """Inverse of `quantize_fp8_blocks`: values [..., R, C] e4m3, scale [..., ceil(R/128), ceil(C/128)] e8m0.

    Returns values * scale as `dtype` [..., R, C] (computed in float32; exact for any FP8 value).
    """
    if values.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"FP8 values must have dtype float8_e4m3fn, got {values.dtype}")
    want = (*values.shape[:-2], -(-values.shape[-2] // FP8_BLOCK), -(-values.shape[-1] // FP8_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} does not match values {values.shape}: want {want}")
    xp = _xp(values)
    s = _expand_block_scale(xp, e8m0_to_float32(scale), values.shape)
    return (values.astype(np.float32) * s).astype(dtype)


# ---- FP8 activations, 1x128 tiles ------------------------------------------------------------------------


def quantize_act_fp8(x: Array) -> tuple[Array, Array]:
    """Quantise activations to E4M3 with one UE8M0 scale per 1x128 tile of the last axis (dynamic scaling).

    Shapes:
      x [..., K] -> values float8_e4m3fn [..., K], scale float8_e8m0fnu [..., ceil(K/128)].
    """
    check_floating(x, "activation")
    xp = _xp(x)
    k = x.shape[-1]
    xpd = _pad_to(xp, x.astype(np.float32), {x.ndim - 1: ACT_BLOCK})
    tiles = xpd.reshape(*xpd.shape[:-1], -1, ACT_BLOCK)  # [..., K] -> [..., K/128, 128]
    e = _pow2_exponent(xp, xp.abs(tiles).max(axis=-1), FP8_MAX)  # [..., K/128]
    q = (tiles * _exp2(xp, -e)[..., None]).astype(ml_dtypes.float8_e4m3fn)
    return q.reshape(xpd.shape)[..., :k], _e8m0_from_exponent(xp, e)


def dequantize_act_fp8(values: Array, scale: Array, dtype=np.float32) -> Array:
    """Inverse of `quantize_act_fp8`. Shapes: values [..., K], scale [..., ceil(K/128)] -> [..., K]."""
    if values.dtype != ml_dtypes.float8_e4m3fn:
        raise ValueError(f"FP8 values must have dtype float8_e4m3fn, got {values.dtype}")
    want = (*values.shape[:-1], -(-values.shape[-1] // ACT_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"activation scale shape {tuple(scale.shape)} does not match values: want {want}")
    xp = _xp(values)
    s = xp.repeat(e8m0_to_float32(scale), ACT_BLOCK, axis=-1)[..., : values.shape[-1]]
    return (values.astype(np.float32) * s).astype(dtype)


# ---- MXFP4 weights, 1x32 blocks ----------------------------------------------------------------------------


# Rounding |x| to the E2M1 magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7), ties to the even code: the midpoint
# below an odd code rounds down (the code is reached only strictly above it), the midpoint below an even code rounds
# up. Each entry: (midpoint, reached at the midpoint itself, magnitude step to this code).
_E2M1_STEPS = ((0.25, False, 0.5), (0.75, True, 0.5), (1.25, False, 0.5), (1.75, True, 0.5),
               (2.5, False, 1.0), (3.5, True, 1.0), (5.0, False, 2.0))


def _e2m1_round(xp, x: Array) -> tuple[Array, Array]:
    """Round float32 x (|x| <= 6) to E2M1, ties to even: (4-bit codes uint8, their float32 values), shapes of x.

    Numpy: ml_dtypes' float4_e2m1fn cast. JAX: comparisons and sums only, the same bits on every backend (XLA's own
    float32 -> float4 conversion is not: docs/checkpoints.md, MXFP4).
    """
    if xp is np:  # the reference cast itself, 3-4x faster than the comparisons in numpy (the exporter's path)
        q = x.astype(ml_dtypes.float4_e2m1fn)
        return q.view(np.uint8), q.astype(np.float32)
    a = jnp.abs(x)
    code = jnp.zeros(x.shape, jnp.uint8)
    mag = jnp.zeros(x.shape, jnp.float32)
    for mid, at_mid, step in _E2M1_STEPS:
        up = (a >= mid) if at_mid else (a > mid)
        code = code + up.astype(jnp.uint8)
        mag = mag + jnp.where(up, jnp.float32(step), jnp.float32(0))
    neg = jnp.signbit(x)
    return code | (neg.astype(jnp.uint8) << 3), jnp.where(neg, -mag, mag)


def _mxfp4_round(xp, w: Array, axis: int) -> tuple[Array, Array, Array]:
    """E2M1 codes (uint8) and values (float32) of w, same shape as w with `axis` moved last; the block exponents."""
    wl = xp.moveaxis(w.astype(np.float32), axis, -1)
    blocks = wl.reshape(*wl.shape[:-1], -1, FP4_BLOCK)  # [..., I] -> [..., I/32, 32]
    e = _pow2_exponent(xp, xp.abs(blocks).max(axis=-1), FP4_MAX)  # [..., I/32]
    codes, values = _e2m1_round(xp, blocks * _exp2(xp, -e)[..., None])
    return codes.reshape(wl.shape), values.reshape(wl.shape), e


def check_fp4_axis(w: Array, axis: int) -> int:
    """The non-negative input axis of an MXFP4 weight; ValueError unless its size is a multiple of 32."""
    ax = _axis(w, axis)
    if w.shape[ax] % FP4_BLOCK:
        raise ValueError(f"MXFP4 needs the input axis ({w.shape[ax]}) to be a multiple of {FP4_BLOCK}")
    return ax


def pack_fp4(codes: Array, axis: int = -1) -> Array:
    """Pack 4-bit codes (uint8 in [0, 16)) two per byte along `axis`: low nibble = even index.

    Shapes: [..., I, ...] -> int8 [..., I/2, ...] (I along `axis`, must be even).
    """
    xp = _xp(codes)
    ax = _axis(codes, axis)
    if codes.shape[ax] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[ax]}) of 4-bit codes")
    c = xp.moveaxis(codes.astype(np.uint8), ax, -1)
    pairs = c.reshape(*c.shape[:-1], -1, 2)  # [..., I] -> [..., I/2, 2]
    packed = (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)
    return xp.moveaxis(_bitcast(xp, packed.astype(np.uint8), np.int8), -1, ax)


def unpack_fp4(packed: Array, axis: int = -1) -> Array:
    """Inverse of `pack_fp4`: int8 or uint8 [..., I/2, ...] -> uint8 codes [..., I, ...]."""
    if packed.dtype not in (np.int8, np.uint8):
        raise ValueError(f"packed FP4 must be int8 or uint8, got {packed.dtype}")
    xp = _xp(packed)
    ax = _axis(packed, axis)
    p = xp.moveaxis(_bitcast(xp, packed, np.uint8) if packed.dtype == np.int8 else packed, ax, -1)
    codes = xp.stack([p & 0xF, p >> 4], axis=-1)  # [..., I/2] -> [..., I/2, 2]
    return xp.moveaxis(codes.reshape(*p.shape[:-1], -1), -1, ax)


def quantize_mxfp4(w: Array, axis: int = -1) -> tuple[Array, Array]:
    """Quantise a weight to MXFP4: E2M1 codes packed two per byte, one UE8M0 scale per 32 along `axis`.

    Args:
      w: float weight; `axis` is its input (contraction) axis, a multiple of 32. Official layout [out, in]
        uses axis=-1; our expert layout [E, in, out] uses axis=-2.
      axis: the input axis.

    Returns:
      (packed int8, scale float8_e8m0fnu). Shapes for axis=-1: w [..., O, I] -> packed [..., O, I/2],
      scale [..., O, I/32] (the official files). For other axes the input axis shrinks the same way.

    Raises:
      ValueError: bad dtype/axis size, or (numpy) NaN/inf in w.
    """
    check_floating(w, "weight")
    ax = check_fp4_axis(w, axis)
    xp = _xp(w)
    codes, _, e = _mxfp4_round(xp, w, ax)
    return pack_fp4(xp.moveaxis(codes, -1, ax), axis=ax), xp.moveaxis(_e8m0_from_exponent(xp, e), -1, ax)


def dequantize_mxfp4(packed: Array, scale: Array, axis: int = -1, dtype=np.float32) -> Array:
    """Inverse of `quantize_mxfp4`: code value * 2**scale for every element.

    Shapes (axis=-1): packed [..., O, I/2] int8/uint8, scale [..., O, I/32] e8m0 -> [..., O, I] `dtype`.
    """
    xp = _xp(packed)
    ax = _axis(packed, axis)
    want = list(packed.shape)
    want[ax] = packed.shape[ax] * 2 // FP4_BLOCK
    if tuple(scale.shape) != tuple(want) or (packed.shape[ax] * 2) % FP4_BLOCK:
        raise ValueError(f"MXFP4 scale shape {tuple(scale.shape)} does not match packed {packed.shape}: "
                         f"want {tuple(want)} (input axis {ax} a multiple of {FP4_BLOCK})")
    vals = xp.asarray(E2M1_VALUES)[unpack_fp4(packed, ax).astype(np.int32)]
    s = xp.repeat(e8m0_to_float32(scale), FP4_BLOCK, axis=ax)
    return (vals * s).astype(dtype)


def mxfp4_round_trip(w: Array, axis: int) -> Array:
    """dequantize_mxfp4(*quantize_mxfp4(w, axis), axis) without packing: float32, same shape as w."""
    xp = _xp(w)
    _, q, e = _mxfp4_round(xp, w, axis)
    deq = (q.reshape(*q.shape[:-1], -1, FP4_BLOCK) * _exp2(xp, e)[..., None]).reshape(q.shape)
    return xp.moveaxis(deq, -1, axis)


def fp4_to_fp8_is_lossless(w: Array, axis: int = -1) -> bool:
    """Whether the MXFP4 -> FP8 (128x128 blocks) step of the paper's expert QAT path is exact for `w`.

    The V4 report quantises expert master weights to MXFP4 and dequantises them into FP8 blocks for the FP8
    GEMM. That is lossless while, inside each 128x128 block, the 1x32 FP4 scales span a small enough range
    (E4M3 has 2 more exponent bits than E2M1); this checks it for one weight (numpy or concrete JAX arrays).
    """
    xp = _xp(w)
    q4 = mxfp4_round_trip(w, check_fp4_axis(w, axis))
    q8 = dequantize_fp8_blocks(*quantize_fp8_blocks(q4))
    return bool(xp.array_equal(q4, q8))
