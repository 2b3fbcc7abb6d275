# Sparse attention, Pallas Mosaic-TPU style (checked on CPU in interpret mode only; no TPU was available).
#
# Cost per query token (N heads, head dim H, window W, K selected entries, 2-byte dtype):
#   forward FLOPs   = 4 * N * H * (W + K)                      (QK^T and PV)
#   backward FLOPs  = 10 * N * H * (W + K)                     (recomputed QK^T, dO V^T, dQ, dK, dV)
#   forward bytes   ~ 4 * N * H (q in, o out) + 2 * K * H (gathered entries; no reuse across queries)
#                     + 2 * H (window keys; a block's keys are shared by its block_q queries)
# Flash (N=64, H=512, W=128, K=512): 83.9 MFLOP and 0.66 MB per token -> ~128 FLOP/byte forward.
# H200 ridge point ~989e12 / 4.8e12 ~ 206 FLOP/byte, so the forward is bound by the entry gather
# (memory) unless gathered rows hit in cache; the window part alone is compute-bound.
# On TPU the per-query gather is a row-by-row DMA (K DMAs of H * 2 bytes per query); the entry
# gradient is a sequential read-modify-write of the same rows (the dq kernel runs its grid in
# order), which makes the backward DMA-latency bound. Both are the obvious next optimisation
# (double-buffer the next query's rows; sort slots by entry to batch the writes).
"""Sparse attention: Pallas kernels in the Mosaic-TPU style (grid over key blocks, VMEM scratch carries).

Layout: queries become rows (token t, head n) -> t * N + n, so all N heads of a token share one
matmul against the single shared K=V head. Kernels:
* forward: grid (B, query blocks, window key blocks + top-k chunks); the window steps use BlockSpec
  key blocks, the top-k steps gather each query's selected entries row by row with DMAs from HBM;
* dq: same grid; also accumulates the entry gradient by read-modify-write DMAs into HBM;
* window dkv: grid (B, key blocks, query blocks that see them), `attention_base.window_tpu`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import budgets
from pallas_kernels.attention_base.common import (
    WindowGeometry,
    attention_cost,
    dot_nn,
    dot_nt,
    dot_tn,
    online_softmax_step,
    pad_axis,
    sink_grad,
    sink_rows,
    softmax_grads,
    to_rows,
    window_inputs,
)
from pallas_kernels.attention_base.window_tpu import dq_kernel_body, fwd_kernel_body, window_dkv, window_specs
from pallas_kernels.autodiff import differentiable


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the TPU kernels (on a real TPU keep them multiples of 8 and 128 as Mosaic requires).

    Attributes:
      block_q: queries per grid step of the forward and dq kernels (rows = block_q * N).
      block_kv: window keys per grid step of the forward and dq kernels.
      block_k: selected entries gathered per grid step (per query).
      block_q_dkv: queries per step of the window-gradient kernel.
      block_kv_dkv: keys per step of the window-gradient kernel.
    """

    block_q: int = 128
    block_kv: int = 128
    block_k: int = 128
    block_q_dkv: int = 128
    block_kv_dkv: int = 128


# ----------------------------------------------------------------------------------------------
# Sparse attention: forward and dq kernels.


def _gather_rows(ent_hbm, b, idx_smem, r, buf, sem, n):
    """DMA entries[b, idx[r, k]] -> buf[k] for k < n (empty slots fetch row 0; they are masked)."""

    def start(k, carry):
        row = jnp.maximum(idx_smem[r, k], 0)
        pltpu.make_async_copy(ent_hbm.at[b, pl.ds(row, 1)], buf.at[pl.ds(k, 1)], sem.at[0]).start()
        return carry

    def wait(k, carry):
        pltpu.make_async_copy(ent_hbm.at[b, pl.ds(0, 1)], buf.at[pl.ds(k, 1)], sem.at[0]).wait()
        return carry

    lax.fori_loop(0, n, start, 0)
    lax.fori_loop(0, n, wait, 0)


def _sparse_fwd_kernel(
    idx_smem,
    idx_vmem,
    q_ref,
    qpos_ref,
    qseg_ref,
    kv_ref,
    kseg_ref,
    sink_ref,
    ent_hbm,
    o_ref,
    lse_ref,
    m_sc,
    l_sc,
    acc_sc,
    gbuf,
    sem,
    *,
    g: WindowGeometry,
    n_steps: int,
    block_k: int,
):
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    N = g.N

    def entry_step():
        def one_query(r, carry):
            _gather_rows(ent_hbm, b, idx_smem, r, gbuf, sem, block_k)
            rows = pl.ds(r * N, N)
            e = gbuf[...]
            s = dot_nt(q_ref[rows, :], e) * g.scale
            valid = idx_vmem[pl.ds(r, 1), :] >= 0
            m, l, acc = online_softmax_step(m_sc[rows, :], l_sc[rows, :], acc_sc[rows, :], s, valid, e)
            m_sc[rows, :] = m
            l_sc[rows, :] = l
            acc_sc[rows, :] = acc
            return carry

        lax.fori_loop(0, g.block_q, one_query, 0)

    fwd_kernel_body(g, i, j, n_steps, sink_ref, q_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref, o_ref, lse_ref,
                    m_sc, l_sc, acc_sc, j >= g.n_window_steps, entry_step)


