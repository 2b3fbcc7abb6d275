"""Low-precision grouped (ragged) matmul over experts: `expert_matmul(..., impl=None)`.

lhs [M, K] holds tokens sorted by expert, group_sizes [E] how many rows each expert owns, and the weights
are [E, K, N] = [E, in, out] (our model's layout) in one of three forms, told apart by dtype:
float (bf16/f32), FP8 E4M3 + 128x128 UE8M0 block scales, or packed MXFP4 (two E2M1 codes per byte along K,
low nibble = even k) + 1x32 UE8M0 scales. Official checkpoints store experts [out, in]: pass
`swapaxes(-1, -2)` of their values, scales and packed bytes (see `common`). Weights are dequantised inside
the kernel; products accumulate in float32. Gradients: w.r.t. lhs always, w.r.t. float weights; quantised
weights are constants (QAT trains float master weights through straight-through fake quantisation).

Call it on local shards (inside the MoE `shard_map` over the expert axis, `check_vma=False`).

Implementations ("reference" = pure JAX via `jax.lax.ragged_dot`, "pallas_gpu" = Triton style for the H200,
"pallas_tpu" = Mosaic TPU style, "pallas", None) follow the one dispatch rule of `pallas_kernels.dispatch`.
Contract: docs/kernels.md.
"""

from __future__ import annotations

import jax

from pallas_kernels.dispatch import Impl, resolve_impl
from pallas_kernels.expert_matmul import pallas_gpu, pallas_tpu, reference
from pallas_kernels.expert_matmul.common import BlockSizes

__all__ = ["BlockSizes", "expert_matmul"]


def expert_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    rhs_scale: jax.Array | None = None,
    *,
    impl: Impl = None,
    out_dtype=None,
    block_sizes: BlockSizes | None = None,
    interpret=None,
    lhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """Grouped expert matmul out[m] = lhs[m] @ dequant(W[g(m)]), rows beyond sum(group_sizes) zero.

    Args:
      lhs: tokens sorted by expert, bfloat16/float32, or FP8 activations: float8_e4m3fn with `lhs_scale`
        (FP8 weights only; no autodiff through them: `stored.expert_matmul_stored` gives their FP8 backward).
      rhs: weights: float [E, K, N], float8_e4m3fn [E, K, N] (FP8) or int8/uint8 [E, K/2, N] (MXFP4).
      group_sizes: int32 rows per expert (sum <= M).
      rhs_scale: FP8 [E, ceil(K/128), ceil(N/128)] or MXFP4 [E, K/32, N] scales (float8_e8m0fnu or float32).
      impl: see the module docstring.
      out_dtype: output dtype, default lhs.dtype (bfloat16 for FP8 activations).
      block_sizes: Pallas tile sizes (ignored by the reference).
      interpret: run a Pallas kernel in the interpreter (True or `pltpu.InterpretParams()`); default False.
      lhs_scale: the 1x128 tile scales [M, ceil(C/128)] of FP8 activations (float8_e8m0fnu or float32).
      transpose_rhs: FP8 activations only: out = lhs @ dequant(W[g])^T, lhs [M, N] -> [M, K] (the FP8 Dgrad).

    Returns:
      [M, N] ([M, K] with transpose_rhs) in out_dtype.

    Shapes:
      lhs [M, K], rhs [E, K, N], group_sizes [E] -> out [M, N].
    """
    chosen, interp = resolve_impl(impl, interpret)
    if chosen == "reference":
        return reference.expert_matmul(lhs, rhs, group_sizes, rhs_scale, out_dtype=out_dtype, lhs_scale=lhs_scale,
                                       transpose_rhs=transpose_rhs)
    module = pallas_gpu if chosen == "pallas_gpu" else pallas_tpu
    return module.expert_matmul(lhs, rhs, group_sizes, rhs_scale, out_dtype=out_dtype, block_sizes=block_sizes,
                                interpret=interp, lhs_scale=lhs_scale, transpose_rhs=transpose_rhs)
