# Lightning indexer scoring, Pallas Mosaic-TPU style (checked on CPU in interpret mode only).
#
# Per (query, entry) pair: 2 * NI * HI FLOPs (q.k per head) + 3 * NI (relu, weight, sum). Flash/Pro
# (NI=64, HI=128): 16.6 KFLOP per pair; a query at position t scores (t + 1) / 4 entries, so a
# T-token sequence costs ~16.6e3 * T^2 / 8 FLOPs (T = 64K: 8.9 TFLOP per layer, ~9 ms at 989 TFLOP/s;
# T = 1M: 2.3 PFLOP).
# Bytes per 128 x 512 (query x entry) tile: k 2*512*HI = 131 KB + float32 scores 4*128*512 = 262 KB; the
# q block (2*NI*128*HI = 2.1 MB) stays resident across the entry tiles of its query block. 1.09 GFLOP
# per tile -> ~2,800 FLOP/byte: compute-bound (H200 ridge ~206 FLOP/byte at 989 TFLOP/s, 4.8 TB/s).
# The top-k runs outside the kernel (lax.top_k per chunk of queries), reading the scores back once.
"""Lightning-indexer scores: Pallas kernel in the Mosaic-TPU style.

Grid (B, query blocks of the chunk, entry blocks); each step loops over the NI heads:
acc += w[:, h] * relu(q[h] k^T). Entry blocks with no admissible entry for the block's last query
are filled with -inf without computing (causal skipping, about half the pairs).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention_base.common import NEG_INF, dot_nt, entry_block_mask, query_offset_array
from pallas_kernels.lightning_indexer.common import chunked_topk, indexer_layout, score_cost


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (on a real TPU keep them multiples of 8 and 128 as Mosaic requires).

    Attributes:
      block_q: queries per tile.
      block_c: entries per tile.
      chunk_q: queries per top-k chunk (peak memory B * chunk_q * C * 4 bytes); a multiple of block_q.
    """

    block_q: int = 128
    block_c: int = 512
    chunk_q: int = 512


def _score_kernel(
    first_ref, q_ref, w_ref, qseg_ref, k_ref, eseg_ref, o_ref, *, ratio: int, block_q: int, block_c: int, n_heads: int
):
    i, c = pl.program_id(1), pl.program_id(2)
    t0 = first_ref[0] + i * block_q  # absolute position: first_ref holds the chunk's first query, offset included
    any_admissible = c * block_c * ratio <= t0 + block_q - 1  # entry_end[c] >= c * ratio

    @pl.when(any_admissible)
    def _():
        k = k_ref[...]

        def head(h, acc):
            return acc + w_ref[h] * jnp.maximum(dot_nt(q_ref[h], k), 0.0)

        acc = lax.fori_loop(0, n_heads, head, jnp.zeros((block_q, block_c), jnp.float32))
        t = t0 + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        mask = entry_block_mask(t, qseg_ref[...], eseg_ref[0:1, :], eseg_ref[1:2, :])
        o_ref[...] = jnp.where(mask, acc, NEG_INF)

    @pl.when(jnp.logical_not(any_admissible))
    def _():
        o_ref[...] = jnp.full(o_ref.shape, NEG_INF, jnp.float32)


def _score_chunk(first, q, w, qseg, k, eseg, *, ratio, bs: BlockSizes, interpret):
    B, NI, Tc, HI = q.shape
    Cp = k.shape[1]
    bq, bc = bs.block_q, bs.block_c
    flops, nbytes = score_cost(B, Tc, Cp, NI, HI, q.dtype.itemsize)
    return pl.pallas_call(
        functools.partial(_score_kernel, ratio=ratio, block_q=bq, block_c=bc, n_heads=NI),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(B, Tc // bq, Cp // bc),
            in_specs=[
                pl.BlockSpec((None, NI, bq, HI), lambda b, i, c, s: (b, 0, i, 0)),
                pl.BlockSpec((None, NI, bq, 1), lambda b, i, c, s: (b, 0, i, 0)),
                pl.BlockSpec((None, bq, 1), lambda b, i, c, s: (b, i, 0)),
                pl.BlockSpec((None, bc, HI), lambda b, i, c, s: (b, c, 0)),
                pl.BlockSpec((None, 2, bc), lambda b, i, c, s: (b, 0, c)),
            ],
            out_specs=pl.BlockSpec((None, bq, bc), lambda b, i, c, s: (b, i, c)),
        ),
        out_shape=jax.ShapeDtypeStruct((B, Tc, Cp), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
        interpret=interpret,
        name="indexer_scores_tpu",
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
    """Top-k admissible entries per query (Mosaic-TPU scoring kernel); contract of `reference.lightning_indexer`.

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
    if bs.chunk_q % bs.block_q:
        raise ValueError(f"chunk_q ({bs.chunk_q}) must be a multiple of block_q ({bs.block_q})")
    a = indexer_layout(q_idx, k_idx, weights, entry_segment, entry_end, segment_ids, ratio=ratio, chunk_q=bs.chunk_q,
                       block_c=bs.block_c)
    score = functools.partial(_score_chunk, ratio=ratio, bs=bs, interpret=interpret)
    return chunked_topk(score, a, T=T, C=C, K=K, chunk_q=bs.chunk_q, query_offset=query_offset_array(query_offset))
