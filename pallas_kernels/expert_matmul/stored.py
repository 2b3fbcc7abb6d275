"""The grouped expert matmul on float master weights that the forward sees in a stored low-precision format.

`expert_matmul_stored(lhs, w, group_sizes, weight_format)` quantises the master weight w [E, K, N] to the format
an export stores ("fp8": E4M3 in 128x128 blocks with UE8M0 scales; "fp4": packed MXFP4, 1x32 blocks along K)
and hands the quantised bytes and scales to `expert_matmul`, which dequantises inside the kernel. The
gradient is straight-through (as QAT's fake quantisation): d lhs and d w are those of the float matmul with the
dequantised weight, d w reaching the master weight unchanged. The forward equals `expert_matmul(lhs,
fake_quant(w), group_sizes)` up to the kernel's summation order. "float" is `expert_matmul(lhs, w, ...)`.

`activation_format="fp8"` (with FP8 weights) also hands the kernel the token activations in V4's format: E4M3
in 1x128 tiles along K with UE8M0 scales, so every product is FP8 x FP8 with float32 accumulation per
128-slice. Its backward is DeepSeek's FP8 rule: Dgrad d lhs = dy @ W^T with dy in 1x128 tiles along N times the
same FP8 weight blocks (the kernel's `transpose_rhs`); Wgrad d w = lhs^T @ dy per expert with lhs and dy
re-tiled 128x1 (one scale per 128 sorted rows and column; a tile may span two experts' rows), run by the float
kernel on those dequantised values (exact in bfloat16), reaching the master weight straight through. The forward
equals the fake-quantised product (`quant.fake_quant_act_fp8(lhs)` times the dequantised weight) up to float32
summation order; `fp8_backward_reference` spells the gradients out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import formats
from pallas_kernels.autodiff import differentiable
from pallas_kernels.expert_matmul import expert_matmul

WEIGHT_FORMATS = ("float", "fp8", "fp4")
ACTIVATION_FORMATS = ("float", "fp8")


def stored_weight(w: jax.Array, weight_format: str) -> tuple[jax.Array, jax.Array | None]:
    """The kernel's (rhs, rhs_scale) for master weight w [E, K, N] in `weight_format` (see `expert_matmul`)."""
    if weight_format == "float":
        return w, None
    if weight_format == "fp8":
        return formats.quantize_fp8_blocks(w)  # [E, K, N] e4m3, [E, K/128, N/128] e8m0
    if weight_format == "fp4":
        return formats.quantize_mxfp4(w, axis=-2)  # [E, K/2, N] int8, [E, K/32, N] e8m0
    raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")


def dequantized_weight(w: jax.Array, weight_format: str, dtype) -> jax.Array:
    """What the kernel multiplies by: the stored weight decoded to `dtype` (exact in bfloat16). Shape of w."""
    if weight_format == "float":
        return w.astype(dtype)
    if weight_format == "fp8":
        return formats.dequantize_fp8_blocks(*formats.quantize_fp8_blocks(w), dtype=dtype)
    return formats.mxfp4_round_trip(w, w.ndim - 2).astype(dtype)


def _stored_forward(lhs, w, group_sizes, weight_format, impl, interpret):
    rhs, rhs_scale = stored_weight(w, weight_format)
    out = expert_matmul(lhs, rhs, group_sizes, rhs_scale, impl=impl, interpret=interpret)
    return out, (lhs, w, group_sizes)


def _stored_backward(weight_format, impl, interpret, res, g):
    lhs, w, group_sizes = res
    w_dq = dequantized_weight(w, weight_format, lhs.dtype)
    _, pull = jax.vjp(lambda a, b: expert_matmul(a, b, group_sizes, impl=impl, interpret=interpret), lhs, w_dq)
    d_lhs, d_w = pull(g)
    return d_lhs, d_w.astype(w.dtype)


_stored_matmul = differentiable(_stored_forward, _stored_backward, n_static=3, grad_argnums=(0, 1))


