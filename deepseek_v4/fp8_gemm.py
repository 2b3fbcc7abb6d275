"""Real FP8 GEMMs for `quant="fp8"` / `"fp4"` on GPU: E4M3 x E4M3 products, float32 accumulation, V4's scales.

`fp8_linear(x, w)` computes y = x @ w for an activation x [..., K] and a float master weight w [K, N]:
* forward (Fprop): x in 1x128 tiles along K, w in 128x128 blocks (UE8M0 scales, `pallas_kernels.formats`);
* backward, DeepSeek's FP8 recipe (docs/training.md, low precision): Dgrad dx = dy @ w^T with dy in 1x128 tiles
  along N and the same 128x128 weight blocks; Wgrad dw = x^T @ dy with x and dy re-tiled 128x1 (128 tokens per
  scale, along the contraction axis M). dw reaches the master weight straight through (no gradient through the
  quantisation), like the emulation's.
Every GEMM is one XLA FP8 dot per 128-wide slice of its contraction axis (`dot_general` batched over the slices,
float8_e4m3fn operands, float32 results); the per-slice scales are applied in float32 while the slices are summed:
the per-128 float32 promotion of DeepSeek's FP8 GEMM. The partial products are materialised as
[slices, rows, cols] float32 before the sum (XLA does not fuse the scaled reduction into the FP8 dot): memory
traffic a fused kernel would not pay.

The forward equals the emulation `fake_quant_act_fp8(x) @ fake_quant_fp8_blocks(w)` up to float32 summation
order; the backward equals the emulation's straight-through GEMMs on FP8-rounded dy (and re-tiled x), which the
emulation does not round (`quantised_backward_reference` spells it out for the tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deepseek_v4 import quant
from pallas_kernels import formats

BLOCK = formats.FP8_BLOCK


def native() -> bool:
    """Whether this backend runs the FP8 GEMMs natively (GPU); elsewhere `quant` stays an emulation."""
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def emulated_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """The emulation: fake-quantised activation times fake-quantised weight in x's dtype. [..., K] x [K, N]."""
    return quant.fake_quant_act_fp8(x) @ quant.fake_quant_fp8_blocks(w).astype(x.dtype)


def _scaled_dot(aq, a_scale, bq, b_scale) -> jax.Array:
    """sum over 128-slices s of K: (aq[:, s] @ bq[s, :]) * a_scale[:, s] * b_scale[s, :], float32.

    Shapes: aq [M, K] e4m3, a_scale [M, Kb] f32, bq [K, N] e4m3, b_scale [Kb, N] f32 -> [M, N] f32.
    """
    m, k = aq.shape
    n = bq.shape[1]
    pad = -k % BLOCK
    if pad:
        aq = jnp.pad(aq, ((0, 0), (0, pad)))
        bq = jnp.pad(bq, ((0, pad), (0, 0)))
    kb = (k + pad) // BLOCK
    partial = jax.lax.dot_general(aq.reshape(m, kb, BLOCK), bq.reshape(kb, BLOCK, n),
                                  (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)  # [Kb, M, N]
    return jnp.sum(partial * a_scale.T[:, :, None] * b_scale[:, None, :], axis=0)


def _tiles_along_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """E4M3 values of x [R, C] with one scale per 128 rows of each column (128x1 tiles): (q [R, C], s [Rb, C])."""
    q, s = formats.quantize_act_fp8(x.T)  # [C, R], [C, Rb]
    return q.T, formats.e8m0_to_float32(s).T


def _weight_blocks(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """128x128 blocks of w [K, N]: (q [K, N] e4m3, the block scale per (K-block, column) [Kb, N] f32)."""
    q, s = formats.quantize_fp8_blocks(w)
    return q, jnp.repeat(formats.e8m0_to_float32(s), BLOCK, axis=1)[:, : w.shape[1]]


def _act_tiles(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """1x128 tiles of x [M, K] along K: (q [M, K] e4m3, s [M, Kb] f32)."""
    q, s = formats.quantize_act_fp8(x)
    return q, formats.e8m0_to_float32(s)


def fp8_matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """The FP8 forward GEMM (module docstring), no gradient rule. Shapes: x [..., K], w [K, N] -> [..., N]."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = _scaled_dot(*_act_tiles(x.reshape(-1, k)), *_weight_blocks(w))
    return y.astype(out_dtype or x.dtype).reshape(*lead, w.shape[1])


def _fp8_grads(x2: jax.Array, w: jax.Array, dy2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dgrad and Wgrad in FP8 (module docstring). Shapes: x2 [M, K], w [K, N], dy2 [M, N] -> [M, K], [K, N] f32."""
    wq, ws = formats.quantize_fp8_blocks(w)  # the forward's blocks; w^T's blocks are their transposes
    ws_t = jnp.repeat(formats.e8m0_to_float32(ws).T, BLOCK, axis=1)[:, : w.shape[0]]  # [Nb, K]
    dx = _scaled_dot(*_act_tiles(dy2), wq.T, ws_t)
    xq, xs = _tiles_along_rows(x2)  # [M, K], [Mb, K]
    dyq, dys = _tiles_along_rows(dy2)  # [M, N], [Mb, N]
    dw = _scaled_dot(xq.T, xs.T, dyq, dys)
    return dx, dw


@jax.custom_vjp
def fp8_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """FP8 Fprop, Dgrad and Wgrad (module docstring). Shapes: x [..., K], w [K, N] -> [..., N] in x's dtype
    (w: the float master weight, any float dtype)."""
    return fp8_matmul(x, w)


def _fwd(x, w):
    return fp8_matmul(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    k, n = w.shape
    dx, dw = _fp8_grads(x.reshape(-1, k), w, g.reshape(-1, n))
    return dx.astype(x.dtype).reshape(x.shape), dw.astype(w.dtype)


fp8_linear.defvjp(_fwd, _bwd)


def quantised_backward_reference(x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients `fp8_linear` computes, as float32 matmuls of dequantised operands (for tests).

    Shapes: x [M, K], w [K, N], dy [M, N] -> dx [M, K], dw [K, N] (float32).
    """
    w_fq = formats.dequantize_fp8_blocks(*formats.quantize_fp8_blocks(w))
    dy_rows = formats.dequantize_act_fp8(*formats.quantize_act_fp8(dy))
    x_cols = formats.dequantize_act_fp8(*formats.quantize_act_fp8(x.T)).T
    dy_cols = formats.dequantize_act_fp8(*formats.quantize_act_fp8(dy.T)).T
    hi = jax.lax.Precision.HIGHEST
    return jnp.dot(dy_rows, w_fq.T, precision=hi), jnp.dot(x_cols.T, dy_cols, precision=hi)


def backend_runs_fp8_dots() -> bool:
    """Whether XLA on this backend executes an FP8 dot (the tests and the device check ask)."""
    a = jnp.ones((1, 1, BLOCK), jnp.float8_e4m3fn)
    b = jnp.ones((1, BLOCK, 1), jnp.float8_e4m3fn)
    try:
        jax.block_until_ready(jax.lax.dot_general(a, b, (((2,), (1,)), ((1,), (0,))),
                                                  preferred_element_type=jnp.float32))
    except Exception:  # noqa: BLE001  (any lowering or runtime failure means "no")
        return False
    return True
