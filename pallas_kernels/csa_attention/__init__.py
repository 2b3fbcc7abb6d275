"""Compressed sparse attention (CSA): sliding window plus the lightning indexer's top-k compressed entries.

`csa_attention(q, kv, entries, topk_idx, sink, segment_ids, *, window=128, impl=None)`; the pure-JAX
spec is `reference.csa_attention`, the kernels are `pallas_gpu` (Triton) and `pallas_tpu` (Mosaic TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.csa_attention import pallas_gpu, pallas_tpu, reference
from pallas_kernels.csa_attention.common import (
    ENTRY_AXES,
    KV_AXES,
    Q_AXES,
    SINK_AXES,
    TOKEN_AXES,
    Impl,
    check_attention_inputs,
    pick_block_sizes,
    resolve_impl,
    shard_over_mesh,
)


def csa_attention(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    topk_idx: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int = 128,
    impl: Impl = None,
    block_sizes: pallas_gpu.BlockSizes | pallas_tpu.BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """One softmax (with per-head sink) over the sliding window and the selected compressed entries.

    Args:
      q: queries, already normed and rotated.
      kv: the shared key/value head, already rotated (the same vector is key and value).
      entries: compressed entries (entry c pools tokens c*m .. c*m + m - 1).
      topk_idx: selected entries per query, -1 = empty slot; non-negative indices must be admissible
        for their query and distinct within a query (the lightning indexer guarantees both).
      sink: per-head sink logit (adds exp(sink) to the softmax denominator only).
      segment_ids: document ids (0 = padding, treated as one more segment).
      window: sliding-window length, counting the query itself.
      impl: "reference", "pallas" (this platform's kernel), "pallas_gpu", "pallas_tpu", or None (Pallas on
        GPU/TPU, the reference on CPU). A request that cannot run raises ValueError.
      block_sizes: tile sizes of the chosen kernel module (its own `BlockSizes` class).
      interpret: run the Pallas kernel in interpret mode (required for Pallas on CPU).

    Returns:
      Attention output [B, T, N, H], dtype of q; differentiable w.r.t. q, kv, entries and sink.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], topk_idx [B, T, K] int32, sink [N],
      segment_ids [B, T] int32 -> [B, T, N, H].
    """
    check_attention_inputs(q, kv, entries, sink, segment_ids, window=window)
    if topk_idx.ndim != 3 or topk_idx.shape[:2] != q.shape[:2] or not jnp.issubdtype(topk_idx.dtype, jnp.integer):
        raise ValueError(
            f"topk_idx must be integer [B, T, K] with [B, T] = {q.shape[:2]}, got {topk_idx.dtype}{topk_idx.shape}"
        )
    which, interp = resolve_impl(impl, interpret)
    if which == "reference":
        return reference.csa_attention(q, kv, entries, topk_idx, sink, segment_ids, window=window)
    module = pallas_gpu if which == "pallas_gpu" else pallas_tpu
    kernel = functools.partial(
        module.csa_attention, window=window, block_sizes=pick_block_sizes(module, block_sizes), interpret=interp
    )
    args = (q, kv, entries, topk_idx, sink, segment_ids)
    axes = (Q_AXES, KV_AXES, ENTRY_AXES, TOKEN_AXES + (None,), SINK_AXES, TOKEN_AXES)
    return shard_over_mesh(kernel, args, axes, Q_AXES, q.shape)


__all__ = ["csa_attention"]
