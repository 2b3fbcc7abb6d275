"""Grouped expert matmul, Pallas Mosaic-TPU style (block specs + scalar prefetch), with a custom VJP.

Roofline (tools/roofline.py; V4-Flash expert w1: K = D = 4096, N = F = 2048, E = 256, M = tokens * 6, the
numbers are for an H200 since that is the accelerator we have; a TPU has a similar ~200-250 FLOPs/byte ridge):
FLOPs = 2 M K N; bytes ~ M K 2 + E K N b_w + M N 2 with b_w = 2 (bf16), 1 (FP8), 0.53 (MXFP4 + scales).
At 8192 tokens (M = 49152, ~192 rows per expert) that is 0.82 TFLOP and 4.9 / 2.8 / 1.7 GB: intensity
168 / 300 / 473 FLOPs/byte against a ridge of ~206 (bf16 compute, weights dequantised in VMEM), so bf16
weights are memory-bound there and FP8/FP4 weights compute-bound; below ~200 rows per expert every format
is bound by reading the weights, which is where the 2x / 4x smaller FP8 / FP4 weights pay.

Design. Tokens are sorted by expert, so each group is a contiguous row range. The grid walks a static list
of (row tile, expert) "work items" (`common.work_items`, as in megablox): a tile that straddles a group
boundary is visited once per group with the other rows masked to zero, and its float32 accumulator (VMEM
scratch) carries across those visits, so the output tile is written complete. The item list is scalar
prefetched and drives the index maps, which pick the expert's weight tile; the weight tile is dequantised in
VMEM (FP8: one power-of-two scale per tile, read from SMEM; MXFP4: nibbles unpacked arithmetically, scales per
32 rows along K) and fed to the MXU in lhs.dtype. Grid (forward and input gradient):
(output column tiles "parallel", work items "arbitrary", contraction tiles "arbitrary").
Weight gradient (float weights only): grid (K tiles, N tiles, work items), accumulator reset at the first
item of each expert, so experts without tokens get a zero gradient.

FP8 activations (E4M3 `lhs` with 1x128 tile scales, FP8 weights only) travel as bytes like FP8 weights; each
tile pair is converted to bfloat16 (exact) for the MXU, the float32 product is scaled by the rows' activation
scales (a [1, bm] block of the transposed scales [S, 1, Mp], at the contraction tile's 128-slice) and the
weight tile's scale, and added to the accumulator.

Checked on CPU in interpret mode only (no TPU was available); the layout rules of real Mosaic (8x128 tiles)
hold for the default BlockSizes with FP8 and float weights; MXFP4 on a real TPU wants block_k >= 256.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.expert_matmul import common


def _row_mask(tile, bm: int, lo, hi):
    rows = tile * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    return (rows >= lo) & (rows < hi)


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, tfirst_ref, gfirst_ref, x_ref, w_ref, *rest,
                d: common.Dims, transpose: bool, n_contract: int):
    del group_ref, gfirst_ref
    rest = list(rest)
    s_ref = rest.pop(0) if d.fmt != "float" else None
    xs_ref = rest.pop(0) if d.act == "fp8" else None
    o_ref, acc_ref = rest
    j, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when((c == 0) & (tfirst_ref[i] == 1))
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    lo, hi = lo_ref[i], hi_ref[i]

    def _accumulate_fp8():  # E4M3 tiles (bf16 on the MXU, exact), scales applied to the float32 product
        row_t, col_t = (j, c) if transpose else (c, j)
        s = s_ref[row_t * d.bk // 128, col_t * d.bn // 128]
        x = jax.lax.bitcast_convert_type(x_ref[...], jnp.float8_e4m3fn)
        w = jax.lax.bitcast_convert_type(w_ref[...], jnp.float8_e4m3fn)
        part = common.fp8_tile_dot(x, w, transpose, upcast=True) * (xs_ref[...].reshape(d.bm, 1) * s)
        acc_ref[...] += jnp.where(_row_mask(tile_ref[i], d.bm, lo, hi), part, 0.0)

    def _accumulate():
        mask = _row_mask(tile_ref[i], d.bm, lo, hi)
        row_t, col_t = (j, c) if transpose else (c, j)  # stored weight tile coordinates
        if d.fmt == "fp8":
            s = s_ref[row_t * d.bk // 128, col_t * d.bn // 128]
        else:
            s = None if s_ref is None else s_ref[...]
        wt = w_ref[...]
        if d.fmt == "fp8":  # FP8 weights travel as their bytes (see _gmm)
            wt = jax.lax.bitcast_convert_type(wt, jnp.float8_e4m3fn)
        w_parts = common.dequant_tile(d.fmt, wt, s, x_ref.dtype)
        if d.fmt == "mxfp4" and not transpose:
            h = d.bk // 2
            x_parts = [x_ref[:, :h], x_ref[:, h:]]  # even-k / odd-k columns (see common.prepare)
        else:
            x_parts = [x_ref[...]]
        x_parts = [jnp.where(mask, x, jnp.zeros_like(x)) for x in x_parts]
        parts = common.tile_dot(x_parts, w_parts, transpose)
        if len(parts) == 1:
            acc_ref[...] += parts[0]
        else:
            h = d.bk // 2
            acc_ref[:, :h] += parts[0]
            acc_ref[:, h:] += parts[1]

    pl.when(lo < hi)(_accumulate_fp8 if d.act == "fp8" else _accumulate)

    @pl.when(c == n_contract - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _gmm(x, w, s, group_sizes, d: common.Dims, transpose: bool, out_dtype, interpret, xs=None):
    """x [Mp, Kp] @ w[g] -> [Mp, Np]; transpose: x [Mp, Np] @ w[g].T -> [Mp, Kp] (MXFP4: tile-reordered K).
    FP8 activations (d.act): x e4m3 with tile scales xs [Mp, ceil(cols/128)] float32."""
    m_tiles = d.mp // d.bm
    items = common.work_items(group_sizes, m_tiles, d.bm)
    n_items = items.tile.shape[0]
    k_tiles, n_tiles = d.kp // d.bk, d.np_ // d.bn
    wr = common.weight_tile_rows(d.fmt, d.bk)
    if transpose:
        grid = (k_tiles, n_items, n_tiles)
        x_spec = pl.BlockSpec((d.bm, d.bn), lambda j, i, c, t, *_: (t[i], c))
        w_index = lambda j, i, c, t, g, *_: (g[i], j, c)
        out_cols, bo = d.kp, d.bk
    else:
        grid = (n_tiles, n_items, k_tiles)
        x_spec = pl.BlockSpec((d.bm, d.bk), lambda j, i, c, t, *_: (t[i], c))
        w_index = lambda j, i, c, t, g, *_: (g[i], c, j)
        out_cols, bo = d.np_, d.bn
    in_specs = [x_spec, pl.BlockSpec((None, wr, d.bn), w_index)]
    # FP8 weights enter as uint8 bits (a free same-width bitcast): the interpreter's block copies of float8
    # arrays are ~8x slower on CPU than of uint8 ones.
    fp8_x = d.act == "fp8"
    operands = [jax.lax.bitcast_convert_type(x, jnp.uint8) if fp8_x else x,
                jax.lax.bitcast_convert_type(w, jnp.uint8) if d.fmt == "fp8" else w]
    if d.fmt == "fp8":
        in_specs.append(pl.BlockSpec((None, *s.shape[1:]), lambda j, i, c, t, g, *_: (g[i], 0, 0),
                                     memory_space=pltpu.SMEM))
        operands.append(s)
    elif d.fmt == "mxfp4":
        in_specs.append(pl.BlockSpec((None, d.bk // 32, d.bn), lambda *a: w_index(*a)))
        operands.append(s)
    if fp8_x:  # the scales of the row tile's 128-slice holding contraction tile c, as one lane-major row
        bc = d.bn if transpose else d.bk
        in_specs.append(pl.BlockSpec((None, 1, d.bm), lambda j, i, c, t, *_: (c * bc // 128, 0, t[i])))
        operands.append(xs.T[:, None, :])  # [ceil(cols/128), 1, Mp]: a [1, bm] block is a legal Mosaic tile
    kernel = functools.partial(_gmm_kernel, d=d, transpose=transpose, n_contract=grid[2])
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((d.mp, out_cols), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((d.bm, bo), lambda j, i, c, t, *_: (t[i], j)),
            scratch_shapes=[pltpu.VMEM((d.bm, bo), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=common.gmm_cost(d, x, w, s, jnp.dtype(out_dtype).itemsize, transpose),
        interpret=interpret,
        name=f"expert_matmul_{d.fmt}{'_fp8act' if fp8_x else ''}{'_dx' if transpose else ''}",
    )(*items, *operands)


def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, tfirst_ref, gfirst_ref, x_ref, dy_ref, o_ref, acc_ref,
                 *, bm: int):
    del group_ref, tfirst_ref
    i = pl.program_id(2)

    @pl.when(gfirst_ref[i] == 1)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    lo, hi = lo_ref[i], hi_ref[i]

    @pl.when(lo < hi)
    def _accumulate():
        ct = jnp.promote_types(x_ref.dtype, dy_ref.dtype)
        x = jnp.where(_row_mask(tile_ref[i], bm, lo, hi), x_ref[...], 0).astype(ct)
        acc_ref[...] += jax.lax.dot_general(x, dy_ref[...].astype(ct), (((0,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)

    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tgmm(x, dy, group_sizes, d: common.Dims, out_dtype, interpret):
    """Per-expert x_g.T @ dy_g: x [Mp, Kp], dy [Mp, Np] -> [E, Kp, Np] (zero for experts without rows)."""
    items = common.work_items(group_sizes, d.mp // d.bm, d.bm)
    grid = (d.kp // d.bk, d.np_ // d.bn, items.tile.shape[0])
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=d.bm),
        out_shape=jax.ShapeDtypeStruct((d.e, d.kp, d.np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=grid,
            in_specs=[pl.BlockSpec((d.bm, d.bk), lambda a, b, i, t, *_: (t[i], a)),
                      pl.BlockSpec((d.bm, d.bn), lambda a, b, i, t, *_: (t[i], b))],
            out_specs=pl.BlockSpec((None, d.bk, d.bn), lambda a, b, i, t, g, *_: (g[i], a, b)),
            scratch_shapes=[pltpu.VMEM((d.bk, d.bn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=common.tgmm_cost(d, x, dy, jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
        name="expert_matmul_dw",
    )(*items, x, dy)


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
    """Mosaic-TPU grouped expert matmul; same arguments and result as `reference.expert_matmul`.

    Args:
      lhs, rhs, group_sizes, rhs_scale, out_dtype, lhs_scale, transpose_rhs: as in `reference.expert_matmul`.
      block_sizes: tile sizes (default `common.BlockSizes()`).
      interpret: False on a TPU; True or `pltpu.InterpretParams()` to run in the Pallas interpreter (CPU).

    Shapes:
      lhs [M, K], rhs [E, K, N] / [E, K/2, N] (MXFP4), group_sizes [E] -> [M, N].
    """
    return common.run(_core, lhs, rhs, group_sizes, rhs_scale, block_sizes, out_dtype, interpret, _gmm, lhs_scale,
                      transpose_rhs)
