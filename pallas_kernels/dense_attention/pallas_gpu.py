# Dense attention, Pallas Triton style for NVIDIA GPUs (checked on CPU in interpret mode and by lowering to
# Triton IR for CUDA; not yet run on a GPU).
#
# Cost per query token t (N heads, head dim H, window W, admissible entries A(t) = (t + 1) // m):
#   forward FLOPs  = 4 * N * H * (W + A(t));  backward FLOPs = 10 * N * H * (W + A(t))
#   forward bytes  ~ 4 * N * H (q in, o out) + 2 * H * (W + A) / block_q (keys shared by a program's tokens)
# Flash HCA layers (N=64, H=512, W=128, m=128) at T = 64K: mean A = 256 -> 50 MFLOP and ~0.13 MB per token,
# ~380 FLOP/byte: compute-bound on H200 (ridge ~206 FLOP/byte at 989 TFLOP/s and 4.8 TB/s).
# CSA's dense phase (m = 4) has A up to T / 4: quadratic FLOPs, strongly compute-bound.
"""Dense attention: Pallas kernels in the Triton style (one program per query block, loops over keys).

Rows (token t, head n) -> t * N + n. A forward/dq program loops over its window keys
(`attention_base.window_gpu`) and then over the entry blocks up to its last admissible entry, found from the
query offset (absolute position of row 0, a one-element input; docs/kernels.md). The entry gradient has
one program per entry block looping over the queries from the first one that sees the block
(deterministic, no atomics). Triton needs power-of-two tiles: N, H and the block sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import budgets
from pallas_kernels.attention_base.common import (
    WindowGeometry,
    attention_cost,
    candidate_entries,
    dot_nn,
    dot_nt,
    dot_tn,
    entry_block_mask,
    entry_keys,
    online_softmax_step,
    pad_axis,
    pad_entry_keys,
    query_offset_array,
    round_up,
    sink_grad,
    sink_rows,
    softmax_grads,
    to_rows,
    window_inputs,
)
from pallas_kernels.attention_base.window_gpu import (
    check_pow2,
    compiler_params,
    query_rows,
    window_dkv,
    window_dq_loop,
    window_fwd_loop,
    window_geometry,
)
from pallas_kernels.autodiff import differentiable


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Triton kernels (powers of two).

    Attributes:
      block_q: tokens per forward/dq program; None = the smallest with block_q * N >= 16.
      block_kv: window keys per loop step.
      block_e: compressed entries per loop step (and per entry-gradient program).
      block_q_dkv: tokens per loop step of the gradient programs; None = as block_q.
      block_kv_dkv: keys per window-gradient program.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_q: int | None = None
    block_kv: int = 64
    block_e: int = 64
    block_q_dkv: int | None = None
    block_kv_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2


def _entry_keys(eseg_ref, b, e0, block_e):
    """(entry_segment [1, block_e], entry_end [1, block_e]) of entries e0 .. e0 + block_e - 1."""
    cols = pl.ds(e0, block_e)
    return eseg_ref[b, pl.ds(0, 1), cols], eseg_ref[b, pl.ds(1, 1), cols]


def _entry_loop(g: WindowGeometry, b, t0, off, ratio, C, block_e, q, t, q_seg, ent_ref, eseg_ref, step, carry):
    """Runs step(carry, s, mask, e) over the entry blocks admissible for rows t0 .. t0 + block_q - 1 (absolute
    positions: row + off)."""
    last_t = t0 + g.block_q - 1 + off
    n_adm = jnp.where(last_t < 0, 0, jnp.minimum(candidate_entries(jnp.maximum(last_t, 0), ratio), C))

    def body(eb, c):
        e0 = eb * block_e
        e = ent_ref[b, pl.ds(e0, block_e), :]
        mask = entry_block_mask(t + off, q_seg, *_entry_keys(eseg_ref, b, e0, block_e))
        return step(c, dot_nt(q, e) * g.scale, mask, e)

    return lax.fori_loop(0, lax.div(n_adm + block_e - 1, block_e), body, carry)


def _dense_fwd_kernel(
    off_ref,
    q_ref,
    qpos_ref,
    qseg_ref,
    kv_ref,
    kseg_ref,
    sink_ref,
    ent_ref,
    eseg_ref,
    o_ref,
    lse_ref,
    *,
    g: WindowGeometry,
    ratio: int,
    C: int,
    block_e: int,
):
    b, i = pl.program_id(0), pl.program_id(1)
    t0 = i * g.block_q
    R = g.block_q * g.N
    q, t, q_seg = query_rows(g, b, t0, g.block_q, q_ref, qpos_ref, qseg_ref)
    carry = (sink_ref[...], jnp.ones((R, 1), jnp.float32), jnp.zeros((R, g.H), jnp.float32))
    carry = window_fwd_loop(g, b, t0, q, t, q_seg, kv_ref, kseg_ref, carry)
    step = lambda c, s, mask, e: online_softmax_step(*c, s, mask, e)
    m, l, acc = _entry_loop(g, b, t0, off_ref[0], ratio, C, block_e, q, t, q_seg, ent_ref, eseg_ref, step, carry)
    rows = pl.ds(t0 * g.N, R)
    o_ref[b, rows, :] = (acc / l).astype(o_ref.dtype)
    lse_ref[b, rows, :] = m + jnp.log(l)


def _dense_dq_kernel(
    off_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qpos_ref,
    qseg_ref,
    kv_ref,
    kseg_ref,
    ent_ref,
    eseg_ref,
    dq_ref,
    *,
    g: WindowGeometry,
    ratio: int,
    C: int,
    block_e: int,
):
    b, i = pl.program_id(0), pl.program_id(1)
    t0 = i * g.block_q
    R = g.block_q * g.N
    rows = pl.ds(t0 * g.N, R)
    q, t, q_seg = query_rows(g, b, t0, g.block_q, q_ref, qpos_ref, qseg_ref)
    do, lse, delta = do_ref[b, rows, :], lse_ref[b, rows, :], delta_ref[b, rows, :]
    dq = window_dq_loop(g, b, t0, q, do, lse, delta, t, q_seg, kv_ref, kseg_ref, jnp.zeros((R, g.H), jnp.float32))

    def step(acc, s, mask, e):
        _, ds = softmax_grads(s, mask, lse, dot_nt(do, e), delta)
        return acc + g.scale * dot_nn(ds.astype(e.dtype), e)

    dq = _entry_loop(g, b, t0, off_ref[0], ratio, C, block_e, q, t, q_seg, ent_ref, eseg_ref, step, dq)
    dq_ref[b, rows, :] = dq.astype(dq_ref.dtype)


def _dense_dent_kernel(
    off_ref,
    ent_ref,
    eseg_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qpos_ref,
    qseg_ref,
    dent_ref,
    *,
    g: WindowGeometry,
    ratio: int,
    block_e: int,
):
    b, eb = pl.program_id(0), pl.program_id(1)
    bq = g.block_q_dkv
    e0 = eb * block_e
    e = ent_ref[b, pl.ds(e0, block_e), :]
    e_seg, e_end = _entry_keys(eseg_ref, b, e0, block_e)
    off = off_ref[0]
    first_t = jnp.maximum(e0 * ratio - off, 0)  # entry_end[c] >= c * ratio: no earlier row sees the block
    n = lax.div(jnp.maximum(g.Tp - first_t, 0) + bq - 1, bq)

    def body(jj, acc):
        rows = pl.ds((first_t + jj * bq) * g.N, bq * g.N)
        q, do = q_ref[b, rows, :], do_ref[b, rows, :]
        mask = entry_block_mask(qpos_ref[rows, :] + off, qseg_ref[b, rows, :], e_seg, e_end)
        p, ds = softmax_grads(dot_nt(q, e) * g.scale, mask, lse_ref[b, rows, :], dot_nt(do, e), delta_ref[b, rows, :])
        return acc + g.scale * dot_tn(ds.astype(q.dtype), q) + dot_tn(p.astype(do.dtype), do)

    acc = lax.fori_loop(0, n, body, jnp.zeros((block_e, g.H), jnp.float32))
    dent_ref[b, pl.ds(e0, block_e), :] = acc.astype(dent_ref.dtype)


def _cost(g: WindowGeometry, C: int, ratio: int, itemsize: int, backward: bool) -> pl.CostEstimate:
    keys = g.window + g.block_q + min(C, g.Tp / (2 * ratio))
    flops, trans, nbytes = attention_cost(
        batch=g.B,
        tokens=g.Tp,
        heads=g.N,
        head_dim=g.H,
        keys_per_query=keys,
        itemsize=itemsize,
        key_bytes=g.B * g.Tp * g.H * itemsize * keys / g.block_q,
        backward=backward,
    )
    return pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)


def _layout(q, kv, entries, entry_keys, segment_ids, window, bs):
    B, T, N, H = q.shape
    g, Ta = window_geometry(B, T, N, H, window, bs)
    check_pow2(block_e=bs.block_e)
    Cp = round_up(max(entries.shape[1], 1), bs.block_e)
    a = {
        **window_inputs(q, kv, segment_ids, Ta),
        "ent": pad_axis(entries, 1, Cp),
        "eseg": pad_entry_keys(entry_keys, Cp),
    }
    return g, Ta, a


def _forward(q, kv, entries, entry_keys, offset, sink, segment_ids, ratio, window, bs: BlockSizes, interpret):
    B, T, N, H = q.shape
    C = entries.shape[1]
    g, Ta, a = _layout(q, kv, entries, entry_keys, segment_ids, window, bs)
    a["off"] = offset.reshape(1)
    o_rows, lse = pl.pallas_call(
        functools.partial(_dense_fwd_kernel, g=g, ratio=ratio, C=C, block_e=bs.block_e),
        grid=(B, g.nq),
        out_shape=[jax.ShapeDtypeStruct(a["q_rows"].shape, q.dtype), jax.ShapeDtypeStruct((B, Ta * N, 1), jnp.float32)],
        compiler_params=compiler_params(bs),
        cost_estimate=_cost(g, C, ratio, q.dtype.itemsize, backward=False),
        interpret=interpret,
        name="dense_fwd_gpu",
    )(a["off"], a["q_rows"], a["qpos"], a["qseg"], a["kv_p"], a["kseg"], sink_rows(sink, g.block_q), a["ent"],
      a["eseg"])
    valid = (jnp.arange(Ta * N) < g.Tp * N)[None, :, None]
    o_rows = jnp.where(valid, o_rows, 0)
    lse = jnp.where(valid, lse, 0.0)
    return o_rows.reshape(B, Ta, N, H)[:, :T], (a, entries, o_rows, lse, sink)


def _backward(ratio, window, bs: BlockSizes, interpret, res, d_out):
    a, entries, o_rows, lse, sink = res
    B, T, N, H = d_out.shape
    C = entries.shape[1]
    g, Ta = window_geometry(B, T, N, H, window, bs)
    do_rows = to_rows(d_out.astype(o_rows.dtype), Ta)
    delta = jnp.sum(do_rows.astype(jnp.float32) * o_rows.astype(jnp.float32), axis=-1, keepdims=True)
    itemsize = o_rows.dtype.itemsize
    dq_rows = pl.pallas_call(
        functools.partial(_dense_dq_kernel, g=g, ratio=ratio, C=C, block_e=bs.block_e),
        grid=(B, g.nq),
        out_shape=jax.ShapeDtypeStruct(a["q_rows"].shape, a["q_rows"].dtype),
        compiler_params=compiler_params(bs),
        cost_estimate=_cost(g, C, ratio, itemsize, backward=True),
        interpret=interpret,
        name="dense_dq_gpu",
    )(a["off"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"], a["kv_p"], a["kseg"], a["ent"], a["eseg"])
    dkv = window_dkv(
        g, bs, a["kv_p"], a["kseg"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"], interpret=interpret
    )
    dent = pl.pallas_call(
        functools.partial(_dense_dent_kernel, g=g, ratio=ratio, block_e=bs.block_e),
        grid=(B, a["ent"].shape[1] // bs.block_e),
        out_shape=jax.ShapeDtypeStruct(a["ent"].shape, entries.dtype),
        compiler_params=compiler_params(bs),
        cost_estimate=_cost(g, C, ratio, itemsize, backward=True),
        interpret=interpret,
        name="dense_dentries_gpu",
    )(a["off"], a["ent"], a["eseg"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"])
    dq = dq_rows.reshape(B, Ta, N, H)[:, :T]
    return dq, dkv[:, :T], dent[:, :C], sink_grad(sink, lse, delta, N)


# Differentiable w.r.t. q, kv, entries and sink; ratio, window, block sizes and interpret are static.
_dense = differentiable(_forward, _backward, n_static=4, grad_argnums=(0, 1, 2, 5))


def dense_attention(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    entry_segment: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    window: int = 128,
    entry_end: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Dense attention with Triton-style Pallas kernels; same contract as `reference.dense_attention`.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], entry_segment [B, C] int32, sink [N],
      segment_ids [B, T] int32, entry_end [B, C] int32, query_offset [] int32 -> [B, T, N, H].
    """
    # default: fits on chip at 64-128 heads of 512 (pallas_kernels/budgets.py)
    bs = block_sizes or budgets.attention_block_sizes(BlockSizes, "cuda", q.shape[2], q.shape[3])
    keys = entry_keys(entry_segment, entry_end, ratio)
    offset = query_offset_array(query_offset)
    return _dense(q, kv, entries, keys, offset, sink, segment_ids, ratio, window, bs, interpret)
