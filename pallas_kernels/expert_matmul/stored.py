"""The grouped expert matmul on float master weights that the forward sees in a stored low-precision format.

`expert_matmul_stored(lhs, w, group_sizes, weight_format)` quantises the master weight w [E, K, N] to the format
an export stores ("fp8": E4M3 in 128x128 blocks with UE8M0 scales; "fp4": packed MXFP4, 1x32 blocks along K)
and hands the quantised bytes and scales to `expert_matmul`, which dequantises inside the kernel. The
gradient is straight-through (as QAT's fake quantisation): d lhs and d w are those of the float matmul with the
dequantised weight, d w reaching the master weight unchanged. The forward equals `expert_matmul(lhs,
fake_quant(w), group_sizes)` up to the kernel's summation order. "float" is `expert_matmul(lhs, w, ...)`.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import formats
from pallas_kernels.expert_matmul import expert_matmul

WEIGHT_FORMATS = ("float", "fp8", "fp4")


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stored_matmul(lhs, w, group_sizes, weight_format, impl):
    rhs, rhs_scale = stored_weight(w, weight_format)
    return expert_matmul(lhs, rhs, group_sizes, rhs_scale, impl=impl)


def _stored_fwd(lhs, w, group_sizes, weight_format, impl):
    return _stored_matmul(lhs, w, group_sizes, weight_format, impl), (lhs, w, group_sizes)


def _stored_bwd(weight_format, impl, res, g):
    lhs, w, group_sizes = res
    w_dq = dequantized_weight(w, weight_format, lhs.dtype)
    _, pull = jax.vjp(lambda a, b: expert_matmul(a, b, group_sizes, impl=impl), lhs, w_dq)
    d_lhs, d_w = pull(g)
    return d_lhs, d_w.astype(w.dtype), None


_stored_matmul.defvjp(_stored_fwd, _stored_bwd)


def expert_matmul_stored(lhs: jax.Array, w: jax.Array, group_sizes: jax.Array, weight_format: str = "float", *,
                         impl=None) -> jax.Array:
    """Grouped expert matmul of expert-sorted rows with master weights seen in `weight_format` (module docstring).

    Args:
      lhs: tokens sorted by expert, bfloat16/float32.
      w: float master weights [E, K, N] (float32 or bfloat16); "float" multiplies them as given.
      group_sizes: int32 rows per expert.
      weight_format: "float", "fp8" or "fp4" (K a multiple of 32).
      impl: `expert_matmul`'s implementation choice (pallas_kernels.dispatch).

    Shapes: lhs [M, K], w [E, K, N], group_sizes [E] -> [M, N] in lhs.dtype.
    """
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    if weight_format == "float":
        return expert_matmul(lhs, w, group_sizes, impl=impl)
    return _stored_matmul(lhs, w, group_sizes, weight_format, impl)
