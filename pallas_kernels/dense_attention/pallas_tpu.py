# Dense attention, Pallas Mosaic-TPU style (checked on CPU in interpret mode only; no TPU was available).
#
# Cost per query token t (N heads, head dim H, window W, admissible entries A(t) = (t + 1) // m):
#   forward FLOPs  = 4 * N * H * (W + A(t));  backward FLOPs = 10 * N * H * (W + A(t))
#   forward bytes  ~ 4 * N * H (q in, o out); keys and entries are shared by the block_q queries of a block
#                    (2 * H * (W + A) / block_q per token)
# Flash HCA layers (N=64, H=512, W=128, m=128) at T = 64K: mean A = 256, so 50 MFLOP and ~0.13 MB per token
# -> ~380 FLOP/byte: compute-bound on H200 (ridge ~206 FLOP/byte at 989 TFLOP/s, 4.8 TB/s).
# CSA's dense phase (m = 4) has A up to T / 4 and is even more compute-bound (quadratic FLOPs).
"""Dense attention: Pallas kernels in the Mosaic-TPU style (grid over key blocks, VMEM scratch carries).

Rows (token t, head n) -> t * N + n. Kernels:
* forward and dq: grid (B, query blocks, window key blocks + entry blocks); entry blocks past the
  last admissible entry of a query block are skipped (their DMA index is clamped, so no copy);
  the query offset (absolute position of row 0, docs/kernels.md) is a prefetched scalar that the index
  maps and the entry masks read;
* window dkv: `attention_base.window_tpu`;
* entry gradient: grid (B, entry blocks, query blocks from the first query that sees the block).
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
from pallas_kernels.attention_base.window_tpu import dq_kernel_body, fwd_kernel_body, window_dkv, window_specs
from pallas_kernels.autodiff import differentiable


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the TPU kernels (on a real TPU keep them multiples of 8 and 128 as Mosaic requires).

    Attributes:
      block_q: queries per grid step of the forward and dq kernels (rows = block_q * N).
      block_kv: window keys per grid step of the forward and dq kernels.
      block_e: compressed entries per grid step (all kernels).
      block_q_dkv: queries per step of the window and entry gradient kernels.
      block_kv_dkv: keys per step of the window-gradient kernel.
    """

    block_q: int = 128
    block_kv: int = 128
    block_e: int = 128
    block_q_dkv: int = 128
    block_kv_dkv: int = 128


@dataclasses.dataclass(frozen=True)
class EntryGeometry:
    """Entry-block ranges: which entry blocks a query block needs, which query blocks an entry block feeds.

    `off` is the query offset: query row t has absolute position t + off, the frame of entry_end.
    """

    C: int
    Cp: int
    ratio: int
    block_e: int
    block_q: int
    block_q_de: int
    nq_de: int

    def n_admissible(self, i, off):
        """Entries admissible for the last query of query block i (and so for some query of the block)."""
        last_t = (i + 1) * self.block_q - 1 + off
        return jnp.where(last_t < 0, 0, jnp.minimum(candidate_entries(jnp.maximum(last_t, 0), self.ratio), self.C))

    def e_block(self, i, j_e, off):
        last = lax.div(jnp.maximum(self.n_admissible(i, off) - 1, 0), self.block_e)
        return jnp.clip(j_e, 0, last)

    def first_q(self, eb, off):
        """First query block (of block_q_de) that may see entry eb * block_e (entry_end[c] >= c * ratio)."""
        return lax.div(jnp.maximum(eb * self.block_e * self.ratio - off, 0), self.block_q_de)

    def q_block(self, eb, j, off):
        return jnp.minimum(self.first_q(eb, off) + j, self.nq_de - 1)