def _fp8_tiles(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """1x128 tiles of x [M, C] along C: E4M3 values and UE8M0 scales [M, ceil(C/128)]."""
    return formats.quantize_act_fp8(x)


def _fake_quant_rows(x: jax.Array) -> jax.Array:
    """x [M, C] through E4M3 in 128x1 tiles (one scale per 128 rows of each column), dequantised in x's dtype."""
    return formats.dequantize_act_fp8(*formats.quantize_act_fp8(x.T), dtype=x.dtype).T


def _fp8_forward(lhs, w, group_sizes, impl, interpret):
    rhs, rhs_scale = formats.quantize_fp8_blocks(w)
    xq, xs = _fp8_tiles(lhs)
    out = expert_matmul(xq, rhs, group_sizes, rhs_scale, lhs_scale=xs, out_dtype=lhs.dtype, impl=impl,
                        interpret=interpret)
    return out, (lhs, w, group_sizes)


def _fp8_backward(impl, interpret, res, g):
    lhs, w, group_sizes = res
    rhs, rhs_scale = formats.quantize_fp8_blocks(w)
    gq, gs = _fp8_tiles(g)
    d_lhs = expert_matmul(gq, rhs, group_sizes, rhs_scale, lhs_scale=gs, transpose_rhs=True, out_dtype=lhs.dtype,
                          impl=impl, interpret=interpret)
    x_rows, g_rows = _fake_quant_rows(lhs), _fake_quant_rows(g.astype(lhs.dtype))
    _, pull = jax.vjp(lambda b: expert_matmul(x_rows, b, group_sizes, impl=impl, interpret=interpret),
                      w.astype(lhs.dtype))
    (d_w,) = pull(g_rows)
    return d_lhs, d_w.astype(w.dtype)


_fp8_matmul = differentiable(_fp8_forward, _fp8_backward, n_static=2, grad_argnums=(0, 1))


def fp8_backward_reference(lhs: jax.Array, w: jax.Array, group_sizes: jax.Array, dy: jax.Array):
    """The gradients of `activation_format="fp8"`, as float32 grouped matmuls of dequantised operands (tests).

    Shapes: lhs [M, K], w [E, K, N], group_sizes [E], dy [M, N] -> d lhs [M, K], d w [E, K, N] (float32).
    """
    w_fq = formats.dequantize_fp8_blocks(*formats.quantize_fp8_blocks(w))
    dy_tiles = formats.dequantize_act_fp8(*formats.quantize_act_fp8(dy))
    hi, f32 = jax.lax.Precision.HIGHEST, jnp.float32
    d_lhs = jax.lax.ragged_dot(dy_tiles, w_fq.swapaxes(1, 2), group_sizes, precision=hi, preferred_element_type=f32)
    x_rows, dy_rows = _fake_quant_rows(lhs.astype(f32)), _fake_quant_rows(dy.astype(f32))
    _, pull = jax.vjp(lambda b: jax.lax.ragged_dot(x_rows, b, group_sizes, precision=hi), w_fq)
    return d_lhs, pull(dy_rows)[0]


def expert_matmul_stored(lhs: jax.Array, w: jax.Array, group_sizes: jax.Array, weight_format: str = "float", *,
                         impl=None, activation_format: str = "float", interpret=None) -> jax.Array:
    """Grouped expert matmul of expert-sorted rows with master weights seen in `weight_format` (module docstring).

    Args:
      lhs: tokens sorted by expert, bfloat16/float32.
      w: float master weights [E, K, N] (float32 or bfloat16); "float" multiplies them as given.
      group_sizes: int32 rows per expert.
      weight_format: "float", "fp8" or "fp4" (K a multiple of 32).
      impl: `expert_matmul`'s implementation choice (pallas_kernels.dispatch).
      activation_format: "float" (lhs as given) or "fp8" (weight_format "fp8" only): lhs reaches the kernel as
        E4M3 1x128 tiles, with the FP8 backward of the module docstring.
      interpret: `expert_matmul`'s interpret flag (Pallas kernels on CPU).

    Shapes: lhs [M, K], w [E, K, N], group_sizes [E] -> [M, N] in lhs.dtype.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    if activation_format not in ACTIVATION_FORMATS:
        raise ValueError(f"activation_format must be one of {', '.join(ACTIVATION_FORMATS)}, got {activation_format!r}")
    if activation_format == "fp8":
        if weight_format != "fp8":
            raise ValueError(f"activation_format='fp8' needs weight_format='fp8', got {weight_format!r}")
        return _fp8_matmul(lhs, w, group_sizes, impl, interpret)
    if weight_format == "float":
        return expert_matmul(lhs, w, group_sizes, impl=impl, interpret=interpret)
    return _stored_matmul(lhs, w, group_sizes, weight_format, impl, interpret)
