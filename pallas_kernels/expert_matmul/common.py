"""Pieces shared by the expert-matmul implementations: weight formats, padding, group metadata, tile math.

Weight layout (all implementations): experts stored [E, K, N] = [E, in, out], the layout of our model's
`ffn.experts.w1` [E, D, F] and `w2` [E, F, D]. The official checkpoints store each expert [out, in]; convert
with `swapaxes(-1, -2)` on values, scales and packed bytes alike (128x128 blocks are square and MXFP4 packs
along the input axis in both layouts, so the transposed bytes are the right bytes).

* "float": `rhs` bfloat16 / float16 / float32 [E, K, N], no scale.
* "fp8":   `rhs` float8_e4m3fn [E, K, N], `rhs_scale` [E, ceil(K/128), ceil(N/128)] (UE8M0 or float32).
* "mxfp4": `rhs` int8/uint8 [E, K/2, N], two E2M1 codes per byte along K (low nibble = even k),
           `rhs_scale` [E, K/32, N] (UE8M0 or float32). K must be a multiple of 32.

Activations (`lhs`): "float" (bfloat16 / float16 / float32), or "fp8" with FP8 weights: float8_e4m3fn [M, C]
with `lhs_scale` [M, ceil(C/128)] (UE8M0 or float32), one scale per 1x128 tile along the contraction axis
(V4's activation format). FP8 x FP8 tiles are multiplied with float32 results and scaled per 128-slice in float32
(the per-128 promotion of DeepSeek's FP8 GEMM); `transpose_rhs` (FP8 activations only) multiplies by W[g]^T,
the FP8 Dgrad.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import formats
from pallas_kernels.autodiff import differentiable

Format = Literal["float", "fp8", "mxfp4"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Pallas kernels (the reference ignores them).

    `block_m` tiles the token rows; `block_k` and `block_n` tile the stored weight [K, N] in the forward and
    in both backward kernels. Each is capped at the next power of two of its dimension. FP8 needs
    `block_k` and `block_n` to divide 128 (one scale per tile); MXFP4 needs `block_k` to be a multiple of 32.
    Real TPUs also want `block_k >= 256` for MXFP4 (an 8-row scale tile); interpret mode does not care.
    """

    block_m: int = 128
    block_k: int = 128
    block_n: int = 128

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"{name} must be a positive power of two, got {v}")


class Dims(NamedTuple):
    """Static problem sizes after padding. Kp, Np are multiples of bk, bn; Mp of bm. `act`: "float" or "fp8"."""

    fmt: str
    m: int
    k: int
    n: int
    e: int
    bm: int
    bk: int
    bn: int
    mp: int
    kp: int
    np_: int
    act: str = "float"


