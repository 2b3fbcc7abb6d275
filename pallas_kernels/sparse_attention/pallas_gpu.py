# Sparse attention, Pallas Triton style for NVIDIA GPUs (checked on CPU in interpret mode and by lowering to
# Triton IR for CUDA; not yet run on a GPU).
#
# Cost per query token (N heads, head dim H, window W, K selected entries, 2-byte dtype):
#   forward FLOPs   = 4 * N * H * (W + K)                      (QK^T and PV)
#   backward FLOPs  = 10 * N * H * (W + K)
#   forward bytes   ~ 4 * N * H (q in, o out) + 2 * K * H (gathered entry rows) + 2 * H (window keys,
#                     shared by the block_q queries of a program and mostly served from L2)
# Flash (N=64, H=512, W=128, K=512): 83.9 MFLOP and 0.66 MB per token -> ~128 FLOP/byte forward,
# under the H200 ridge point (~989 TFLOP/s / 4.8 TB/s ~ 206 FLOP/byte): the entry gather makes the
# forward memory-bound unless rows are reused from L2 (neighbouring queries pick overlapping entries).
# The backward adds atomic float adds of K * H entry-gradient values per token (non-deterministic order).
# Tuning note for the H200: an [N, H] = [64, 512] float32 accumulator is register-heavy for Triton;
# expect to tune num_warps or to split H across programs first.
"""Sparse attention: Pallas kernels in the Triton style (one program per query block, loops over keys).

Layout: queries become rows (token t, head n) -> t * N + n. A program owns block_q tokens (all N
heads, so rows = block_q * N >= 16 for the tensor cores) and loops over
* its window keys in blocks of block_kv (contiguous loads), then
* its tokens' selected entries in chunks of block_k slots, gathered with one vector load per chunk
  (a chunk belongs to one token; rows of the other tokens are masked).
Backward: the dq program recomputes the same loops and scatters the entry gradient with atomic adds;
the window dkv program loops over the queries that see its key block (`attention_base.window_gpu`).
Triton needs power-of-two tiles: N, H, and the block sizes must be powers of two.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import budgets
from pallas_kernels.attention_base.common import (
    WindowGeometry,
    attention_cost,
    dot_nn,
    dot_nt,
    dot_tn,
    online_softmax_step,
    pad_axis,
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
      block_k: selected-entry slots per loop step (per token).
      block_q_dkv: tokens per loop step of the window-gradient program; None = as block_q.
      block_kv_dkv: keys per window-gradient program.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_q: int | None = None
    block_kv: int = 64
    block_k: int = 64
    block_q_dkv: int | None = None
    block_kv_dkv: int = 64
    num_warps: int = 4
    num_stages: int = 2


# ----------------------------------------------------------------------------------------------
# Sparse forward and dq.


def _selected(b, t0, jc, block_k, Kp, idx_ref, ent_ref):
    """Chunk jc of the program's flattened slots: (local token, idx [block_k], gathered rows [block_k, H])."""
    idx = idx_ref[b, pl.ds(t0 * Kp + jc * block_k, block_k)]
    return (jc * block_k) // Kp, idx, ent_ref[b, jnp.maximum(idx, 0), :]


