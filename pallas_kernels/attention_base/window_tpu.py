"""Mosaic-TPU-style sliding-window pieces shared by the dense and sparse attention kernels.

The block specs of the row-layout inputs and window keys, grid steps of one window key block (forward and dq),
the bodies of the forward and dq kernels around them (carries, sink, final write), and the key-major window dkv
kernel. Rows (token t, head n) -> t * N + n; see `common` for the layout and docs/kernels.md for the contract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention_base.common import (
    WindowGeometry,
    attention_cost,
    dot_nn,
    dot_nt,
    dot_tn,
    online_softmax_step,
    softmax_grads,
    window_block_mask,
)


def window_fwd_step(g: WindowGeometry, i, j, q_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref, m_sc, l_sc, acc_sc):
    """Grid step j < n_window_steps of a forward kernel: one window key block for query block i."""
    kb = g.first_kv(i) + j

    @pl.when((j < g.n_window_steps) & (kb <= g.last_kv(i)))
    def _():
        k = kv_ref[...]
        s = dot_nt(q_ref[...], k) * g.scale
        k_pos = kb * g.block_kv + lax.broadcasted_iota(jnp.int32, (1, g.block_kv), 1)
        mask = window_block_mask(qpos_ref[...], k_pos, qseg_ref[...], kseg_ref[...], g.window)
        m, l, acc = online_softmax_step(m_sc[...], l_sc[...], acc_sc[...], s, mask, k)
        m_sc[...] = m
        l_sc[...] = l
        acc_sc[...] = acc


def window_specs(g: WindowGeometry, H: int) -> dict[str, pl.BlockSpec]:
    """Block specs of the row-layout inputs and window keys in a forward or dq grid (b, query block i, step j).

    The index maps take any prefetched scalar refs after (b, i, j) and ignore them. "rows_h" / "rows_1": the
    [block_q * N, H] / [block_q * N, 1] block of a row array; "qpos"; "kv" / "kseg": window key block
    `g.kv_block(i, j)`; "sink": the sink rows (`common.sink_rows`).
    """
    R = g.block_q * g.N
    rows = lambda b, i, j, *_: (b, i, 0)
    return {
        "rows_h": pl.BlockSpec((None, R, H), rows),
        "rows_1": pl.BlockSpec((None, R, 1), rows),
        "qpos": pl.BlockSpec((R, 1), lambda b, i, j, *_: (i, 0)),
        "kv": pl.BlockSpec((None, g.block_kv, H), lambda b, i, j, *_: (b, g.kv_block(i, j), 0)),
        "kseg": pl.BlockSpec((None, 1, g.block_kv), lambda b, i, j, *_: (b, 0, g.kv_block(i, j))),
        "sink": pl.BlockSpec((R, 1), lambda b, i, j, *_: (0, 0)),
    }


def window_dq_step(
    g: WindowGeometry, i, j, q_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref, dq_sc
):
    """Grid step j < n_window_steps of a dq kernel: one window key block for query block i."""
    kb = g.first_kv(i) + j

    @pl.when((j < g.n_window_steps) & (kb <= g.last_kv(i)))
    def _():
        k = kv_ref[...]
        s = dot_nt(q_ref[...], k) * g.scale
        k_pos = kb * g.block_kv + lax.broadcasted_iota(jnp.int32, (1, g.block_kv), 1)
        mask = window_block_mask(qpos_ref[...], k_pos, qseg_ref[...], kseg_ref[...], g.window)
        _, ds = softmax_grads(s, mask, lse_ref[...], dot_nt(do_ref[...], k), delta_ref[...])
        dq_sc[...] += g.scale * dot_nn(ds.astype(k.dtype), k)


def fwd_kernel_body(
    g: WindowGeometry, i, j, n_steps: int, sink_ref, q_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref, o_ref, lse_ref,
    m_sc, l_sc, acc_sc, entry_when, entry_step: Callable[[], None]
) -> None:
    """Grid step j of a forward kernel for query block i: the window key blocks, then the kernel's entry steps.

    The carries (running max m, sum l, accumulator acc) start from the attention sink (m = sink, l = 1, acc = 0);
    steps j < g.n_window_steps add a window key block (`window_fwd_step`); `entry_step()` adds the kernel's own
    entries at the steps where `entry_when` holds (a later step); the last of the n_steps writes o and lse.
    """

    @pl.when(j == 0)
    def _():
        m_sc[...] = sink_ref[...]
        l_sc[...] = jnp.ones_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    window_fwd_step(g, i, j, q_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref, m_sc, l_sc, acc_sc)
    pl.when(entry_when)(entry_step)

    @pl.when(j == n_steps - 1)
    def _():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def dq_kernel_body(
    g: WindowGeometry, i, j, n_steps: int, q_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref,
    dq_ref, dq_sc, entry_when, entry_step: Callable[[], None]
) -> None:
    """Grid step j of a dq kernel for query block i: the window key blocks, then the kernel's entry steps.

    dq accumulates in dq_sc from zero: window key blocks at steps j < g.n_window_steps (`window_dq_step`), the
    kernel's own entries through `entry_step()` at the steps where `entry_when` holds; the last of the n_steps
    writes dq.
    """

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    window_dq_step(g, i, j, q_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, kv_ref, kseg_ref, dq_sc)
    pl.when(entry_when)(entry_step)

    @pl.when(j == n_steps - 1)
    def _():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _window_dkv_kernel(kv_ref, kseg_ref, q_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, dkv_ref, acc_sc, *, g):
    kb, j = pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(g.first_q(kb) + j <= g.last_q(kb))
    def _():
        k = kv_ref[...]
        q = q_ref[...]
        do = do_ref[...]
        s = dot_nt(q, k) * g.scale
        k_pos = kb * g.block_kv_dkv + lax.broadcasted_iota(jnp.int32, (1, g.block_kv_dkv), 1)
        mask = window_block_mask(qpos_ref[...], k_pos, qseg_ref[...], kseg_ref[...], g.window)
        p, ds = softmax_grads(s, mask, lse_ref[...], dot_nt(do, k), delta_ref[...])
        acc_sc[...] += g.scale * dot_tn(ds.astype(q.dtype), q) + dot_tn(p.astype(do.dtype), do)

    @pl.when(j == g.n_dkv_steps - 1)
    def _():
        dkv_ref[...] = acc_sc[...].astype(dkv_ref.dtype)


def window_dkv(g: WindowGeometry, kv_p, kseg, q_rows, do_rows, lse, delta, qpos, qseg, *, interpret: bool):
    """Gradient of the window keys/values (key-major, deterministic).

    Shapes:
      kv_p [B, Tp, H], kseg [B, 1, Tp], q_rows/do_rows [B, Tp*N, H], lse/delta [B, Tp*N, 1] f32,
      qpos [Tp*N, 1], qseg [B, Tp*N, 1] -> dkv [B, Tp, H] (dtype of kv).
    """
    B, Tp, H = kv_p.shape
    bk, R = g.block_kv_dkv, g.block_q_dkv * g.N
    qmap = lambda b, kb, j: (b, g.q_block_dkv(kb, j), 0)
    flops, trans, nbytes = attention_cost(
        batch=B,
        tokens=Tp,
        heads=g.N,
        head_dim=H,
        keys_per_query=g.window,
        itemsize=q_rows.dtype.itemsize,
        key_bytes=2 * kv_p.size * kv_p.dtype.itemsize,
        backward=True,
    )
    return pl.pallas_call(
        functools.partial(_window_dkv_kernel, g=g),
        grid=(B, Tp // bk, g.n_dkv_steps),
        in_specs=[
            pl.BlockSpec((None, bk, H), lambda b, kb, j: (b, kb, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, kb, j: (b, 0, kb)),
            pl.BlockSpec((None, R, H), qmap),
            pl.BlockSpec((None, R, H), qmap),
            pl.BlockSpec((None, R, 1), qmap),
            pl.BlockSpec((None, R, 1), qmap),
            pl.BlockSpec((R, 1), lambda b, kb, j: (g.q_block_dkv(kb, j), 0)),
            pl.BlockSpec((None, R, 1), qmap),
        ],
        out_specs=pl.BlockSpec((None, bk, H), lambda b, kb, j: (b, kb, 0)),
        out_shape=jax.ShapeDtypeStruct(kv_p.shape, kv_p.dtype),
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes),
        interpret=interpret,
        name="window_dkv_tpu",
    )(kv_p, kseg, q_rows, do_rows, lse, delta, qpos, qseg)