def weight_format(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, rhs_scale: jax.Array | None,
                  transpose_rhs: bool = False) -> Format:
    """Infer the weight format from dtypes and check every shape; one-line ValueError on mismatch."""
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"expert_matmul wants lhs [M, K] and rhs [E, ...], got {lhs.shape} and {rhs.shape}")
    if lhs.dtype != ml_dtypes.float8_e4m3fn and (not jnp.issubdtype(lhs.dtype, jnp.floating)
                                                 or jnp.dtype(lhs.dtype).itemsize < 2):
        raise ValueError(f"lhs must be bfloat16, float16, float32 or float8_e4m3fn (with lhs_scale), got {lhs.dtype}")
    e = rhs.shape[0]
    if group_sizes.shape != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array of shape ({e},), got {group_sizes.dtype}"
                         f"{tuple(group_sizes.shape)}")
    if rhs.dtype == ml_dtypes.float8_e4m3fn:
        fmt, k, n = "fp8", rhs.shape[1], rhs.shape[2]
        want_scale = (e, -(-k // formats.FP8_BLOCK), -(-n // formats.FP8_BLOCK))
    elif rhs.dtype in (jnp.int8, jnp.uint8):
        fmt, k, n = "mxfp4", 2 * rhs.shape[1], rhs.shape[2]
        want_scale = (e, k // formats.FP4_BLOCK, n)
        if k % formats.FP4_BLOCK:
            raise ValueError(f"MXFP4 weights need K (= 2 * rhs.shape[1] = {k}) to be a multiple of 32")
    elif jnp.issubdtype(rhs.dtype, jnp.floating) and jnp.dtype(rhs.dtype).itemsize >= 2:
        fmt, k, n, want_scale = "float", rhs.shape[1], rhs.shape[2], None
    else:
        raise ValueError(f"rhs dtype {rhs.dtype} is none of: float, float8_e4m3fn (FP8), int8/uint8 (MXFP4)")
    if transpose_rhs and lhs.shape[1] != n:
        raise ValueError(f"lhs has {lhs.shape[1]} columns but transpose_rhs contracts the weights' N = {n}")
    if not transpose_rhs and lhs.shape[1] != k:
        raise ValueError(f"lhs has K = {lhs.shape[1]} but the {fmt} weights have K = {k}")
    if want_scale is None:
        if rhs_scale is not None:
            raise ValueError(f"rhs_scale given for {rhs.dtype} weights; scales belong to FP8/MXFP4 weights only")
    else:
        if rhs_scale is None:
            raise ValueError(f"{fmt} weights need rhs_scale of shape {want_scale}")
        if tuple(rhs_scale.shape) != want_scale:
            raise ValueError(f"{fmt} rhs_scale shape {tuple(rhs_scale.shape)} does not match rhs: want {want_scale}")
        if rhs_scale.dtype not in (ml_dtypes.float8_e8m0fnu, jnp.float32):
            raise ValueError(f"rhs_scale must be float8_e8m0fnu or float32, got {rhs_scale.dtype}")
    return fmt


def activation_format(lhs: jax.Array, lhs_scale: jax.Array | None, fmt: str, transpose_rhs: bool) -> str:
    """"fp8" for float8_e4m3fn activations with their 1x128 tile scales, else "float"; one-line ValueError on a
    mismatch (FP8 activations need FP8 weights; `transpose_rhs` needs FP8 activations)."""
    if lhs.dtype != ml_dtypes.float8_e4m3fn:
        if lhs_scale is not None:
            raise ValueError(f"lhs_scale given for {lhs.dtype} lhs; scales belong to float8_e4m3fn activations only")
        if transpose_rhs:
            raise ValueError("transpose_rhs (the FP8 Dgrad) needs FP8 activations (float8_e4m3fn lhs)")
        return "float"
    if fmt != "fp8":
        raise ValueError(f"FP8 activations (float8_e4m3fn lhs) need FP8 weights, got {fmt} weights")
    want = (lhs.shape[0], -(-lhs.shape[1] // formats.ACT_BLOCK))
    if lhs_scale is None or tuple(lhs_scale.shape) != want:
        got = None if lhs_scale is None else tuple(lhs_scale.shape)
        raise ValueError(f"FP8 activations need lhs_scale of shape {want} (one per 1x128 tile), got {got}")
    if lhs_scale.dtype not in (ml_dtypes.float8_e8m0fnu, jnp.float32):
        raise ValueError(f"lhs_scale must be float8_e8m0fnu or float32, got {lhs_scale.dtype}")
    return "fp8"


def check_group_sizes(group_sizes: jax.Array, m: int) -> None:
    """Concrete group sizes must be >= 0 and sum to at most M (traced ones cannot be checked)."""
    if isinstance(group_sizes, jax.core.Tracer):
        return
    gs = np.asarray(group_sizes)
    if (gs < 0).any() or gs.sum() > m:
        raise ValueError(f"group_sizes must be >= 0 and sum to at most M = {m}, got sum {gs.sum()}")


def scale_f32(rhs_scale: jax.Array | None) -> jax.Array | None:
    if rhs_scale is None:
        return None
    s = rhs_scale if rhs_scale.dtype == jnp.float32 else formats.e8m0_to_float32(rhs_scale)
    return jax.lax.stop_gradient(s)


def dequantize(rhs: jax.Array, rhs_scale: jax.Array | None, fmt: str, dtype) -> jax.Array:
    """[E, K, N] weights in `dtype`; quantised weights are constants (stop_gradient). Used by the reference."""
    if fmt == "float":
        return rhs.astype(dtype)
    s = scale_f32(rhs_scale)
    if fmt == "fp8":
        full = jnp.repeat(jnp.repeat(s, formats.FP8_BLOCK, axis=1), formats.FP8_BLOCK, axis=2)
        w = rhs.astype(jnp.float32) * full[:, : rhs.shape[1], : rhs.shape[2]]
    else:
        codes = formats.unpack_fp4(rhs, axis=1)  # [E, K/2, N] -> [E, K, N]
        w = jnp.asarray(formats.E2M1_VALUES)[codes.astype(jnp.int32)] * jnp.repeat(s, formats.FP4_BLOCK, axis=1)
    return jax.lax.stop_gradient(w).astype(dtype)


def _fit(block: int, dim: int) -> int:
    return min(block, 1 << max(dim - 1, 0).bit_length())


def plan(lhs: jax.Array, rhs: jax.Array, fmt: str, block_sizes: BlockSizes, act: str = "float") -> Dims:
    m = lhs.shape[0]
    e, n = rhs.shape[0], rhs.shape[2]
    k = rhs.shape[1] * (2 if fmt == "mxfp4" else 1)
    bm = max(8, _fit(block_sizes.block_m, m))
    bk, bn = _fit(block_sizes.block_k, k), _fit(block_sizes.block_n, n)
    if fmt == "fp8" and (formats.FP8_BLOCK % bk or formats.FP8_BLOCK % bn):
        raise ValueError(f"FP8 weights need block_k and block_n dividing 128, got {bk} and {bn}")
    if fmt == "mxfp4" and bk % formats.FP4_BLOCK:
        raise ValueError(f"MXFP4 weights need block_k to be a multiple of 32, got {bk}")
    rup = lambda x, b: -(-x // b) * b
    return Dims(fmt, m, k, n, e, bm, bk, bn, rup(max(m, 1), bm), rup(k, bk), rup(n, bn), act)


def _pad(x: jax.Array, widths: tuple[int, ...], value=0) -> jax.Array:
    if not any(widths):
        return x
    return jnp.pad(x, [(0, w) for w in widths], constant_values=value)


def prepare(lhs, rhs, rhs_scale, d: Dims):
    """Pad to whole tiles and bring operands into kernel form.

    Returns (lhs [Mp, Kp], rhs [E, Kp(/2), Np], scale float32 or None). For MXFP4 the columns of each bk-wide
    tile of lhs are reordered to (even k, odd k), matching the low / high nibbles of a packed weight row.
    Differentiable in lhs (and float rhs); the autodiff of this padding/reordering undoes it for gradients.
    """
    x = _pad(lhs, (d.mp - d.m, d.kp - d.k))
    if d.fmt == "mxfp4":
        x = x.reshape(d.mp, d.kp // d.bk, d.bk // 2, 2).swapaxes(-1, -2).reshape(d.mp, d.kp)
    return (x, *prepare_weights(rhs, rhs_scale, d))


def prepare_weights(rhs, rhs_scale, d: Dims):
    """The weights and their scales of `prepare`: rhs [E, Kp(/2), Np], scale float32 or None."""
    s = scale_f32(rhs_scale)
    if d.fmt == "float":
        w = _pad(rhs, (0, d.kp - d.k, d.np_ - d.n))
    elif d.fmt == "fp8":
        w = _pad(rhs, (0, d.kp - d.k, d.np_ - d.n))
        s = _pad(s, (0, -(-d.kp // 128) - s.shape[1], -(-d.np_ // 128) - s.shape[2]), value=1.0)
    else:
        w = _pad(rhs, (0, (d.kp - d.k) // 2, d.np_ - d.n))
        s = _pad(s, (0, (d.kp - d.k) // formats.FP4_BLOCK, d.np_ - d.n), value=1.0)
    return w, s


def prepare_fp8_activations(lhs, lhs_scale, d: Dims, transpose_rhs: bool) -> tuple[jax.Array, jax.Array]:
    """FP8 activations padded to whole tiles: lhs [Mp, Kp] ([Mp, Np] with `transpose_rhs`) e4m3, and its tile
    scales [Mp, ceil(cols/128)] float32 (padding: value 0, scale 1)."""
    cols = d.np_ if transpose_rhs else d.kp
    x = _pad(lhs, (d.mp - d.m, cols - lhs.shape[1]))
    s = scale_f32(lhs_scale)
    return x, _pad(s, (d.mp - d.m, -(-cols // formats.ACT_BLOCK) - s.shape[1]), value=1.0)


def dequantize_activations(lhs: jax.Array, lhs_scale: jax.Array) -> jax.Array:
    """FP8 activations [M, C] and their 1x128 tile scales -> float32 values [M, C] (constants). The reference's."""
    s = jnp.repeat(scale_f32(lhs_scale), formats.ACT_BLOCK, axis=1)[:, : lhs.shape[1]]
    return jax.lax.stop_gradient(lhs.astype(jnp.float32) * s)


# ---- group metadata --------------------------------------------------------------------------------------


def group_bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row range [start, end) of every group. [E] -> [E], [E] int32."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return ends - group_sizes.astype(jnp.int32), ends


def tile_group_range(group_sizes: jax.Array, m_tiles: int, bm: int) -> tuple[jax.Array, jax.Array]:
    """First and last group overlapping each row tile (first > last when none). [E] -> [m_tiles] x 2, int32."""
    starts, ends = group_bounds(group_sizes)
    lo_row = jnp.arange(m_tiles, dtype=jnp.int32) * bm
    first = jnp.searchsorted(ends, lo_row, side="right").astype(jnp.int32)  # first group ending after lo_row
    last = (jnp.searchsorted(starts, lo_row + bm, side="left") - 1).astype(jnp.int32)  # last starting before hi
    return first, last


class WorkItems(NamedTuple):
    """A static-length list of (row tile, group) visits for the TPU-style grid; see `work_items`."""

    tile: jax.Array  # [I] row tile to load / write
    group: jax.Array  # [I] expert whose weights are used
    row_lo: jax.Array  # [I] rows [row_lo, row_hi) of the tile that belong to the group (empty for padding)
    row_hi: jax.Array
    tile_first: jax.Array  # [I] 1 where the item is the first visit of its tile
    group_first: jax.Array  # [I] 1 where the item is the first visit of its group


def work_items(group_sizes: jax.Array, m_tiles: int, bm: int) -> WorkItems:
    """Visits of (row tile, group) pairs in order: by group, then the tiles no group reaches, then padding.

    Every group gets at least one item (so empty groups still write zero gradients) and every tile at least one
    (so rows beyond sum(group_sizes) come out zero). Tiles and groups are both non-decreasing, so a tile's items
    and a group's items are consecutive. The count is at most m_tiles + E, the static length used.
    """
    e = group_sizes.shape[0]
    n_items = m_tiles + e
    gs = group_sizes.astype(jnp.int32)
    starts, ends = group_bounds(gs)
    total = ends[-1]
    first_tile = jnp.minimum(starts // bm, m_tiles - 1)
    per_group = jnp.where(gs > 0, (ends - 1) // bm - first_tile + 1, 1)
    item_end = jnp.cumsum(per_group)
    n_group_items = item_end[-1]
    covered = (total + bm - 1) // bm
    i = jnp.arange(n_items, dtype=jnp.int32)
    g = jnp.minimum(jnp.searchsorted(item_end, i, side="right"), e - 1).astype(jnp.int32)
    in_group = i < n_group_items
    uncovered = ~in_group & (i < n_group_items + m_tiles - covered)
    tile = jnp.where(in_group, first_tile[g] + i - (item_end[g] - per_group[g]),
                     jnp.where(uncovered, covered + i - n_group_items, m_tiles - 1))
    group = jnp.where(in_group, g, e - 1)
    real = in_group & (gs[g] > 0)
    row_lo, row_hi = jnp.where(real, starts[g], 0), jnp.where(real, ends[g], 0)
    changed = lambda a: jnp.concatenate([jnp.ones((1,), jnp.int32), (a[1:] != a[:-1]).astype(jnp.int32)])
    return WorkItems(tile.astype(jnp.int32), group, row_lo, row_hi, changed(tile), changed(group))


# ---- tile math used inside the kernels ---------------------------------------------------------------------


def fp4_code_values(codes: jax.Array) -> jax.Array:
    """E2M1 codes (int32 in [0, 16)) -> float32 values, by arithmetic (no table lookup inside kernels)."""
    mag = codes & 7
    exp = mag >> 1
    man = (mag & 1).astype(jnp.float32)
    pow2 = jnp.left_shift(1, jnp.maximum(exp - 1, 0)).astype(jnp.float32)
    val = jnp.where(exp == 0, 0.5 * man, pow2 * (1.0 + 0.5 * man))
    return jnp.where((codes & 8) != 0, -val, val)


def dequant_tile(fmt: str, w: jax.Array, s, dtype) -> list[jax.Array]:
    """One stored weight tile -> its values in `dtype`.

    float/fp8: w [bk, bn] (s a float32 scalar for fp8) -> [w]. mxfp4: w [bk/2, bn] bytes, s [bk/32, bn] ->
    [even-k rows, odd-k rows], each [bk/2, bn].
    """
    if fmt == "float":
        return [w.astype(dtype)]
    if fmt == "fp8":
        return [(w.astype(jnp.float32) * s).astype(dtype)]
    half, bn = w.shape
    nb = s.shape[0]
    rows_per_scale = half // nb  # 16 packed rows = 32 values share a scale
    s_rows = jnp.broadcast_to(s[:, None, :], (nb, rows_per_scale, bn)).reshape(half, bn)
    p = w.astype(jnp.int32) & 0xFF
    return [(fp4_code_values(p & 0xF) * s_rows).astype(dtype), (fp4_code_values(p >> 4) * s_rows).astype(dtype)]


def tile_dot(x_parts: list[jax.Array], w_parts: list[jax.Array], transpose: bool) -> list[jax.Array]:
    """float32 products of one tile.

    Forward (transpose=False): sum_i x_parts[i] [bm, c_i] @ w_parts[i] [c_i, bo] -> [[bm, bo]].
    Input gradient (transpose=True): x_parts = [x [bm, bn]], output part p = x @ w_parts[p].T -> [bm, rows_p].
    """
    if not transpose:
        acc = None
        for x, w in zip(x_parts, w_parts, strict=True):
            y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            acc = y if acc is None else acc + y
        return [acc]
    (x,) = x_parts
    return [jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            for w in w_parts]


def fp8_tile_dot(x: jax.Array, w: jax.Array, transpose: bool, upcast: bool) -> jax.Array:
    """float32 product of an E4M3 activation tile and an E4M3 weight tile, before their scales.

    x [bm, c] @ w [c, bo] (transpose=False) or x [bm, c] @ w[bo, c].T (transpose=True) -> [bm, bo]. `upcast`
    converts both to bfloat16 first (exact: every E4M3 value is a bfloat16), for MXUs without an FP8 mode.
    """
    if upcast:
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def weight_tile_rows(fmt: str, bk: int) -> int:
    """Rows of a stored weight tile: bk values, or bk/2 bytes for packed MXFP4."""
    return bk // 2 if fmt == "mxfp4" else bk


# ---- custom_vjp shared by the Pallas implementations -----------------------------------------------------


def make_vjp(gmm: Callable, tgmm: Callable) -> Callable:
    """Wrap a backend's kernels into a differentiable core on prepared operands.

    `gmm(x, w, s, group_sizes, d, transpose, out_dtype, interpret)` is the grouped matmul (transpose=True
    computes x @ w[g].T, the input gradient); `tgmm(x, dy, group_sizes, d, out_dtype, interpret)` computes the
    per-expert weight gradient x_g.T @ dy_g. Quantised weights are constants: their cotangents are zero, and
    QAT trains through straight-through fake quantisation of float master weights instead (the float path has dW).
    """

    def forward(x, w, s, group_sizes, d, out_dtype, interpret):
        return gmm(x, w, s, group_sizes, d, False, out_dtype, interpret), (x, w, s, group_sizes)

    def backward(d, out_dtype, interpret, res, dy):
        x, w, s, group_sizes = res
        dx = gmm(dy, w, s, group_sizes, d, True, x.dtype, interpret)
        if d.fmt == "float":
            dw = tgmm(x, dy, group_sizes, d, w.dtype, interpret)
        elif jnp.issubdtype(w.dtype, jnp.integer):
            dw = np.zeros(w.shape, jax.dtypes.float0)
        else:
            dw = jnp.zeros_like(w)
        ds = None if s is None else jnp.zeros_like(s)
        return dx, dw, ds, np.zeros(group_sizes.shape, jax.dtypes.float0)

    return differentiable(forward, backward, n_static=3)


def run(core: Callable, lhs, rhs, group_sizes, rhs_scale, block_sizes: BlockSizes | None, out_dtype, interpret,
        gmm: Callable | None = None, lhs_scale=None, transpose_rhs: bool = False):
    """Shared entry of the Pallas implementations: validate, pad, call the differentiable core, crop.

    FP8 activations call the grouped matmul `gmm` directly (no autodiff: `expert_matmul_stored` defines their
    FP8 backward), with their tile scales as the last operand."""
    fmt = weight_format(lhs, rhs, group_sizes, rhs_scale, transpose_rhs)
    act = activation_format(lhs, lhs_scale, fmt, transpose_rhs)
    check_group_sizes(group_sizes, lhs.shape[0])
    d = plan(lhs, rhs, fmt, block_sizes or BlockSizes(), act)
    if act == "fp8":
        x, xs = prepare_fp8_activations(lhs, lhs_scale, d, transpose_rhs)
        w, s = prepare_weights(rhs, rhs_scale, d)
        out = gmm(x, w, s, group_sizes.astype(jnp.int32), d, transpose_rhs, jnp.dtype(out_dtype or jnp.bfloat16),
                  interpret, xs)
        return out[: d.m, : d.k if transpose_rhs else d.n]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    x, w, s = prepare(lhs, rhs, rhs_scale, d)
    out = core(x, w, s, group_sizes.astype(jnp.int32), d, out_dtype, interpret)
    return out[: d.m, : d.n]


def gmm_cost(d: Dims, x: jax.Array, w: jax.Array, s, out_itemsize: int, transpose: bool):
    """FLOPs and bytes of one grouped matmul (each operand read once: a lower bound on traffic)."""
    out_cols = d.kp if transpose else d.np_
    nbytes = x.size * x.dtype.itemsize + w.size * w.dtype.itemsize + d.mp * out_cols * out_itemsize
    if s is not None:
        nbytes += s.size * 4
    return pl.CostEstimate(flops=2 * d.mp * d.kp * d.np_, transcendentals=0, bytes_accessed=int(nbytes))


def tgmm_cost(d: Dims, x: jax.Array, dy: jax.Array, out_itemsize: int):
    """FLOPs and bytes of the weight-gradient kernel."""
    nbytes = x.size * x.dtype.itemsize + dy.size * dy.dtype.itemsize + d.e * d.kp * d.np_ * out_itemsize
    return pl.CostEstimate(flops=2 * d.mp * d.kp * d.np_, transcendentals=0, bytes_accessed=int(nbytes))