def _dense_fwd_kernel(
    off_ref,
    q_ref,
    qpos_ref,
    qseg_ref,
    kv_ref,
    kseg_ref,
    ent_ref,
    eseg_ref,
    sink_ref,
    o_ref,
    lse_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    g: WindowGeometry,
    e: EntryGeometry,
    n_steps: int,
):
    i, j = pl.program_id(1), pl.program_id(2)

    eb = j - g.n_window_steps
    off = off_ref[0]

    def entry_step():
        ent = ent_ref[...]
        s = dot_nt(q_ref[...], ent) * g.scale
        mask = entry_block_mask(qpos_ref[...] + off, qseg_ref[...], eseg_ref[0:1, :], eseg_ref[1:2, :])
        m, l, acc = online_softmax_step(m_sc[...], l_sc[...], acc_sc[...], s, mask, ent)
        m_sc[...] = m
        l_sc[...] = l
        acc_sc[...] = acc

    fwd_kernel_body(g, i, j, n_steps, sink_ref, q_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref, o_ref, lse_ref,
                    m_sc, l_sc, acc_sc, (eb >= 0) & (eb * e.block_e < e.n_admissible(i, off)), entry_step)


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
    dq_sc,
    *,
    g: WindowGeometry,
    e: EntryGeometry,
    n_steps: int,
):
    i, j = pl.program_id(1), pl.program_id(2)

    eb = j - g.n_window_steps
    off = off_ref[0]

    def entry_step():
        ent = ent_ref[...]
        s = dot_nt(q_ref[...], ent) * g.scale
        mask = entry_block_mask(qpos_ref[...] + off, qseg_ref[...], eseg_ref[0:1, :], eseg_ref[1:2, :])
        _, ds = softmax_grads(s, mask, lse_ref[...], dot_nt(do_ref[...], ent), delta_ref[...])
        dq_sc[...] += g.scale * dot_nn(ds.astype(ent.dtype), ent)

    dq_kernel_body(g, i, j, n_steps, q_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref,
                   dq_ref, dq_sc, (eb >= 0) & (eb * e.block_e < e.n_admissible(i, off)), entry_step)


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
    acc_sc,
    *,
    scale: float,
    e: EntryGeometry,
):
    eb, j = pl.program_id(1), pl.program_id(2)
    off = off_ref[0]

    @pl.when(j == 0)
    def _():
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(e.first_q(eb, off) + j < e.nq_de)
    def _():
        ent = ent_ref[...]
        q = q_ref[...]
        do = do_ref[...]
        s = dot_nt(q, ent) * scale
        mask = entry_block_mask(qpos_ref[...] + off, qseg_ref[...], eseg_ref[0:1, :], eseg_ref[1:2, :])
        p, ds = softmax_grads(s, mask, lse_ref[...], dot_nt(do, ent), delta_ref[...])
        acc_sc[...] += scale * dot_tn(ds.astype(q.dtype), q) + dot_tn(p.astype(do.dtype), do)

    @pl.when(j == e.nq_de - 1)
    def _():
        dent_ref[...] = acc_sc[...].astype(dent_ref.dtype)


def _geometry(q_shape, C, ratio, window, bs: BlockSizes):
    B, T, N, H = q_shape
    g = WindowGeometry.make(B, T, N, H, window, bs)
    Cp = round_up(max(C, 1), bs.block_e)
    e = EntryGeometry(
        C=C,
        Cp=Cp,
        ratio=ratio,
        block_e=bs.block_e,
        block_q=bs.block_q,
        block_q_de=bs.block_q_dkv,
        nq_de=g.Tp // bs.block_q_dkv,
    )
    return g, e


def _specs(g: WindowGeometry, e: EntryGeometry, H: int):
    """Block specs of the forward and dq grids; index maps get (b, i, j, offset ref) (one prefetched scalar)."""
    eblk = lambda i, j, off: e.e_block(i, j - g.n_window_steps, off[0])
    return {
        **window_specs(g, H),
        "ent": pl.BlockSpec((None, e.block_e, H), lambda b, i, j, off: (b, eblk(i, j, off), 0)),
        "eseg": pl.BlockSpec((None, 2, e.block_e), lambda b, i, j, off: (b, 0, eblk(i, j, off))),
    }


def _cost(g: WindowGeometry, e: EntryGeometry, itemsize: int, backward: bool) -> pl.CostEstimate:
    window_keys = g.n_window_steps * g.block_kv
    mean_entries = min(e.C, g.Tp / (2 * e.ratio))
    flops, trans, nbytes = attention_cost(
        batch=g.B,
        tokens=g.Tp,
        heads=g.N,
        head_dim=g.H,
        keys_per_query=window_keys + mean_entries,
        itemsize=itemsize,
        key_bytes=g.B * g.Tp * g.H * itemsize * (window_keys + mean_entries) / g.block_q,
        backward=backward,
    )
    return pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes)