def _sparse_dq_kernel(
    idx_smem,
    idx_vmem,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qpos_ref,
    qseg_ref,
    kv_ref,
    kseg_ref,
    ent_hbm,
    dent_in,
    dq_ref,
    dent_hbm,
    dq_sc,
    gbuf,
    dbuf,
    rowbuf,
    sem,
    *,
    g: WindowGeometry,
    n_steps: int,
    block_k: int,
):
    del dent_in  # aliased with dent_hbm
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    N = g.N

    def entry_step():
        def one_query(r, carry):
            _gather_rows(ent_hbm, b, idx_smem, r, gbuf, sem, block_k)
            rows = pl.ds(r * N, N)
            e = gbuf[...]
            q = q_ref[rows, :]
            do = do_ref[rows, :]
            s = dot_nt(q, e) * g.scale
            valid = idx_vmem[pl.ds(r, 1), :] >= 0
            p, ds = softmax_grads(s, valid, lse_ref[rows, :], dot_nt(do, e), delta_ref[rows, :])
            dq_sc[rows, :] += g.scale * dot_nn(ds.astype(e.dtype), e)
            dbuf[...] = g.scale * dot_tn(ds.astype(q.dtype), q) + dot_tn(p.astype(do.dtype), do)

            def add_row(k, c):
                row = idx_smem[r, k]

                @pl.when(row >= 0)
                def _():
                    read = pltpu.make_async_copy(dent_hbm.at[b, pl.ds(row, 1)], rowbuf, sem.at[1])
                    read.start()
                    read.wait()
                    rowbuf[...] += dbuf[pl.ds(k, 1), :]
                    write = pltpu.make_async_copy(rowbuf, dent_hbm.at[b, pl.ds(row, 1)], sem.at[1])
                    write.start()
                    write.wait()

                return c

            lax.fori_loop(0, block_k, add_row, 0)
            return carry

        lax.fori_loop(0, g.block_q, one_query, 0)

    dq_kernel_body(g, i, j, n_steps, q_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref,
                   dq_ref, dq_sc, j >= g.n_window_steps, entry_step)


