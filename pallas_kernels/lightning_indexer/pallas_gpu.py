# Lightning indexer scoring, Pallas Triton style for NVIDIA GPUs (checked on CPU in interpret mode and
# by lowering to Triton IR for CUDA; not yet run on a GPU).
#
# Per (query, entry) pair: 2 * NI * HI FLOPs (q.k per head) + 3 * NI (relu, weight, sum). Flash/Pro
# (NI=64, HI=128): 16.6 KFLOP per pair; a query at position t scores (t + 1) / 4 entries, so a
# T-token sequence costs ~16.6e3 * T^2 / 8 FLOPs (T = 64K: 8.9 TFLOP per layer, ~9 ms at 989 TFLOP/s;
# T = 1M: 2.3 PFLOP).
# Bytes per 64 x 64 (query x entry) tile: k 2*64*HI = 16 KB + float32 scores 16 KB from/to HBM; the
# program's q rows (2*NI*64*HI = 1 MB) are re-read for every entry tile but stay in L2 (50 MB on H200).
# 68 MFLOP per tile -> ~2,000 FLOP/byte of HBM traffic: compute-bound (H200 ridge ~206 FLOP/byte).
# The top-k runs outside the kernel (lax.top_k per chunk of queries), reading the scores back once.
"""Lightning-indexer scores: Pallas kernel in the Triton style.

One program per (batch, query block of the chunk) loops over the admissible entry blocks and,
inside, over the NI heads: acc += w[:, h] * relu(q[h] k^T); the remaining entry blocks get -inf.
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
    NEG_INF,
    candidate_entries,
    dot_nt,
    entry_block_mask,
    query_offset_array,
)
from pallas_kernels.attention_base.window_gpu import check_pow2
from pallas_kernels.lightning_indexer.common import chunked_topk, indexer_layout, score_cost


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two).

    Attributes:
      block_q: queries per program.
      block_c: entries per loop step.
      chunk_q: queries per top-k chunk (peak memory B * chunk_q * C * 4 bytes); a multiple of block_q.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_q: int = 64
    block_c: int = 64
    chunk_q: int = 512
    num_warps: int = 4
    num_stages: int = 2


def _score_kernel(
    first_ref,
    q_ref,
    w_ref,
    qseg_ref,
    k_ref,
    eseg_ref,
    o_ref,
    *,
    ratio: int,
    block_q: int,
    block_c: int,
    n_heads: int,
    n_blocks: int,
):
    b, i = pl.program_id(0), pl.program_id(1)
    local = i * block_q
    t0 = first_ref[0] + local
    rows = pl.ds(local, block_q)
    t = t0 + jnp.arange(block_q, dtype=jnp.int32)[:, None]
    q_seg = qseg_ref[b, rows, :]
    last_t = t0 + block_q - 1  # absolute position (first_ref: the chunk's first query, offset included)
    n_adm = jnp.where(last_t < 0, 0, candidate_entries(jnp.maximum(last_t, 0), ratio))
    n_live = jnp.minimum(lax.div(n_adm + block_c - 1, block_c), n_blocks)

    def scored(cb, carry):
        c0 = cb * block_c
        k = k_ref[b, pl.ds(c0, block_c), :]

        def head(h, acc):
            return acc + w_ref[b, h, rows, :] * jnp.maximum(dot_nt(q_ref[b, h, rows, :], k), 0.0)

        acc = lax.fori_loop(0, n_heads, head, jnp.zeros((block_q, block_c), jnp.float32))
        cols = pl.ds(c0, block_c)
        mask = entry_block_mask(t, q_seg, eseg_ref[b, pl.ds(0, 1), cols], eseg_ref[b, pl.ds(1, 1), cols])
        o_ref[b, rows, pl.ds(c0, block_c)] = jnp.where(mask, acc, NEG_INF)
        return carry

    def skipped(cb, carry):
        o_ref[b, rows, pl.ds(cb * block_c, block_c)] = jnp.full((block_q, block_c), NEG_INF, jnp.float32)
        return carry

    lax.fori_loop(0, n_live, scored, 0)
    lax.fori_loop(n_live, n_blocks, skipped, 0)


def _score_chunk(first, q, w, qseg, k, eseg, *, ratio, bs: BlockSizes, interpret):
    B, NI, Tc, HI = q.shape
    Cp = k.shape[1]
    flops, nbytes = score_cost(B, Tc, Cp, NI, HI, q.dtype.itemsize)
    return pl.pallas_call(
        functools.partial(
            _score_kernel, ratio=ratio, block_q=bs.block_q, block_c=bs.block_c, n_heads=NI, n_blocks=Cp // bs.block_c
        ),
        grid=(B, Tc // bs.block_q),
        out_shape=jax.ShapeDtypeStruct((B, Tc, Cp), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
        interpret=interpret,
        name="indexer_scores_gpu",
    )(first[None], q, w, qseg, k, eseg)


def lightning_indexer(
    q_idx: jax.Array,
    k_idx: jax.Array,
    weights: jax.Array,
    entry_segment: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    topk: int,
    entry_end: jax.Array | None = None,
    query_offset: int | jax.Array = 0,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Top-k admissible entries per query (Triton scoring kernel); contract of `reference.lightning_indexer`.

    Shapes:
      q_idx [B, T, NI, HI], k_idx [B, C, HI], weights [B, T, NI], entry_segment [B, C],
      segment_ids [B, T] -> [B, T, min(topk, C)] int32.
    """
    bs = block_sizes or BlockSizes()
    B, T = segment_ids.shape
    C = k_idx.shape[1]
    K = min(topk, C)
    if K == 0:
        return jnp.zeros((B, T, 0), jnp.int32)
    check_pow2(NI=q_idx.shape[2], HI=q_idx.shape[3], block_q=bs.block_q, block_c=bs.block_c)
    if bs.chunk_q % bs.block_q:
        raise ValueError(f"chunk_q ({bs.chunk_q}) must be a multiple of block_q ({bs.block_q})")
    a = indexer_layout(q_idx, k_idx, weights, entry_segment, entry_end, segment_ids, ratio=ratio, chunk_q=bs.chunk_q,
                       block_c=bs.block_c)
    score = functools.partial(_score_chunk, ratio=ratio, bs=bs, interpret=interpret)
    return chunked_topk(score, a, T=T, C=C, K=K, chunk_q=bs.chunk_q, query_offset=query_offset_array(query_offset))
