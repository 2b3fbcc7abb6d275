"""Pure-JAX grouped expert matmul: the specification the Pallas kernels are tested against.

out[m] = lhs[m] @ W[g(m)] for the rows m of group g (tokens sorted by expert), where W is the dequantised
expert weight. Rows beyond sum(group_sizes) are zero. Products are accumulated in float32.

Weights are [E, K, N] = [E, in, out] (see `common` for the FP8 and MXFP4 forms). Quantised weights are
dequantised to lhs.dtype (exact: FP8 and FP4 values times a power of two fit in bfloat16) and treated as
constants: gradients flow to lhs, and to float weights only. QAT trains float master weights through
straight-through fake quantisation (the formats of `pallas_kernels.formats`) and passes the result here as
float weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.expert_matmul import common


def expert_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    rhs_scale: jax.Array | None = None,
    *,
    out_dtype=None,
    lhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """Grouped matmul of expert-sorted tokens with per-expert (optionally quantised) weights.

    Args:
      lhs: tokens sorted by expert, bfloat16/float32.
      rhs: expert weights: float, float8_e4m3fn (FP8 with 128x128 scales) or int8/uint8 (packed MXFP4).
      group_sizes: rows per expert, int32; sum <= M.
      rhs_scale: UE8M0 (or float32) scales for FP8 / MXFP4 weights, else None.
      out_dtype: output dtype (default lhs.dtype; bfloat16 for FP8 activations).
      lhs_scale: FP8 activations only: their 1x128 tile scales [M, ceil(C/128)] (UE8M0 or float32), lhs being
        float8_e4m3fn [M, C]; the weights must then be FP8. Both are dequantised to float32 and multiplied in
        float32 (the values an FP8 x FP8 GEMM with per-128 float32 promotion computes). No gradient to lhs.
      transpose_rhs: FP8 activations only: multiply by W[g]^T (lhs [M, N] -> out [M, K]), the FP8 Dgrad.

    Returns:
      out [M, N] ([M, K] with transpose_rhs).

    Shapes:
      lhs [M, K], group_sizes [E]; rhs [E, K, N] (float, FP8) or [E, K/2, N] (MXFP4);
      rhs_scale [E, ceil(K/128), ceil(N/128)] (FP8) or [E, K/32, N] (MXFP4) -> out [M, N].
    """
    fmt = common.weight_format(lhs, rhs, group_sizes, rhs_scale, transpose_rhs)
    act = common.activation_format(lhs, lhs_scale, fmt, transpose_rhs)
    common.check_group_sizes(group_sizes, lhs.shape[0])
    if act == "fp8":
        w = common.dequantize(rhs, rhs_scale, fmt, jnp.float32)
        out = jax.lax.ragged_dot(common.dequantize_activations(lhs, lhs_scale), w.swapaxes(1, 2) if transpose_rhs
                                 else w, group_sizes.astype(jnp.int32), precision=jax.lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32)
        return out.astype(out_dtype or jnp.bfloat16)
    w = common.dequantize(rhs, rhs_scale, fmt, lhs.dtype)  # [E, K, N]
    out = jax.lax.ragged_dot(lhs, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
    return out.astype(out_dtype or lhs.dtype)
