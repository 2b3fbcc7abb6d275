"""Training losses on plain arrays: chunked next-token cross entropy and the multi-token-prediction targets.

The output head of a V4 model has 129,280 columns, so the logits of one batch ([B, T, V] in float32) are
far larger than every activation of the network. `chunked_cross_entropy` never builds them: it walks over
chunks of tokens, computes float32 logits for one chunk from the final hidden state and the head weight,
reduces them to a per-token loss, and wraps each chunk in `jax.checkpoint` so that the backward pass
recomputes the chunk's logits instead of storing them. Peak memory is one chunk of logits (and its
gradient), independent of B * T.

Shapes:
  hidden [B, T, D] (or any [..., D]), head [D, V], targets / weights [B, T] (or the matching [...]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 1024  # tokens per logits chunk: 1024 x 129,280 f32 logits = 0.5 GB (and as much for their gradient)


def _chunk_loss(head: jax.Array, hidden: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted cross-entropy sum of one chunk; float32 logits. [C, D] x [D, V] -> scalar."""
    logits = jnp.einsum("cd,dv->cv", hidden.astype(jnp.float32), head.astype(jnp.float32))  # [C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]  # [C]
    return jnp.sum((lse - target_logit) * weights)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> jax.Array:
    """Sum over tokens of `weights * (-log softmax(hidden @ head)[target])`, one chunk of logits at a time.

    Args:
      hidden: final normed hidden states, any leading shape, last axis D.
      head: the output projection [D, V].
      targets: int token ids with hidden's leading shape.
      weights: per-token weights (0 masks a token out) with hidden's leading shape.
      chunk_size: tokens per chunk; the token count is padded (with weight 0) to a multiple of it.

    Returns:
      A float32 scalar: the weighted sum (divide by the token count yourself, so microbatches add up).

    Shapes:
      hidden [..., D] -> [N, D] -> [N/C, C, D]; per chunk logits [C, V] (never all of [N, V]).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)  # [..., D] -> [N, D]
    t = targets.reshape(-1).astype(jnp.int32)
    w = weights.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    c = max(1, min(chunk_size, n))
    pad = (-n) % c
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        t = jnp.pad(t, (0, pad))
        w = jnp.pad(w, (0, pad))
    h = h.reshape(-1, c, d)  # [N, D] -> [N/C, C, D]
    t = t.reshape(-1, c)
    w = w.reshape(-1, c)
    chunk = jax.checkpoint(_chunk_loss)

    def body(total, xs):
        return total + chunk(head, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))
    return total


def reference_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """The same sum computed with all logits at once (the spec `chunked_cross_entropy` is tested against)."""
    logits = jnp.einsum("...d,dv->...v", hidden.astype(jnp.float32), head.astype(jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * weights.astype(jnp.float32))


def token_mask(segment_ids: jax.Array) -> jax.Array:
    """1.0 where a position holds a real token (segment id != 0), else 0.0. [B, T] -> [B, T]."""
    return (segment_ids != 0).astype(jnp.float32)


def mtp_targets(targets: jax.Array, segment_ids: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and mask of the MTP module at `depth` (1-based).

    The main model at position t predicts targets[t] (the token at t+1). The depth-k MTP module at position t
    predicts the token at t+1+k, which is targets[t+k]. That prediction only counts when position t+k lies in
    the same packed document as t (targets never cross a document, see the batch format).

    Shapes:
      targets, segment_ids [B, T] -> (targets [B, T], weights [B, T] float32; the last `depth` columns are 0).
    """
    b, t = targets.shape
    k = min(depth, t)
    pad = jnp.zeros((b, k), targets.dtype)
    shifted_targets = jnp.concatenate([targets[:, k:], pad], axis=1)  # [B, T]
    shifted_segments = jnp.concatenate([segment_ids[:, k:], jnp.zeros((b, k), segment_ids.dtype)], axis=1)
    valid = (segment_ids != 0) & (shifted_segments == segment_ids)
    return shifted_targets, valid.astype(jnp.float32)
