"""Context parallelism: the load-balanced sequence layout over the `context` mesh axis, and its halo exchange.

With `context` = N > 1 the sequence of every row is cut into 2N chunks of Tc = T / (2N) tokens; rank r holds
chunks r and 2N-1-r (in that order), so every rank holds the same share of causal attention work (a chunk near
the start attends to little, its partner near the end to much). The layout is one permutation of the sequence
axis, applied once to the integer inputs (tokens, segment ids, positions, targets and loss weights) before the
model runs; everything per token then runs on the permuted arrays split evenly over `context`, and only the
operations that look along the sequence (attention windows, compression windows, the MTP shift) need to know
where their neighbours are. docs/sharding.md, "Context parallelism".

Inside a `shard_map` over `context` a rank's local sequence is its two chunks back to back, [B, 2*Tc, ...];
`previous_chunk_tails` brings each chunk the last rows of the chunk before it in the natural order (the
previous rank's first chunk for chunk r, the next rank's second chunk for chunk 2N-1-r, its own first chunk for
chunk N on rank N-1); `chunk_index` names a chunk's place in the natural order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

AXIS = "context"


def context_size(mesh=None) -> int:
    """Size of the `context` axis of `mesh` (default: the active mesh); 1 without a mesh or the axis."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
    return int(dict(mesh.shape).get(AXIS, 1))


def check_length(length: int, size: int, granularity: int = 1, halo: int = 0) -> int:
    """The chunk length Tc = length / (2 * size); a one-line ValueError when the layout cannot split `length`.

    Args:
      length: tokens per row (T).
      size: the context axis size N.
      granularity: Tc must be a multiple of it (the model's compression ratios, so no entry straddles chunks).
      halo: Tc must be at least this (the rows a chunk borrows from the chunk before it).
    """
    chunks = 2 * size
    if length % chunks or (length // chunks) % granularity or length // chunks < halo:
        raise ValueError(f"context={size} needs a sequence length that is a multiple of {chunks * granularity} "
                         f"(2 x context chunks of a multiple of {granularity} tokens, each at least {halo}); "
                         f"got {length}")
    return length // chunks


def layout_permutation(length: int, size: int) -> np.ndarray:
    """perm such that `x[:, perm]` is the load-balanced layout: position p of the layout holds row perm[p]."""
    if size == 1:
        return np.arange(length)
    tc = length // (2 * size)
    chunks = np.arange(length).reshape(2 * size, tc)
    order = [c for r in range(size) for c in (r, 2 * size - 1 - r)]
    return chunks[order].reshape(-1)


def to_layout(x: jax.Array, size: int, axis: int = 1) -> jax.Array:
    """Natural order -> the load-balanced layout along `axis` (identity for size 1)."""
    if size == 1:
        return x
    return jnp.take(x, jnp.asarray(layout_permutation(x.shape[axis], size)), axis=axis)


def from_layout(x: jax.Array, size: int, axis: int = 1) -> jax.Array:
    """The load-balanced layout -> natural order along `axis` (identity for size 1)."""
    if size == 1:
        return x
    inverse = np.argsort(layout_permutation(x.shape[axis], size))
    return jnp.take(x, jnp.asarray(inverse), axis=axis)


def chunk_index(which: int, size: int) -> jax.Array:
    """Inside shard_map over `context`: the natural-order index of this rank's chunk `which` (0 or 1)."""
    r = jax.lax.axis_index(AXIS)
    return r if which == 0 else 2 * size - 1 - r


def previous_chunk_tails(x: jax.Array, rows: int, size: int) -> tuple[jax.Array, jax.Array]:
    """Inside shard_map over `context`: the last `rows` rows of the chunk before each of this rank's two chunks.

    The first chunk of the sequence (rank 0's chunk 0) gets zeros. Shapes: x [B, 2*Tc, ...] (this rank's
    chunks) -> two [B, rows, ...].
    """
    tc = x.shape[1] // 2
    tail0, tail1 = x[:, tc - rows: tc], x[:, 2 * tc - rows:]
    r = jax.lax.axis_index(AXIS)
    # chunk r's predecessor is chunk r-1: rank r-1's first chunk.
    halo0 = jax.lax.ppermute(tail0, AXIS, [(i, i + 1) for i in range(size - 1)])
    # chunk 2N-1-r's predecessor is chunk 2N-2-r: rank r+1's second chunk, or (r = N-1) this rank's first chunk.
    halo1 = jax.lax.ppermute(tail1, AXIS, [(i + 1, i) for i in range(size - 1)])
    halo1 = jnp.where(r == size - 1, tail0, halo1)
    return halo0, halo1


def natural_chunks(x: jax.Array, size: int, axis: int = 1) -> jax.Array:
    """Inside shard_map: all ranks' chunks gathered over `context` and put in natural order along `axis`.

    Shapes: x [..., 2*n, ...] (this rank's two chunks of n rows each along `axis`) -> [..., 2*N*n, ...].
    """
    gathered = jax.lax.all_gather(x, AXIS, axis=axis, tiled=True)  # layout order
    return from_layout(gathered, size, axis)
