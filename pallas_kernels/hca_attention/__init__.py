"""Heavily compressed attention (HCA): sliding window plus every admissible compressed entry.

`hca_attention(q, kv, entries, entry_segment, sink, segment_ids, *, ratio, window=128, impl=None)` also
serves CSA's dense phase (ratio 4). `hca_attention_and_entry_mass` (reference only) also returns the
head-summed attention mass per entry, the KL target of the lightning indexer's warm-up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.csa_attention.common import (
    ENTRY_AXES,
    ENTRY_SEG_AXES,
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
from pallas_kernels.hca_attention import pallas_gpu, pallas_tpu, reference
from pallas_kernels.hca_attention.reference import hca_attention_and_entry_mass


def _check_entry_segment(entry_segment, entries):
    if entry_segment.shape != entries.shape[:2] or not jnp.issubdtype(entry_segment.dtype, jnp.integer):
        raise ValueError(
            f"entry_segment must be integer [B, C] = {entries.shape[:2]}, "
            f"got {entry_segment.dtype}{entry_segment.shape}"
        )


def hca_attention(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    entry_segment: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    ratio: int,
    window: int = 128,
    impl: Impl = None,
    block_sizes: pallas_gpu.BlockSizes | pallas_tpu.BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """One softmax (with per-head sink) over the sliding window and every admissible compressed entry.

    Entry c is admissible for query t iff (c + 1) * ratio - 1 <= t and entry_segment[c] == segment_ids[t].

    Args:
      q: queries, already normed and rotated.
      kv: the shared key/value head, already rotated (the same vector is key and value).
      entries: compressed entries; entry c pools tokens c*ratio .. c*ratio + ratio - 1.
      entry_segment: segment of entry c if its whole window lies in one segment, else -1.
      sink: per-head sink logit (adds exp(sink) to the softmax denominator only).
      segment_ids: document ids (0 = padding, treated as one more segment).
      ratio: compression ratio m (tokens per entry); any ratio >= 1.
      window: sliding-window length, counting the query itself.
      impl: "reference", "pallas", "pallas_gpu", "pallas_tpu", or None (Pallas on GPU/TPU, reference on CPU).
      block_sizes: tile sizes of the chosen kernel module (its own `BlockSizes` class).
      interpret: run the Pallas kernel in interpret mode (required for Pallas on CPU).

    Returns:
      Attention output [B, T, N, H], dtype of q; differentiable w.r.t. q, kv, entries and sink.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], entry_segment [B, C] int32, sink [N],
      segment_ids [B, T] int32 -> [B, T, N, H].
    """
    check_attention_inputs(q, kv, entries, sink, segment_ids, window=window, ratio=ratio)
    _check_entry_segment(entry_segment, entries)
    which, interp = resolve_impl(impl, interpret)
    if which == "reference":
        return reference.hca_attention(q, kv, entries, entry_segment, sink, segment_ids, ratio=ratio, window=window)
    module = pallas_gpu if which == "pallas_gpu" else pallas_tpu
    kernel = functools.partial(
        module.hca_attention,
        ratio=ratio,
        window=window,
        block_sizes=pick_block_sizes(module, block_sizes),
        interpret=interp,
    )
    args = (q, kv, entries, entry_segment, sink, segment_ids)
    axes = (Q_AXES, KV_AXES, ENTRY_AXES, ENTRY_SEG_AXES, SINK_AXES, TOKEN_AXES)
    return shard_over_mesh(kernel, args, axes, Q_AXES, q.shape)


__all__ = ["hca_attention", "hca_attention_and_entry_mass"]
