"""Triton-style pieces shared by the attention kernels: power-of-two checks, row loads, sliding-window loops.

Used by the dense and sparse attention kernels (window forward/dq loops and the window dkv program) and by
the lightning indexer (`check_pow2`). Rows (token t, head n) -> t * N + n; see `common` for the layout and
docs/kernels.md for the contract.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

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


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def auto_block_q(n_heads: int) -> int:
    """Smallest power-of-two token count whose rows (tokens * heads) fill a 16-row MMA tile."""
    b = 1
    while b * n_heads < 16:
        b *= 2
    return b


def check_pow2(**sizes: int) -> None:
    bad = {k: v for k, v in sizes.items() if not _pow2(v)}
    if bad:
        raise ValueError(f"the Triton kernels need power-of-two sizes, got {bad}")


@dataclasses.dataclass(frozen=True)
class _ResolvedBlocks:
    block_q: int
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int


def window_geometry(B, T, N, H, window, bs) -> tuple[WindowGeometry, int]:
    """Geometry plus Ta, the allocated token length (Tp plus a tail that unaligned loads may touch)."""
    block_q = bs.block_q or auto_block_q(N)
    rb = _ResolvedBlocks(block_q, bs.block_kv, bs.block_q_dkv or block_q, bs.block_kv_dkv)
    check_pow2(
        N=N, H=H, block_q=rb.block_q, block_kv=rb.block_kv, block_q_dkv=rb.block_q_dkv, block_kv_dkv=rb.block_kv_dkv
    )
    g = WindowGeometry.make(B, T, N, H, window, rb)
    return g, g.Tp + max(rb.block_kv, rb.block_q_dkv)


def compiler_params(bs) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def query_rows(g: WindowGeometry, b, t0, n_tokens, q_ref, qpos_ref, qseg_ref):
    """Loads the rows of tokens t0 .. t0 + n_tokens - 1: (q [R, H], positions [R, 1], segments [R, 1])."""
    rows = pl.ds(t0 * g.N, n_tokens * g.N)
    return q_ref[b, rows, :], qpos_ref[rows, :], qseg_ref[b, rows, :]


def _window_range(g: WindowGeometry, t0):
    """First key and number of block_kv steps covering the windows of tokens t0 .. t0 + block_q - 1."""
    s0 = jnp.maximum(t0 - g.window + 1, 0)
    return s0, lax.div(t0 + g.block_q - s0 + g.block_kv - 1, g.block_kv)


def _window_keys(g: WindowGeometry, b, s, kv_ref, kseg_ref):
    k = kv_ref[b, pl.ds(s, g.block_kv), :]
    k_seg = kseg_ref[b, :, pl.ds(s, g.block_kv)]
    k_pos = s + jnp.arange(g.block_kv, dtype=jnp.int32)[None, :]
    return k, k_seg, k_pos


def window_fwd_loop(g: WindowGeometry, b, t0, q, t, q_seg, kv_ref, kseg_ref, carry):
    """Online-softmax carry (m, l, acc) after all window keys of tokens t0 .. t0 + block_q - 1."""
    s0, n = _window_range(g, t0)

    def body(jj, c):
        k, k_seg, k_pos = _window_keys(g, b, s0 + jj * g.block_kv, kv_ref, kseg_ref)
        mask = window_block_mask(t, k_pos, q_seg, k_seg, g.window)
        return online_softmax_step(*c, dot_nt(q, k) * g.scale, mask, k)

    return lax.fori_loop(0, n, body, carry)


def window_dq_loop(g: WindowGeometry, b, t0, q, do, lse, delta, t, q_seg, kv_ref, kseg_ref, dq):
    """dq [R, H] float32 plus the window keys' contribution."""
    s0, n = _window_range(g, t0)

    def body(jj, acc):
        k, k_seg, k_pos = _window_keys(g, b, s0 + jj * g.block_kv, kv_ref, kseg_ref)
        mask = window_block_mask(t, k_pos, q_seg, k_seg, g.window)
        _, ds = softmax_grads(dot_nt(q, k) * g.scale, mask, lse, dot_nt(do, k), delta)
        return acc + g.scale * dot_nn(ds.astype(k.dtype), k)

    return lax.fori_loop(0, n, body, dq)


def _window_dkv_kernel(kv_ref, kseg_ref, q_ref, do_ref, lse_ref, delta_ref, qpos_ref, qseg_ref, dkv_ref, *, g):
    b, kb = pl.program_id(0), pl.program_id(1)
    bk, bq = g.block_kv_dkv, g.block_q_dkv
    k0 = kb * bk
    k = kv_ref[b, pl.ds(k0, bk), :]
    k_seg = kseg_ref[b, :, pl.ds(k0, bk)]
    k_pos = k0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
    last_t = jnp.minimum(k0 + bk - 1 + g.window - 1, g.Tp - 1)
    n = lax.div(last_t - k0 + bq, bq)

    def body(jj, acc):
        t0 = k0 + jj * bq
        rows = pl.ds(t0 * g.N, bq * g.N)
        q, do = q_ref[b, rows, :], do_ref[b, rows, :]
        mask = window_block_mask(qpos_ref[rows, :], k_pos, qseg_ref[b, rows, :], k_seg, g.window)
        p, ds = softmax_grads(dot_nt(q, k) * g.scale, mask, lse_ref[b, rows, :], dot_nt(do, k), delta_ref[b, rows, :])
        return acc + g.scale * dot_tn(ds.astype(q.dtype), q) + dot_tn(p.astype(do.dtype), do)

    acc = lax.fori_loop(0, n, body, jnp.zeros((bk, g.H), jnp.float32))
    dkv_ref[b, pl.ds(k0, bk), :] = acc.astype(dkv_ref.dtype)


def window_dkv(g: WindowGeometry, bs, kv_p, kseg, q_rows, do_rows, lse, delta, qpos, qseg, *, interpret: bool):
    """Gradient of the window keys/values, one program per key block (deterministic).

    Shapes:
      kv_p [B, Ta, H], kseg [B, 1, Ta], q_rows/do_rows [B, Ta*N, H], lse/delta [B, Ta*N, 1],
      qpos [Ta*N, 1], qseg [B, Ta*N, 1] -> dkv [B, Ta, H] (rows >= Tp are not written).
    """
    B, _, H = kv_p.shape
    flops, trans, nbytes = attention_cost(
        batch=B,
        tokens=g.Tp,
        heads=g.N,
        head_dim=H,
        keys_per_query=g.window,
        itemsize=q_rows.dtype.itemsize,
        key_bytes=2 * kv_p.size * kv_p.dtype.itemsize,
        backward=True,
    )
    return pl.pallas_call(
        functools.partial(_window_dkv_kernel, g=g),
        grid=(B, g.Tp // g.block_kv_dkv),
        out_shape=jax.ShapeDtypeStruct(kv_p.shape, kv_p.dtype),
        compiler_params=compiler_params(bs),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=trans, bytes_accessed=nbytes),
        interpret=interpret,
        name="window_dkv_gpu",
    )(kv_p, kseg, q_rows, do_rows, lse, delta, qpos, qseg)
