"""The chunked top-k driver shared by the lightning-indexer kernels of both backends.

Queries are processed in chunks of `chunk_q`: a Pallas kernel scores one chunk against all C
entries ([B, chunk_q, Cp] float32, -inf where not admissible) and `lax.top_k` keeps the best K.
Peak memory is B * chunk_q * Cp * 4 bytes; the full [T, C] score matrix never exists.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention_base.common import NEG_INF, PAD_SEGMENT, entry_keys, pad_axis, pad_entry_keys, round_up


def indexer_layout(q_idx, k_idx, weights, entry_segment, entry_end, segment_ids, *, ratio: int, chunk_q: int,
                   block_c: int):
    """Pads and transposes the indexer inputs for the score kernels.

    The constant factors NI**-0.5 * HI**-0.5 are folded into the (float32) weights: relu(a x) = a relu(x).

    Shapes:
      q_idx [B, T, NI, HI] -> q [B, NI, Tp, HI]; weights [B, T, NI] -> w [B, NI, Tp, 1] float32;
      segment_ids [B, T] -> qseg [B, Tp, 1]; k_idx [B, C, HI] -> k [B, Cp, HI];
      entry_segment, entry_end [B, C] -> eseg [B, 2, Cp] (row 0 segment, padding -1; row 1 entry_end).
      Tp = multiple of chunk_q, Cp of block_c.
    """
    _, T, NI, HI = q_idx.shape
    C = k_idx.shape[1]
    Tp = round_up(T, chunk_q)
    Cp = round_up(max(C, 1), block_c)
    w = pad_axis(weights, 1, Tp).astype(jnp.float32) * (NI**-0.5 * HI**-0.5)
    return {
        "q": pad_axis(q_idx, 1, Tp).transpose(0, 2, 1, 3),
        "w": w.transpose(0, 2, 1)[..., None],
        "qseg": pad_axis(segment_ids.astype(jnp.int32), 1, Tp, PAD_SEGMENT)[..., None],
        "k": pad_axis(k_idx, 1, Cp),
        "eseg": pad_entry_keys(entry_keys(entry_segment, entry_end, ratio), Cp),
    }


def chunked_topk(score_chunk: Callable, a: dict, *, T: int, C: int, K: int, chunk_q: int,
                 query_offset: jax.Array) -> jax.Array:
    """Runs `score_chunk(first, q, w, qseg, k, eseg) -> [B, chunk_q, Cp]` per chunk and keeps the top K.

    `first` is the absolute position of the chunk's first query (its row plus `query_offset`, int32 scalar),
    the frame of the entries' `entry_end`.

    Returns topk_idx [B, T, K] int32, best first, -1 where the score is -inf.
    """
    B, _, Tp, _ = a["q"].shape

    def one_chunk(start):
        q = lax.dynamic_slice_in_dim(a["q"], start, chunk_q, axis=2)
        w = lax.dynamic_slice_in_dim(a["w"], start, chunk_q, axis=2)
        qseg = lax.dynamic_slice_in_dim(a["qseg"], start, chunk_q, axis=1)
        scores = score_chunk(start + query_offset, q, w, qseg, a["k"], a["eseg"])[..., :C]
        values, idx = lax.top_k(scores, K)
        return jnp.where(values == NEG_INF, -1, idx).astype(jnp.int32)

    idx = lax.map(one_chunk, jnp.arange(0, Tp, chunk_q, dtype=jnp.int32))
    return idx.swapaxes(0, 1).reshape(B, Tp, K)[:, :T]


def score_cost(B: int, Tc: int, Cp: int, NI: int, HI: int, itemsize: int) -> tuple[int, int]:
    """(flops, bytes) of scoring Tc queries against Cp entries (causal skipping ignored)."""
    flops = 2 * B * Tc * Cp * NI * HI + 3 * B * Tc * Cp * NI
    nbytes = B * (NI * Tc * HI * itemsize + NI * Tc * 4 + Cp * HI * itemsize + Tc * Cp * 4)
    return flops, nbytes
