# CSA attention, Pallas Triton style for NVIDIA GPUs (checked on CPU in interpret mode and by lowering to
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
"""CSA attention: Pallas kernels in the Triton style (one program per query block, loops over keys).

Layout: queries become rows (token t, head n) -> t * N + n. A program owns block_q tokens (all N
heads, so rows = block_q * N >= 16 for the tensor cores) and loops over
* its window keys in blocks of block_kv (contiguous loads), then
* its tokens' selected entries in chunks of block_k slots, gathered with one vector load per chunk
  (a chunk belongs to one token; rows of the other tokens are masked).
Backward: the dq program recomputes the same loops and scatters the entry gradient with atomic adds;
the window dkv program loops over the queries that see its key block (shared with HCA).
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

from pallas_kernels.csa_attention.common import (
    WindowGeometry,
    attention_cost,
    dot_nn,
    dot_nt,
    dot_tn,
    key_segments,
    online_softmax_step,
    pad_axis,
    round_up,
    row_positions,
    row_segments,
    sink_grad,
    sink_rows,
    softmax_grads,
    to_rows,
    window_block_mask,
)


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


# ----------------------------------------------------------------------------------------------
# Window pieces, shared with HCA.


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


# ----------------------------------------------------------------------------------------------
# CSA forward and dq.


def _selected(b, t0, jc, block_k, Kp, idx_ref, ent_ref):
    """Chunk jc of the program's flattened slots: (local token, idx [block_k], gathered rows [block_k, H])."""
    idx = idx_ref[b, pl.ds(t0 * Kp + jc * block_k, block_k)]
    return (jc * block_k) // Kp, idx, ent_ref[b, jnp.maximum(idx, 0), :]


def _csa_fwd_kernel(
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


def _csa_dq_kernel(
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
        "q_rows": to_rows(q, Ta),
        "qpos": row_positions(Ta, N),
        "qseg": row_segments(segment_ids, N, Ta),
        "kv_p": pad_axis(kv, 1, Ta),
        "kseg": key_segments(segment_ids, Ta),
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
        functools.partial(_csa_fwd_kernel, g=g, Kp=Kp, block_k=bs.block_k),
        grid=(B, g.nq),
        out_shape=[jax.ShapeDtypeStruct(a["q_rows"].shape, q.dtype), jax.ShapeDtypeStruct((B, Ta * N, 1), jnp.float32)],
        compiler_params=compiler_params(bs),
        cost_estimate=_cost(g, Kp, q.dtype.itemsize, backward=False),
        interpret=interpret,
        name="csa_fwd_gpu",
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
        functools.partial(_csa_dq_kernel, g=g, Kp=Kp, block_k=bs.block_k, C=C),
        grid=(B, g.nq),
        out_shape=[
            jax.ShapeDtypeStruct(a["q_rows"].shape, a["q_rows"].dtype),
            jax.ShapeDtypeStruct((B, C + 1, H), jnp.float32),
        ],
        input_output_aliases={10: 1},
        compiler_params=compiler_params(bs),
        cost_estimate=_cost(g, Kp, o_rows.dtype.itemsize, backward=True),
        interpret=interpret,
        name="csa_dq_gpu",
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _csa(q, kv, entries, topk_idx, sink, segment_ids, window, bs, interpret):
    return _forward(q, kv, entries, topk_idx, sink, segment_ids, window, bs, interpret)[0]


def _csa_fwd(q, kv, entries, topk_idx, sink, segment_ids, window, bs, interpret):
    return _forward(q, kv, entries, topk_idx, sink, segment_ids, window, bs, interpret)


def _csa_bwd(window, bs, interpret, res, d_out):
    dq, dkv, dent, dsink = _backward(window, bs, interpret, res, d_out)
    return dq, dkv, dent, None, dsink, None


_csa.defvjp(_csa_fwd, _csa_bwd)


def csa_attention(
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
    """CSA attention with Triton-style Pallas kernels; same contract as `reference.csa_attention`.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], topk_idx [B, T, K] int32, sink [N],
      segment_ids [B, T] int32 -> [B, T, N, H].
    """
    return _csa(q, kv, entries, topk_idx, sink, segment_ids, window, block_sizes or BlockSizes(), interpret)
