"""Dense attention: sliding window plus EVERY admissible compressed entry (no selection).

`dense_attention(q, kv, entries, entry_segment, sink, segment_ids, *, ratio, window=128, entry_end=None,
query_offset=0, impl=None)` serves
HCA layers (ratio 128), CSA's dense phase (ratio 4) and sliding-window layers (no entries: C = 0).
`dense_attention_and_entry_mass` (reference only) also returns the head-summed attention mass per entry, the
KL target of the lightning indexer's warm-up; `entry_mass_by_query_block` (reference only) reduces that mass
one query block at a time. Contract: docs/kernels.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention_base.common import check_attention_inputs, check_entry_end, query_offset_array
from pallas_kernels.dispatch import Impl, check_block_sizes, resolve_impl
from pallas_kernels.dense_attention import pallas_gpu, pallas_tpu, reference
from pallas_kernels.dense_attention.reference import dense_attention_and_entry_mass, entry_mass_by_query_block


def _check_entry_segment(entry_segment, entries):
    if entry_segment.shape != entries.shape[:2] or not jnp.issubdtype(entry_segment.dtype, jnp.integer):
        raise ValueError(
            f"entry_segment must be integer [B, C] = {entries.shape[:2]}, "
            f"got {entry_segment.dtype}{entry_segment.shape}"
        )


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
    impl: Impl = None,
    block_sizes: pallas_gpu.BlockSizes | pallas_tpu.BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """One softmax (with per-head sink) over the sliding window and every admissible compressed entry.

    Entry c is admissible for query row t iff entry_end[c] <= t + query_offset and entry_segment[c] ==
    segment_ids[t]. Runs on what it is given: under a mesh, call it per shard (the model's attention layer wraps
    it in `shard_map`); window positions and entry indices are local to the arrays passed, entry_end and
    query_offset are positions in the caller's frame (the whole sequence under context parallelism). Inputs are
    float (bfloat16 or float32); scores and softmax run in float32. See docs/kernels.md.

    Args:
      q: queries, already normed and rotated.
      kv: the shared key/value head, already rotated (the same vector is key and value).
      entries: compressed entries, one per slot (docs/packing.md: per-document windows).
      entry_segment: document of entry c; -1 = an empty slot (never visible).
      sink: per-head sink logit (adds exp(sink) to the softmax denominator only).
      segment_ids: document ids (0 = padding, treated as one more segment).
      ratio: compression ratio m (tokens per entry); any ratio >= 1.
      window: sliding-window length, counting the query itself.
      entry_end: position of the last token entry c pools; must be >= c * ratio (slots past
        (t + query_offset) // ratio are skipped for query row t). None = (c + 1) * ratio - 1, windows aligned
        to the row.
      query_offset: position of query row 0 (a Python int or an int32 scalar, may be traced; may be negative,
        e.g. for halo rows before a sequence's start). Default 0: rows are positions.
      impl: "reference", "pallas", "pallas_gpu", "pallas_tpu", or None (Pallas on GPU/TPU, reference on CPU).
      block_sizes: tile sizes of the chosen kernel module (its own `BlockSizes` class).
      interpret: run the Pallas kernel in interpret mode (required for Pallas on CPU).

    Returns:
      Attention output [B, T, N, H], dtype of q; differentiable w.r.t. q, kv, entries and sink.

    Shapes:
      q [B, T, N, H], kv [B, T, H], entries [B, C, H], entry_segment [B, C] int32, sink [N],
      segment_ids [B, T] int32, entry_end [B, C] int32, query_offset [] int32 -> [B, T, N, H].
    """
    check_attention_inputs(q, kv, entries, sink, segment_ids, window=window, ratio=ratio)
    _check_entry_segment(entry_segment, entries)
    check_entry_end(entry_end, entry_segment)
    query_offset_array(query_offset)
    which, interp = resolve_impl(impl, interpret)
    if which == "reference":
        return reference.dense_attention(q, kv, entries, entry_segment, sink, segment_ids, ratio=ratio, window=window,
                                         entry_end=entry_end, query_offset=query_offset)
    module = pallas_gpu if which == "pallas_gpu" else pallas_tpu
    return module.dense_attention(
        q, kv, entries, entry_segment, sink, segment_ids, ratio=ratio, window=window, entry_end=entry_end,
        query_offset=query_offset, block_sizes=check_block_sizes(module, block_sizes), interpret=interp,
    )


__all__ = ["dense_attention", "dense_attention_and_entry_mass", "entry_mass_by_query_block"]
