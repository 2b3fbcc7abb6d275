"""Grouped expert matmul, Pallas Triton (GPU) style, with a custom VJP. Target: H200.

Roofline on an H200 (tools/roofline.py; ~989 TFLOP/s bf16 dense, 4.8 TB/s, ridge ~206 FLOPs/byte).
V4-Flash expert w1: K = D = 4096, N = F = 2048, E = 256, M = tokens * 6. FLOPs = 2 M K N;
bytes ~ M K 2 + E K N b_w + M N 2 with b_w = 2 (bf16), 1 (FP8), 0.53 (MXFP4 incl. scales). At 8192 tokens
(M = 49152, ~192 rows per expert): 0.82 TFLOP, 4.9 / 2.8 / 1.7 GB, intensity 168 / 300 / 473 FLOPs/byte,
so >= 1.02 ms memory-bound for bf16 weights and >= 0.83 ms compute-bound for FP8/FP4 weights (the kernel
upcasts weights to bf16 in registers, so the bf16 peak applies). With fewer than ~200 rows per expert
(decode, small batches) all formats are bound by reading weights, and FP8 / FP4 weights are 2x / ~3.7x faster.

Design (Triton style: one program per output tile, loops inside). Grid (row tiles, output column tiles).
A program loops over the groups that overlap its row tile (range precomputed per tile), and for each group
over the contraction tiles: load the lhs tile with other groups' rows masked to zero, load the expert's weight
tile at a dynamic offset, dequantise it (FP8: times the tile's power-of-two scale; MXFP4: nibbles decoded
arithmetically, low nibbles = even k, times per-32-row scales) and accumulate `dot` in float32 registers.
Tiles that straddle a group boundary are therefore multiplied once per group (as in megablox). The input
gradient runs the same kernel against the transposed weight tiles; the weight gradient (float weights) uses
grid (experts, K tiles, N tiles), each program looping over its expert's row tiles, so empty experts get 0.

FP8 activations (`lhs` E4M3 with 1x128 tile scales, FP8 weights only): each contraction tile is one E4M3 x E4M3
`dot` with a float32 result, scaled by the row's activation tile scale and the weight tile's scale and added to
the float32 accumulator; rows of other groups are zeroed after the product. `block_k` / `block_n` divide 128,
so every tile has one scale per row and one weight scale.

Verified on CPU in interpret mode against the reference; it has not yet been compiled for a GPU (no device
was available when it was written). Tile sizes must be powers of two (Triton); the MXFP4 path uses a
reshape of the scale tile and the FP8 path a float8 -> float32 convert (sm89+).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.expert_matmul import common

_COMPILER_PARAMS = {"num_warps": 4, "num_stages": 2}


def _load_weight_tile(w_ref, s_ref, g, row_t, col_t, d: common.Dims, dtype):
    wr = common.weight_tile_rows(d.fmt, d.bk)
    w = w_ref[g, pl.ds(row_t * wr, wr), pl.ds(col_t * d.bn, d.bn)]
    if d.fmt == "fp8":
        s = s_ref[g, row_t * d.bk // 128, col_t * d.bn // 128]
    elif d.fmt == "mxfp4":
        s = s_ref[g, pl.ds(row_t * d.bk // 32, d.bk // 32), pl.ds(col_t * d.bn, d.bn)]
    else:
        s = None
    return common.dequant_tile(d.fmt, w, s, dtype)


def _fp8_contract(x_ref, xs_ref, w_ref, s_ref, g, c, j, mask, d: common.Dims, transpose: bool):
    """FP8 activations x FP8 weights, one contraction tile: E4M3 x E4M3 dot (Hopper's FP8 MMA), float32 result
    times the activation tile scale per row and the weight tile scale, rows of other groups zero."""
    bc = d.bn if transpose else d.bk
    row_t, col_t = (j, c) if transpose else (c, j)
    w = w_ref[g, pl.ds(row_t * d.bk, d.bk), pl.ds(col_t * d.bn, d.bn)]
    s = s_ref[g, row_t * d.bk // 128, col_t * d.bn // 128]
    x = x_ref[:, pl.ds(c * bc, bc)]
    xs = xs_ref[:, pl.ds(c * bc // 128, 1)]  # [bm, 1]
    part = common.fp8_tile_dot(x, w, transpose, upcast=False) * (xs * s)
    return jnp.where(mask, part, 0.0)


def _gmm_kernel(first_ref, last_ref, starts_ref, ends_ref, x_ref, w_ref, *rest, d: common.Dims, transpose: bool):
    rest = list(rest)
    s_ref = rest.pop(0) if d.fmt != "float" else None
    xs_ref = rest.pop(0) if d.act == "fp8" else None
    (o_ref,) = rest
    t, j = pl.program_id(0), pl.program_id(1)
    rows = t * d.bm + jax.lax.broadcasted_iota(jnp.int32, (d.bm, 1), 0)
    if transpose:
        n_contract, bc = d.np_ // d.bn, d.bn
        out_widths = [d.bk // 2, d.bk // 2] if d.fmt == "mxfp4" else [d.bk]
    else:
        n_contract, bc = d.kp // d.bk, d.bk
        out_widths = [d.bn]
    split_x = d.fmt == "mxfp4" and not transpose

    def group_body(g, acc):
        lo, hi = starts_ref[g], ends_ref[g]
        mask = (rows >= lo) & (rows < hi)

        def contract_body(c, acc):
            if d.act == "fp8":
                return (acc[0] + _fp8_contract(x_ref, xs_ref, w_ref, s_ref, g, c, j, mask, d, transpose),)
            row_t, col_t = (j, c) if transpose else (c, j)
            w_parts = _load_weight_tile(w_ref, s_ref, g, row_t, col_t, d, x_ref.dtype)
            if split_x:  # even-k and odd-k halves of the tile (see common.prepare)
                h = bc // 2
                x_parts = [x_ref[:, pl.ds(c * bc, h)], x_ref[:, pl.ds(c * bc + h, h)]]
            else:
                x_parts = [x_ref[:, pl.ds(c * bc, bc)]]
            x_parts = [jnp.where(mask, x, jnp.zeros_like(x)) for x in x_parts]
            parts = common.tile_dot(x_parts, w_parts, transpose)
            return tuple(a + p for a, p in zip(acc, parts, strict=True))

        return jax.lax.cond(lo < hi, lambda a: jax.lax.fori_loop(0, n_contract, contract_body, a), lambda a: a, acc)

    acc0 = tuple(jnp.zeros((d.bm, wdt), jnp.float32) for wdt in out_widths)
    acc = jax.lax.fori_loop(first_ref[t], last_ref[t] + 1, group_body, acc0)
    off = 0
    for a, wdt in zip(acc, out_widths, strict=True):
        o_ref[:, pl.ds(off, wdt)] = a.astype(o_ref.dtype)
        off += wdt


def _gmm(x, w, s, group_sizes, d: common.Dims, transpose: bool, out_dtype, interpret, xs=None):
    """x [Mp, Kp] @ w[g] -> [Mp, Np]; transpose: x [Mp, Np] @ w[g].T -> [Mp, Kp] (MXFP4: tile-reordered K).
    FP8 activations (d.act): x e4m3 with tile scales xs [Mp, ceil(cols/128)] float32."""
    m_tiles = d.mp // d.bm
    first, last = common.tile_group_range(group_sizes, m_tiles, d.bm)
    starts, ends = common.group_bounds(group_sizes)
    out_cols, bo = (d.kp, d.bk) if transpose else (d.np_, d.bn)
    full = lambda a: pl.BlockSpec(a.shape, lambda t, j: (0,) * a.ndim)
    in_specs = [full(first), full(last), full(starts), full(ends),
                pl.BlockSpec((d.bm, x.shape[1]), lambda t, j: (t, 0)), full(w)]
    operands = [first, last, starts, ends, x, w]
    if s is not None:
        in_specs.append(full(s))
        operands.append(s)
    if xs is not None:
        in_specs.append(pl.BlockSpec((d.bm, xs.shape[1]), lambda t, j: (t, 0)))
        operands.append(xs)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, d=d, transpose=transpose),
        out_shape=jax.ShapeDtypeStruct((d.mp, out_cols), out_dtype),
        grid=(m_tiles, out_cols // bo),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((d.bm, bo), lambda t, j: (t, j)),
        compiler_params=pltriton.CompilerParams(**_COMPILER_PARAMS),
        cost_estimate=common.gmm_cost(d, x, w, s, jnp.dtype(out_dtype).itemsize, transpose),
        interpret=interpret,
        name=f"expert_matmul_{d.fmt}{'_fp8act' if d.act == 'fp8' else ''}{'_dx' if transpose else ''}",
    )(*operands)


def _tgmm_kernel(starts_ref, ends_ref, x_ref, dy_ref, o_ref, *, d: common.Dims):
    g, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    lo, hi = starts_ref[g], ends_ref[g]
    ct = jnp.promote_types(x_ref.dtype, dy_ref.dtype)

    def body(tile, acc):
        rows = tile * d.bm + jax.lax.broadcasted_iota(jnp.int32, (d.bm, 1), 0)
        x = x_ref[pl.ds(tile * d.bm, d.bm), pl.ds(kt * d.bk, d.bk)]
        x = jnp.where((rows >= lo) & (rows < hi), x, jnp.zeros_like(x)).astype(ct)
        dy = dy_ref[pl.ds(tile * d.bm, d.bm), pl.ds(nt * d.bn, d.bn)].astype(ct)
        return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jnp.zeros((d.bk, d.bn), jnp.float32)
    acc = jax.lax.cond(lo < hi, lambda a: jax.lax.fori_loop(lo // d.bm, (hi - 1) // d.bm + 1, body, a),
                       lambda a: a, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _tgmm(x, dy, group_sizes, d: common.Dims, out_dtype, interpret):
    """Per-expert x_g.T @ dy_g: x [Mp, Kp], dy [Mp, Np] -> [E, Kp, Np] (zero for experts without rows)."""
    starts, ends = common.group_bounds(group_sizes)
    full = lambda a: pl.BlockSpec(a.shape, lambda g, k, n: (0,) * a.ndim)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, d=d),
        out_shape=jax.ShapeDtypeStruct((d.e, d.kp, d.np_), out_dtype),
        grid=(d.e, d.kp // d.bk, d.np_ // d.bn),
        in_specs=[full(starts), full(ends), full(x), full(dy)],
        out_specs=pl.BlockSpec((None, d.bk, d.bn), lambda g, k, n: (g, k, n)),
        compiler_params=pltriton.CompilerParams(**_COMPILER_PARAMS),
        cost_estimate=common.tgmm_cost(d, x, dy, jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
        name="expert_matmul_dw",
    )(starts, ends, x, dy)


_core = common.make_vjp(_gmm, _tgmm)


def expert_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    rhs_scale: jax.Array | None = None,
    *,
    out_dtype=None,
    block_sizes: common.BlockSizes | None = None,
    interpret=False,
    lhs_scale: jax.Array | None = None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """Triton-style grouped expert matmul; same arguments and result as `reference.expert_matmul`.

    Args:
      lhs, rhs, group_sizes, rhs_scale, out_dtype, lhs_scale, transpose_rhs: as in `reference.expert_matmul`.
      block_sizes: tile sizes (default `common.BlockSizes()`), powers of two.
      interpret: False on a GPU; True to run in the Pallas interpreter (CPU).

    Shapes:
      lhs [M, K], rhs [E, K, N] / [E, K/2, N] (MXFP4), group_sizes [E] -> [M, N].
    """
    return common.run(_core, lhs, rhs, group_sizes, rhs_scale, block_sizes, out_dtype, interpret, _gmm, lhs_scale,
                      transpose_rhs)
