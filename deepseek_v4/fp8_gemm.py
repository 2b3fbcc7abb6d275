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

`fp8_grouped_linear(x, w)` is the same per group g: y[..., g, :] = x[..., g, :] @ w[g] for the grouped output
projection w [G, I, O], whose 128x128 blocks are those of the official [G*O, I] matrix; when O is not a multiple
of 128 a block spans groups, and Dgrad (contracting O) then cuts its slices at gcd(O, 128) so that each slice
lies inside one weight block. `layers.qlinear` picks the function by the weight's layout (a "heads" weight
[in, N, H] is the matrix [in, N*H]).

The forward equals the emulation `fake_quant_act_fp8(x) @ fake_quant_fp8_blocks(w)` up to float32 summation
order; the backward equals the emulation's straight-through GEMMs on FP8-rounded dy (and re-tiled x), which the
emulation does not round (`quantised_backward_reference` spells it out for the tests).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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


def _scaled_dot(aq, a_scale, bq, b_scale, width: int = BLOCK) -> jax.Array:
    """sum over `width`-slices s of K: (aq[:, s] @ bq[s, :]) * a_scale[:, s] * b_scale[s, :], float32.

    Shapes: aq [M, K] e4m3, a_scale [M, S] f32, bq [K, N] e4m3, b_scale [S, N] f32 -> [M, N] f32 (S = ceil(K/width)).
    """
    m, k = aq.shape
    n = bq.shape[1]
    pad = -k % width
    if pad:
        aq = jnp.pad(aq, ((0, 0), (0, pad)))
        bq = jnp.pad(bq, ((0, pad), (0, 0)))
    kb = (k + pad) // width
    partial = jax.lax.dot_general(aq.reshape(m, kb, width), bq.reshape(kb, width, n),
                                  (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.float32)  # [Kb, M, N]
    return jnp.sum(partial * a_scale.T[:, :, None] * b_scale[:, None, :], axis=0)


def _tiles_along_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """E4M3 values of x [R, C] with one scale per 128 rows of each column (128x1 tiles): (q [R, C], s [Rb, C])."""
    q, s = formats.quantize_act_fp8(x.T)  # [C, R], [C, Rb]
    return q.T, formats.e8m0_to_float32(s).T


def _act_tiles(x: jax.Array, width: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """1x128 tiles of x [..., K] along K: (q [..., K] e4m3, the scale of each `width`-slice [..., ceil(K/width)] f32).

    `width` divides 128 (a slice lies inside one tile)."""
    q, s = formats.quantize_act_fp8(x)
    s = formats.e8m0_to_float32(s)
    if width != BLOCK:
        s = jnp.repeat(s, BLOCK // width, axis=-1)[..., : -(-x.shape[-1] // width)]
    return q, s


class _Weight(NamedTuple):
    """A weight's FP8 operands as G batched matrices [K, N] (the forward's) and [N, K] (Dgrad's).

    q [G, K, N] e4m3 and s [G, ceil(K/128), N] f32: the scale of each 128-slice of K per output column;
    q_t [G, N, K] and s_t [G, ceil(N/width_t), K]: the same blocks for Dgrad, whose contraction (N) is cut into
    `width_t`-slices that each lie inside one weight block and one 1x128 tile of dy.
    """

    q: jax.Array
    s: jax.Array
    q_t: jax.Array
    s_t: jax.Array
    width_t: int


def _weight(w: jax.Array, layout: str) -> _Weight:
    """The FP8 blocks of a master weight in `layout` (see `fp8_linear` / `fp8_grouped_linear`)."""
    if layout == "matrix":  # w [K, N]: blocks of [K, N] are the transposes of the official [N, K] blocks
        k, n = w.shape
        q, s = formats.quantize_fp8_blocks(w)
        s = formats.e8m0_to_float32(s)  # [Kb, Nb]
        return _Weight(q[None], jnp.repeat(s, BLOCK, axis=1)[None, :, :n], q.T[None],
                       jnp.repeat(s.T, BLOCK, axis=1)[None, :, :k], BLOCK)
    # "grouped": w [G, I, O], blocks of the official [G*O, I] matrix (rows g*O + o), which may span groups.
    g, i, o = w.shape
    q, s = formats.quantize_fp8_blocks(w.transpose(0, 2, 1).reshape(g * o, i))
    s = formats.e8m0_to_float32(s)  # [ceil(G*O/128), Ib]
    block_row = (jnp.arange(g * o, dtype=jnp.int32) // BLOCK).reshape(g, o)  # [G, O]
    width_t = math.gcd(o, BLOCK)  # Dgrad slices of O: never cross a block boundary nor a dy tile
    s_t = jnp.repeat(s[block_row[:, ::width_t]], BLOCK, axis=2)[:, :, :i]  # [G, O/width_t, I]
    q_t = q.reshape(g, o, i)
    return _Weight(q_t.transpose(0, 2, 1), s[block_row].transpose(0, 2, 1), q_t, s_t, width_t)


def _batched(fn, width: int = BLOCK):
    return jax.vmap(functools.partial(fn, width=width))


def _forward(x3: jax.Array, wt: _Weight) -> jax.Array:
    """Fprop: x3 [G, M, K] -> [G, M, N] float32."""
    return _batched(_scaled_dot)(*_act_tiles(x3), wt.q, wt.s)


def _fp8_grads(x3: jax.Array, wt: _Weight, dy3: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dgrad and Wgrad in FP8 (module docstring). Shapes: x3 [G, M, K], dy3 [G, M, N] -> [G, M, K], [G, K, N] f32."""
    dx = _batched(_scaled_dot, wt.width_t)(*_act_tiles(dy3, wt.width_t), wt.q_t, wt.s_t)
    xq, xs = jax.vmap(_tiles_along_rows)(x3)  # [G, M, K], [G, Mb, K]
    dyq, dys = jax.vmap(_tiles_along_rows)(dy3)  # [G, M, N], [G, Mb, N]
    dw = _batched(_scaled_dot)(xq.transpose(0, 2, 1), xs.transpose(0, 2, 1), dyq, dys)
    return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_gemm(x3: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    """x3 [G, M, K] times the master weight w in `layout` -> [G, M, N] in x3's dtype (FP8 Fprop / Dgrad / Wgrad)."""
    return _forward(x3, _weight(w, layout)).astype(x3.dtype)


def _gemm_fwd(x3, w, layout):
    return _fp8_gemm(x3, w, layout), (x3, w)


def _gemm_bwd(layout, res, g):
    x3, w = res
    dx, dw = _fp8_grads(x3, _weight(w, layout), g)
    return dx.astype(x3.dtype), dw.reshape(w.shape).astype(w.dtype)


_fp8_gemm.defvjp(_gemm_fwd, _gemm_bwd)


def fp8_matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """The FP8 forward GEMM (module docstring), no gradient rule. Shapes: x [..., K], w [K, N] -> [..., N]."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = _forward(x.reshape(1, -1, k), _weight(w, "matrix"))[0]
    return y.astype(out_dtype or x.dtype).reshape(*lead, w.shape[1])


def fp8_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """FP8 Fprop, Dgrad and Wgrad (module docstring). Shapes: x [..., K], w [K, N] -> [..., N] in x's dtype
    (w: the float master weight [in, out], any float dtype; its blocks are those of the official [out, in])."""
    lead, k = x.shape[:-1], x.shape[-1]
    return _fp8_gemm(x.reshape(1, -1, k), w, "matrix")[0].reshape(*lead, w.shape[1])


def fp8_grouped_linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """`fp8_linear` per group: y[..., g, :] = x[..., g, :] @ w[g] (the grouped output projection `wo_a`).

    The weight blocks are those of the official [G*O, I] matrix (rows g*O + o; a block may span groups), as
    `layers.qweight` quantises it. Shapes: x [..., G, I], w [G, I, O] -> [..., G, O] in x's dtype.
    """
    lead, (g, i), o = x.shape[:-2], x.shape[-2:], w.shape[-1]
    y = _fp8_gemm(x.reshape(-1, g, i).transpose(1, 0, 2), w, "grouped")  # [G, M, O]
    return y.transpose(1, 0, 2).reshape(*lead, g, o)


def quantised_backward_reference(x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients `fp8_linear` computes, as float32 matmuls of dequantised operands (for tests).

    Shapes: x [M, K], w [K, N], dy [M, N] -> dx [M, K], dw [K, N] (float32).
    """
    dx, dw = grouped_backward_reference(x[:, None], w[None], dy[:, None])
    return dx[:, 0], dw[0]


def grouped_backward_reference(x: jax.Array, w: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradients `fp8_grouped_linear` computes, as float32 matmuls of dequantised operands (for tests).

    Shapes: x [M, G, I], w [G, I, O], dy [M, G, O] -> dx [M, G, I], dw [G, I, O] (float32).
    """
    g, i, o = w.shape
    flat = formats.dequantize_fp8_blocks(*formats.quantize_fp8_blocks(w.transpose(0, 2, 1).reshape(g * o, i)))
    w_fq = flat.reshape(g, o, i).transpose(0, 2, 1)  # the blocks of the official [G*O, I] matrix
    fq_rows = lambda a: formats.dequantize_act_fp8(*formats.quantize_act_fp8(a))  # noqa: E731  (1x128 tiles)
    dy_rows = fq_rows(dy)  # along O, per group
    x_cols = fq_rows(x.transpose(1, 2, 0)).transpose(2, 0, 1)  # 128x1 tiles: along M, per (group, column)
    dy_cols = fq_rows(dy.transpose(1, 2, 0)).transpose(2, 0, 1)
    hi = jax.lax.Precision.HIGHEST
    return (jnp.einsum("mgo,gio->mgi", dy_rows, w_fq, precision=hi),
            jnp.einsum("mgi,mgo->gio", x_cols, dy_cols, precision=hi))


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