def _layout(q, kv, entries, topk_idx, segment_ids, window, bs):
    """Pads everything to the block grid; returns (geometry, number of grid steps, arrays)."""
    B, T, N, H = q.shape
    g = WindowGeometry.make(B, T, N, H, window, bs)
    n_chunks = -(-topk_idx.shape[-1] // bs.block_k)
    # K == 0 still gets one (unused) chunk of -1 so the BlockSpecs have something to point at.
    idx = pad_axis(pad_axis(topk_idx.astype(jnp.int32), 1, g.Tp, -1), 2, max(n_chunks, 1) * bs.block_k, -1)
    if not entries.shape[1]:  # nothing to gather: every slot is empty, gather a dummy row
        entries = jnp.zeros((B, 1, H), entries.dtype)
        idx = jnp.full_like(idx, -1)
    arrays = {
        "idx": idx,
        "ent": entries,
        **window_inputs(q, kv, segment_ids, g.Tp),
    }
    return g, g.n_window_steps + n_chunks, arrays


def _specs(g: WindowGeometry, block_k: int, H: int):
    """BlockSpecs of the forward/dq grids (b, query block i, step j)."""
    chunk = lambda b, i, j: (b, i, jnp.maximum(j - g.n_window_steps, 0))
    return {
        **window_specs(g, H),
        "idx_smem": pl.BlockSpec((None, g.block_q, block_k), chunk, memory_space=pltpu.SMEM),
        "idx_vmem": pl.BlockSpec((None, g.block_q, block_k), chunk),
        "hbm": pl.BlockSpec(memory_space=pl.ANY),
    }


def _cost(g: WindowGeometry, Kp: int, itemsize: int, backward: bool) -> pl.CostEstimate:
    window_keys = g.n_window_steps * g.block_kv
    gathered = g.B * g.Tp * Kp * (g.H * itemsize + 4) * (2 if backward else 1)  # rows (+ RMW of gradients)
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
    g, n_steps, a = _layout(q, kv, entries, topk_idx, segment_ids, window, bs)
    B, T, N, H = q.shape
    sp = _specs(g, bs.block_k, H)
    R = g.block_q * N
    o_rows, lse = pl.pallas_call(
        functools.partial(_sparse_fwd_kernel, g=g, n_steps=n_steps, block_k=bs.block_k),
        grid=(B, g.nq, n_steps),
        in_specs=[
            sp["idx_smem"],
            sp["idx_vmem"],
            sp["rows_h"],
            sp["qpos"],
            sp["rows_1"],
            sp["kv"],
            sp["kseg"],
            sp["sink"],
            sp["hbm"],
        ],
        out_specs=[sp["rows_h"], sp["rows_1"]],
        out_shape=[
            jax.ShapeDtypeStruct(a["q_rows"].shape, q.dtype),
            jax.ShapeDtypeStruct((B, g.Tp * N, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((R, 1), jnp.float32),
            pltpu.VMEM((R, 1), jnp.float32),
            pltpu.VMEM((R, H), jnp.float32),
            pltpu.VMEM((bs.block_k, H), a["ent"].dtype),
            pltpu.SemaphoreType.DMA((1,)),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(g, a["idx"].shape[-1], q.dtype.itemsize, backward=False),
        interpret=interpret,
        name="sparse_fwd_tpu",
    )(a["idx"], a["idx"], a["q_rows"], a["qpos"], a["qseg"], a["kv_p"], a["kseg"], sink_rows(sink, g.block_q), a["ent"])
    out = o_rows.reshape(B, g.Tp, N, H)[:, :T]
    return out, (a, entries, topk_idx, o_rows, lse, sink)


def _backward(window, bs: BlockSizes, interpret: bool, res, d_out):
    a, entries, topk_idx, o_rows, lse, sink = res
    B, T, N, H = d_out.shape
    g = WindowGeometry.make(B, T, N, H, window, bs)
    n_steps = g.n_window_steps + -(-topk_idx.shape[-1] // bs.block_k)
    C = a["ent"].shape[1]
    do_rows = to_rows(d_out.astype(o_rows.dtype), g.Tp)
    delta = jnp.sum(do_rows.astype(jnp.float32) * o_rows.astype(jnp.float32), axis=-1, keepdims=True)
    sp = _specs(g, bs.block_k, H)
    R = g.block_q * N
    dq_rows, dent = pl.pallas_call(
        functools.partial(_sparse_dq_kernel, g=g, n_steps=n_steps, block_k=bs.block_k),
        grid=(B, g.nq, n_steps),
        in_specs=[
            sp["idx_smem"],
            sp["idx_vmem"],
            sp["rows_h"],
            sp["rows_h"],
            sp["rows_1"],
            sp["rows_1"],
            sp["qpos"],
            sp["rows_1"],
            sp["kv"],
            sp["kseg"],
            sp["hbm"],
            sp["hbm"],
        ],
        out_specs=[sp["rows_h"], sp["hbm"]],
        out_shape=[
            jax.ShapeDtypeStruct(a["q_rows"].shape, a["q_rows"].dtype),
            jax.ShapeDtypeStruct((B, C, H), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((R, H), jnp.float32),
            pltpu.VMEM((bs.block_k, H), a["ent"].dtype),
            pltpu.VMEM((bs.block_k, H), jnp.float32),
            pltpu.VMEM((1, H), jnp.float32),
            pltpu.SemaphoreType.DMA((2,)),
        ],
        input_output_aliases={11: 1},
        # The entry gradient is a read-modify-write of HBM rows: the grid must run in order.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary", "arbitrary")),
        cost_estimate=_cost(g, a["idx"].shape[-1], o_rows.dtype.itemsize, backward=True),
        interpret=interpret,
        name="sparse_dq_tpu",
    )(
        a["idx"],
        a["idx"],
        a["q_rows"],
        do_rows,
        lse,
        delta,
        a["qpos"],
        a["qseg"],
        a["kv_p"],
        a["kseg"],
        a["ent"],
        jnp.zeros((B, C, H), jnp.float32),
    )
    dkv = window_dkv(
        g, a["kv_p"], a["kseg"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"], interpret=interpret
    )
    dq = dq_rows.reshape(B, g.Tp, N, H)[:, :T]
    dent = dent[:, : entries.shape[1]].astype(entries.dtype)
    return dq, dkv[:, :T], dent, sink_grad(sink, lse, delta, N)


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
    """Sparse attention with Mosaic-TPU Pallas kernels; same contract as `reference.sparse_attention`.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], topk_idx [B, T, K] int32, sink [N],
      segment_ids [B, T] int32 -> [B, T, N, H].
    """
    return _sparse(q, kv, entries, topk_idx, sink, segment_ids, window,
                   block_sizes or budgets.attention_block_sizes(BlockSizes, "tpu", q.shape[2], q.shape[3]), interpret)
