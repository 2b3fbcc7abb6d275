"""Real FP8 GEMMs for `quant="fp8"` / `"fp4"` on GPU: E4M3 x E4M3 products, float32 accumulation, V4's scales.

`fp8_linear(x, w)` quantises the activation x [..., K] in 1x128 tiles along K and the weight w [K, N] in
128x128 blocks (UE8M0 scales, the formats of `pallas_kernels.formats`), then runs one XLA FP8 dot per 128-wide
slice of K (`dot_general` batched over the K/128 slices, float8_e4m3fn operands, float32 results) and applies
the two scales in float32 while summing the slices: the per-128 promotion to float32 of DeepSeek's FP8 GEMM
(docs/training.md, low precision). The backward is the emulation's: straight-through gradients, the gradient
GEMMs on the FP8-rounded operands in the compute dtype, so training sees the same gradients as on CPU.

The forward equals the emulation `fake_quant_act_fp8(x) @ fake_quant_fp8_blocks(w)` up to float32 summation
order. The partial products are materialised as [K/128, M, N] float32 before the sum (XLA does not fuse the
scaled reduction into the FP8 GEMM); this costs memory traffic, which a fused kernel would not.
"""

from __future__ import annotations

import functools

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


def fp8_matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """The FP8 forward GEMM (module docstring), no gradient rule. Shapes: x [..., K], w [K, N] -> [..., N]."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[1]
    xq, sx = formats.quantize_act_fp8(x.reshape(-1, k))  # [M, K] e4m3, [M, Kb] e8m0
    wq, sw = formats.quantize_fp8_blocks(w)  # [K, N] e4m3, [Kb, Nb] e8m0
    pad = -k % BLOCK
    if pad:
        xq = jnp.pad(xq, ((0, 0), (0, pad)))
        wq = jnp.pad(wq, ((0, pad), (0, 0)))
    kb = (k + pad) // BLOCK
    m = xq.shape[0]
    partial = jax.lax.dot_general(xq.reshape(m, kb, BLOCK), wq.reshape(kb, BLOCK, n),
                                  (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)  # [Kb, M, N]
    sx = formats.e8m0_to_float32(sx).T[:, :, None]  # [Kb, M, 1]
    sw = jnp.repeat(formats.e8m0_to_float32(sw), BLOCK, axis=1)[:, None, :n]  # [Kb, 1, N]
    y = jnp.sum(partial * sx * sw, axis=0)
    return y.astype(out_dtype or x.dtype).reshape(*lead, n)


@jax.custom_vjp
def fp8_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """FP8 x FP8 forward, the emulation's straight-through backward. Shapes: x [..., K], w [K, N] -> [..., N] in
    x's dtype (w: the float master weight, any float dtype)."""
    return fp8_matmul(x, w)


def _fwd(x, w):
    return fp8_matmul(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    _, pull = jax.vjp(emulated_linear, x, w)
    return pull(g)


fp8_linear.defvjp(_fwd, _bwd)


@functools.cache
def _check_dot_support() -> bool:
    """Whether XLA on this backend executes an FP8 dot (used by tests and the device check)."""
    a = jnp.ones((1, 1, BLOCK), jnp.float8_e4m3fn)
    b = jnp.ones((1, BLOCK, 1), jnp.float8_e4m3fn)
    try:
        jax.lax.dot_general(a, b, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)
    except Exception:  # noqa: BLE001  (any lowering or runtime failure means "no")
        return False
    return True


def backend_runs_fp8_dots() -> bool:
    return _check_dot_support()