def _sparse_fwd_kernel(
    q_ref,
    qpos_ref,
    qseg_ref,
    kv_ref,
    kseg_ref,
    sink_ref,
    idx_ref,
    ent_ref,
    o_ref,
    lse_ref,
    *,
    g: WindowGeometry,
    Kp: int,
    block_k: int,
):
    b, i = pl.program_id(0), pl.program_id(1)
    t0 = i * g.block_q
    R = g.block_q * g.N
    q, t, q_seg = query_rows(g, b, t0, g.block_q, q_ref, qpos_ref, qseg_ref)
    carry = (sink_ref[...], jnp.ones((R, 1), jnp.float32), jnp.zeros((R, g.H), jnp.float32))
    carry = window_fwd_loop(g, b, t0, q, t, q_seg, kv_ref, kseg_ref, carry)
    row_token = jnp.arange(R, dtype=jnp.int32)[:, None] // g.N

    def chunk(jc, c):
        r, idx, e = _selected(b, t0, jc, block_k, Kp, idx_ref, ent_ref)
        mask = (idx >= 0)[None, :] & (row_token == r)
        return online_softmax_step(*c, dot_nt(q, e) * g.scale, mask, e)

    m, l, acc = lax.fori_loop(0, g.block_q * Kp // block_k, chunk, carry)
    rows = pl.ds(t0 * g.N, R)
    o_ref[b, rows, :] = (acc / l).astype(o_ref.dtype)
    lse_ref[b, rows, :] = m + jnp.log(l)


def _sparse_dq_kernel(
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qpos_ref,
    qseg_ref,
    kv_ref,
    kseg_ref,
    idx_ref,
    ent_ref,
    dent_in,
    dq_ref,
    dent_ref,
    *,
    g: WindowGeometry,
    Kp: int,
    block_k: int,
    C: int,
):
    del dent_in  # aliased with dent_ref
    b, i = pl.program_id(0), pl.program_id(1)
    t0 = i * g.block_q
    R = g.block_q * g.N
    rows = pl.ds(t0 * g.N, R)
    q, t, q_seg = query_rows(g, b, t0, g.block_q, q_ref, qpos_ref, qseg_ref)
    do, lse, delta = do_ref[b, rows, :], lse_ref[b, rows, :], delta_ref[b, rows, :]
    dq = window_dq_loop(g, b, t0, q, do, lse, delta, t, q_seg, kv_ref, kseg_ref, jnp.zeros((R, g.H), jnp.float32))
    row_token = jnp.arange(R, dtype=jnp.int32)[:, None] // g.N
    cols = jnp.arange(g.H, dtype=jnp.int32)[None, :]

    def chunk(jc, acc):
        r, idx, e = _selected(b, t0, jc, block_k, Kp, idx_ref, ent_ref)
        mask = (idx >= 0)[None, :] & (row_token == r)
        p, ds = softmax_grads(dot_nt(q, e) * g.scale, mask, lse, dot_nt(do, e), delta)
        d_e = g.scale * dot_tn(ds.astype(q.dtype), q) + dot_tn(p.astype(do.dtype), do)
        # Empty slots add their (zero) gradient to the spare row C, so no mask is needed.
        pltriton.atomic_add(dent_ref, (b, jnp.where(idx >= 0, idx, C)[:, None], cols), d_e)
        return acc + g.scale * dot_nn(ds.astype(e.dtype), e)

    dq = lax.fori_loop(0, g.block_q * Kp // block_k, chunk, dq)
    dq_ref[b, rows, :] = dq.astype(dq_ref.dtype)


def _layout(q, kv, entries, topk_idx, segment_ids, window, bs):
    B, T, N, H = q.shape
    g, Ta = window_geometry(B, T, N, H, window, bs)
    check_pow2(block_k=bs.block_k)
    Kp = round_up(max(topk_idx.shape[-1], 1), bs.block_k)
    idx = pad_axis(pad_axis(topk_idx.astype(jnp.int32), 2, Kp, -1), 1, Ta, -1)
    if not entries.shape[1]:
        idx = jnp.full_like(idx, -1)
    a = {
        **window_inputs(q, kv, segment_ids, Ta),
        "idx": idx.reshape(B, Ta * Kp),
        "ent": pad_axis(entries, 1, max(entries.shape[1], 1)),
    }
    return g, Ta, Kp, a


def _cost(g: WindowGeometry, Kp: int, itemsize: int, backward: bool) -> pl.CostEstimate:
    window_keys = g.window + g.block_q
    gathered = g.B * g.Tp * Kp * (g.H * itemsize + 4) * (3 if backward else 1)  # rows (+ f32 atomics)
    flops, trans, nbytes = attention_cost(
        batch=g.B,
        tokens=g.Tp,
        heads=g.N,
        head_dim=g.H,
        keys_per_query=window_keys + Kp,
        itemsize=itemsize,
        key_bytes=g.B * g.Tp * g.H * itemsize * window_keys / g.block_q + gathered,
        backward=backward,
    )
    return pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)


def _forward(q, kv, entries, topk_idx, sink, segment_ids, window, bs: BlockSizes, interpret: bool):
    B, T, N, H = q.shape
    g, Ta, Kp, a = _layout(q, kv, entries, topk_idx, segment_ids, window, bs)
    o_rows, lse = pl.pallas_call(
        functools.partial(_sparse_fwd_kernel, g=g, Kp=Kp, block_k=bs.block_k),
        grid=(B, g.nq),
        out_shape=[jax.ShapeDtypeStruct(a["q_rows"].shape, q.dtype), jax.ShapeDtypeStruct((B, Ta * N, 1), jnp.float32)],
        compiler_params=compiler_params(bs),
        cost_estimate=_cost(g, Kp, q.dtype.itemsize, backward=False),
        interpret=interpret,
        name="sparse_fwd_gpu",
    )(a["q_rows"], a["qpos"], a["qseg"], a["kv_p"], a["kseg"], sink_rows(sink, g.block_q), a["idx"], a["ent"])
    # Rows past Tp are never written: zero them so the backward reads defined values.
    valid = (jnp.arange(Ta * N) < g.Tp * N)[None, :, None]
    o_rows = jnp.where(valid, o_rows, 0)
    lse = jnp.where(valid, lse, 0.0)
    return o_rows.reshape(B, Ta, N, H)[:, :T], (a, entries, o_rows, lse, sink)


def _backward(window, bs: BlockSizes, interpret: bool, res, d_out):
    a, entries, o_rows, lse, sink = res
    B, T, N, H = d_out.shape
    g, Ta = window_geometry(B, T, N, H, window, bs)
    Kp = a["idx"].shape[1] // Ta
    C = entries.shape[1]
    do_rows = to_rows(d_out.astype(o_rows.dtype), Ta)
    delta = jnp.sum(do_rows.astype(jnp.float32) * o_rows.astype(jnp.float32), axis=-1, keepdims=True)
    dq_rows, dent = pl.pallas_call(
        functools.partial(_sparse_dq_kernel, g=g, Kp=Kp, block_k=bs.block_k, C=C),
        grid=(B, g.nq),
        out_shape=[
            jax.ShapeDtypeStruct(a["q_rows"].shape, a["q_rows"].dtype),
            jax.ShapeDtypeStruct((B, C + 1, H), jnp.float32),
        ],
        input_output_aliases={10: 1},
        compiler_params=compiler_params(bs),
        cost_estimate=_cost(g, Kp, o_rows.dtype.itemsize, backward=True),
        interpret=interpret,
        name="sparse_dq_gpu",
    )(
        a["q_rows"],
        do_rows,
        lse,
        delta,
        a["qpos"],
        a["qseg"],
        a["kv_p"],
        a["kseg"],
        a["idx"],
        a["ent"],
        jnp.zeros((B, C + 1, H), jnp.float32),
    )
    dkv = window_dkv(
        g, bs, a["kv_p"], a["kseg"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"], interpret=interpret
    )
    dq = dq_rows.reshape(B, Ta, N, H)[:, :T]
    return dq, dkv[:, :T], dent[:, :C].astype(entries.dtype), sink_grad(sink, lse, delta, N)


# Differentiable w.r.t. q, kv, entries and sink; window, block sizes and interpret are static.
_sparse = differentiable(_forward, _backward, n_static=3, grad_argnums=(0, 1, 2, 4))


def sparse_attention(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    topk_idx: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int = 128,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Sparse attention with Triton-style Pallas kernels; same contract as `reference.sparse_attention`.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], topk_idx [B, T, K] int32, sink [N],
      segment_ids [B, T] int32 -> [B, T, N, H].
    """
    return _sparse(q, kv, entries, topk_idx, sink, segment_ids, window,
                   block_sizes or budgets.attention_block_sizes(BlockSizes, "cuda", q.shape[2], q.shape[3]), interpret)
