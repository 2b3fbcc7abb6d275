"""Sparse attention: sliding window plus the top-k selected compressed entries (CSA layers' sparse phase).

`sparse_attention(q, kv, entries, topk_idx, sink, segment_ids, *, window=128, impl=None)`; the pure-JAX
spec is `reference.sparse_attention`, the kernels are `pallas_gpu` (Triton) and `pallas_tpu` (Mosaic TPU).
The selection `topk_idx` comes from `pallas_kernels.lightning_indexer`. Contract: docs/kernels.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention_base.common import check_attention_inputs
from pallas_kernels.dispatch import Impl, check_block_sizes, resolve_impl
from pallas_kernels.sparse_attention import pallas_gpu, pallas_tpu, reference


def sparse_attention(
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

    Runs on what it is given: under a mesh, call it per shard (the model's attention layer wraps it in
    `shard_map`); positions, windows and entry indices are local to the arrays passed. Inputs are float
    (bfloat16 or float32); scores and softmax run in float32. See docs/kernels.md.

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
        return reference.sparse_attention(q, kv, entries, topk_idx, sink, segment_ids, window=window)
    module = pallas_gpu if which == "pallas_gpu" else pallas_tpu
    return module.sparse_attention(
        q, kv, entries, topk_idx, sink, segment_ids, window=window,
        block_sizes=check_block_sizes(module, block_sizes), interpret=interp,
    )


def sparse_attention_and_selected_mass(
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
) -> tuple[jax.Array, jax.Array]:
    """`sparse_attention` and the head-summed probability mass on each selected entry, [B, T, K] float32.

    The output (values and gradients) comes from the chosen implementation; the mass from the reference's
    block-by-block pass over the gathered entries (with the reference implementation both come from one
    pass; with a Pallas kernel it is a forward-only pass beside it, without gradient: docs/kernels.md says
    why the kernels do not return it). The mass is the indexer's selected-set KL target: the caller stops its
    gradient. Linear memory.
    """
    which, _ = resolve_impl(impl, interpret)
    if which == "reference":
        check_attention_inputs(q, kv, entries, sink, segment_ids, window=window)
        return reference.sparse_attention_and_selected_mass(q, kv, entries, topk_idx, sink, segment_ids, window=window)
    out = sparse_attention(q, kv, entries, topk_idx, sink, segment_ids, window=window, impl=impl,
                           block_sizes=block_sizes, interpret=interpret)
    _, mass = reference.sparse_attention_and_selected_mass(
        *(jax.lax.stop_gradient(a) for a in (q, kv, entries)), topk_idx, jax.lax.stop_gradient(sink), segment_ids,
        window=window,
    )
    return out, mass


def selected_entry_mass(
    q: jax.Array,
    kv: jax.Array,
    entries: jax.Array,
    topk_idx: jax.Array,
    sink: jax.Array,
    segment_ids: jax.Array,
    *,
    window: int = 128,
) -> jax.Array:
    """The head-summed probability mass on each selected entry, [B, T, K] float32, without gradient.

    Pure JAX (the reference's block-by-block forward pass over the gathered entries, its output unused): call it on
    global arrays and XLA partitions it, heads included (the sum over heads is then a cross-shard reduction, which
    a per-shard kernel call would miss). Linear memory.
    """
    check_attention_inputs(q, kv, entries, sink, segment_ids, window=window)
    args = (jax.lax.stop_gradient(a) for a in (q, kv, entries))
    return reference.sparse_attention_and_selected_mass(*args, topk_idx, jax.lax.stop_gradient(sink), segment_ids,
                                                        window=window)[1]


__all__ = ["selected_entry_mass", "sparse_attention", "sparse_attention_and_selected_mass"]
