"""Low-precision weight and activation formats of DeepSeek-V4, exactly as the official checkpoints store them.

The formats themselves (FP8 E4M3 128x128 weight blocks and 1x128 activation tiles, MXFP4 E2M1 1x32 blocks, all
with UE8M0 scales; packing low nibble = even index; the round-up power-of-two scale rule) live in the leaf module
`pallas_kernels.formats`, which the expert-matmul kernels also decode; they are re-exported here unchanged, so
`quant.quantize_fp8_blocks` and `formats.quantize_fp8_blocks` are the same function. This module adds the
training side: straight-through fake quantisation (`fake_quant_*`, JAX only: forward = quantise then dequantise,
gradient = identity) and the safetensors dtype patch. See docs/training.md (low precision) and
docs/checkpoints.md (storage formats).
"""

from __future__ import annotations

import functools

import jax
import ml_dtypes
import numpy as np

from pallas_kernels import formats
from pallas_kernels.formats import (
    ACT_BLOCK,
    E2M1_VALUES,
    E8M0_BIAS,
    FP4_BLOCK,
    FP4_MAX,
    FP8_BLOCK,
    FP8_MAX,
    dequantize_act_fp8,
    dequantize_fp8_blocks,
    dequantize_mxfp4,
    e8m0_to_float32,
    fp4_to_fp8_is_lossless,
    pack_fp4,
    quantize_act_fp8,
    quantize_fp8_blocks,
    quantize_mxfp4,
    unpack_fp4,
)

__all__ = [
    "ACT_BLOCK",
    "E2M1_VALUES",
    "E8M0_BIAS",
    "FP4_BLOCK",
    "FP4_MAX",
    "FP8_BLOCK",
    "FP8_MAX",
    "dequantize_act_fp8",
    "dequantize_fp8_blocks",
    "dequantize_mxfp4",
    "e8m0_to_float32",
    "fake_quant_act_fp8",
    "fake_quant_fp8_blocks",
    "fake_quant_mxfp4",
    "fp4_to_fp8_is_lossless",
    "pack_fp4",
    "patch_numpy_fp8_dtypes",
    "quantize_act_fp8",
    "quantize_fp8_blocks",
    "quantize_mxfp4",
    "unpack_fp4",
]


# ---- straight-through fake quantisation (JAX, training) -----------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _straight_through(fn, x):
    return fn(x)


def _st_fwd(fn, x):
    return fn(x), None


def _st_bwd(fn, _, g):
    return (g,)


_straight_through.defvjp(_st_fwd, _st_bwd)


def _fq_fp8_blocks(w):
    return dequantize_fp8_blocks(*quantize_fp8_blocks(w), dtype=w.dtype)


def _fq_act_fp8(x):
    return dequantize_act_fp8(*quantize_act_fp8(x), dtype=x.dtype)


@functools.cache
def _fq_mxfp4(axis: int):
    return lambda w: formats.mxfp4_round_trip(w, axis).astype(w.dtype)


def fake_quant_fp8_blocks(w: jax.Array) -> jax.Array:
    """FP8 128x128-block quantise-dequantise with a straight-through gradient (non-expert linears).

    Shapes: w [..., R, C] -> same shape and dtype.
    """
    formats.check_floating(w, "weight")
    return _straight_through(_fq_fp8_blocks, w)


def fake_quant_act_fp8(x: jax.Array) -> jax.Array:
    """FP8 1x128-tile quantise-dequantise of activations along the last axis, straight-through gradient.

    Shapes: x [..., K] -> same shape and dtype.
    """
    formats.check_floating(x, "activation")
    return _straight_through(_fq_act_fp8, x)


def fake_quant_mxfp4(w: jax.Array, axis: int = -1) -> jax.Array:
    """Expert QAT: MXFP4 quantise-dequantise with a straight-through gradient to the master weight.

    The forward is bit-identical to `dequantize_mxfp4(*quantize_mxfp4(w, axis), axis)`, i.e. to the weights an
    exported MXFP4 checkpoint holds. The paper then re-expresses these values as FP8 128x128 blocks for its FP8
    GEMM; that step is exact whenever `fp4_to_fp8_is_lossless(w)` holds (it does for trained and randomly
    initialised weights), so we skip it and keep export and training forward identical. The values are exact
    in bfloat16, so a bfloat16 master weight loses nothing here either.

    Shapes: w [..., I, ...] (I = `axis`, a multiple of 32) -> same shape and dtype.
    """
    formats.check_floating(w, "weight")
    return _straight_through(_fq_mxfp4(formats.check_fp4_axis(w, axis)), w)


# ---- safetensors -------------------------------------------------------------------------------------------


def patch_numpy_fp8_dtypes() -> None:
    """Make `safetensors.numpy` able to load F8_E4M3 / F8_E5M2 / F8_E8M0 tensors (idempotent).

    safetensors looks the fp8 dtypes up as attributes of the numpy module, which numpy itself does not define;
    this sets them to the ml_dtypes types. Call it once before `safetensors.numpy.load_file` / `safe_open`.
    """
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"):
        if not hasattr(np, name):
            setattr(np, name, getattr(ml_dtypes, name))