def _forward(q, kv, entries, entry_keys, offset, sink, segment_ids, ratio, window, bs: BlockSizes, interpret):
    B, T, N, H = q.shape
    g, e = _geometry(q.shape, entries.shape[1], ratio, window, bs)
    a = {
        **window_inputs(q, kv, segment_ids, g.Tp),
        "ent": pad_axis(entries, 1, e.Cp),
        "eseg": pad_entry_keys(entry_keys, e.Cp),
        "off": offset.reshape(1),
    }
    n_steps = g.n_window_steps + e.Cp // e.block_e
    sp = _specs(g, e, H)
    R = g.block_q * N
    o_rows, lse = pl.pallas_call(
        functools.partial(_dense_fwd_kernel, g=g, e=e, n_steps=n_steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, g.nq, n_steps),
            in_specs=[sp["rows_h"], sp["qpos"], sp["rows_1"], sp["kv"], sp["kseg"], sp["ent"], sp["eseg"],
                      sp["sink"]],
            out_specs=[sp["rows_h"], sp["rows_1"]],
            scratch_shapes=[
                pltpu.VMEM((R, 1), jnp.float32),
                pltpu.VMEM((R, 1), jnp.float32),
                pltpu.VMEM((R, H), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct(a["q_rows"].shape, q.dtype),
            jax.ShapeDtypeStruct((B, g.Tp * N, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(g, e, q.dtype.itemsize, backward=False),
        interpret=interpret,
        name="dense_fwd_tpu",
    )(a["off"], a["q_rows"], a["qpos"], a["qseg"], a["kv_p"], a["kseg"], a["ent"], a["eseg"],
      sink_rows(sink, g.block_q))
    return o_rows.reshape(B, g.Tp, N, H)[:, :T], (a, entries, o_rows, lse, sink)


def _backward(ratio, window, bs: BlockSizes, interpret, res, d_out):
    a, entries, o_rows, lse, sink = res
    B, T, N, H = d_out.shape
    g, e = _geometry(d_out.shape, entries.shape[1], ratio, window, bs)
    n_steps = g.n_window_steps + e.Cp // e.block_e
    do_rows = to_rows(d_out.astype(o_rows.dtype), g.Tp)
    delta = jnp.sum(do_rows.astype(jnp.float32) * o_rows.astype(jnp.float32), axis=-1, keepdims=True)
    sp = _specs(g, e, H)
    R = g.block_q * N
    dq_rows = pl.pallas_call(
        functools.partial(_dense_dq_kernel, g=g, e=e, n_steps=n_steps),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, g.nq, n_steps),
            in_specs=[
                sp["rows_h"],
                sp["rows_h"],
                sp["rows_1"],
                sp["rows_1"],
                sp["qpos"],
                sp["rows_1"],
                sp["kv"],
                sp["kseg"],
                sp["ent"],
                sp["eseg"],
            ],
            out_specs=sp["rows_h"],
            scratch_shapes=[pltpu.VMEM((R, H), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(a["q_rows"].shape, a["q_rows"].dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(g, e, o_rows.dtype.itemsize, backward=True),
        interpret=interpret,
        name="dense_dq_tpu",
    )(a["off"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"], a["kv_p"], a["kseg"], a["ent"], a["eseg"])
    dkv = window_dkv(
        g, a["kv_p"], a["kseg"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"], interpret=interpret
    )
    Rd = g.block_q_dkv * N
    qmap = lambda b, eb, j, off: (b, e.q_block(eb, j, off[0]), 0)
    dent = pl.pallas_call(
        functools.partial(_dense_dent_kernel, scale=g.scale, e=e),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, e.Cp // e.block_e, e.nq_de),
            in_specs=[
                pl.BlockSpec((None, e.block_e, H), lambda b, eb, j, off: (b, eb, 0)),
                pl.BlockSpec((None, 2, e.block_e), lambda b, eb, j, off: (b, 0, eb)),
                pl.BlockSpec((None, Rd, H), qmap),
                pl.BlockSpec((None, Rd, H), qmap),
                pl.BlockSpec((None, Rd, 1), qmap),
                pl.BlockSpec((None, Rd, 1), qmap),
                pl.BlockSpec((Rd, 1), lambda b, eb, j, off: (e.q_block(eb, j, off[0]), 0)),
                pl.BlockSpec((None, Rd, 1), qmap),
            ],
            out_specs=pl.BlockSpec((None, e.block_e, H), lambda b, eb, j, off: (b, eb, 0)),
            scratch_shapes=[pltpu.VMEM((e.block_e, H), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(a["ent"].shape, entries.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(g, e, o_rows.dtype.itemsize, backward=True),
        interpret=interpret,
        name="dense_dentries_tpu",
    )(a["off"], a["ent"], a["eseg"], a["q_rows"], do_rows, lse, delta, a["qpos"], a["qseg"])
    dq = dq_rows.reshape(B, g.Tp, N, H)[:, :T]
    return dq, dkv[:, :T], dent[:, : e.C], sink_grad(sink, lse, delta, N)


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
    """Dense attention with Mosaic-TPU Pallas kernels; same contract as `reference.dense_attention`.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], entry_segment [B, C] int32, sink [N],
      segment_ids [B, T] int32, entry_end [B, C] int32, query_offset [] int32 -> [B, T, N, H].
    """
    # default: fits on chip at 64-128 heads of 512 (pallas_kernels/budgets.py)
    bs = block_sizes or budgets.attention_block_sizes(BlockSizes, "tpu", q.shape[2], q.shape[3])
    keys = entry_keys(entry_segment, entry_end, ratio)
    offset = query_offset_array(query_offset)
    return _dense(q, kv, entries, keys, offset, sink, segment_ids, ratio, window, bs, interpret)
