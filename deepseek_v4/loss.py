"""Training losses on plain arrays: chunked next-token cross entropy and the multi-token-prediction targets.

The output head of a V4 model has 129,280 columns, so the logits of one batch ([B, T, V] in float32) are
far larger than every activation of the network. `chunked_cross_entropy` never builds them: it walks over
chunks of C tokens and computes float32 logits [C, V] for one chunk at a time from the final hidden state and
the head weight. Two ways to get the gradients, both holding one chunk of logits at a time:

- "remat" (default): each chunk is wrapped in `jax.checkpoint`, so the backward recomputes the chunk's logits
  instead of storing them: 4 matmuls per chunk, no head-sized residual.
- "fused": the forward pass computes each chunk's gradients right away (softmax - one-hot is known
  as soon as the logits are), sums the head gradient over chunks, and keeps the hidden-state gradient [N, D]
  and the head gradient [D, V] as the residuals of a `jax.custom_vjp`; the backward only scales them. No
  logit is computed twice: 3 matmuls per chunk. It holds one head-sized float32 gradient per call until the
  backward. Fewer FLOPs, but measured slower on CPU (nano head, 1,024 tokens: 1.48 s vs 1.33 s for fwd+bwd; the
  [chunk, V] passes are memory-bound there, experiments/LOG.md); worth trying where the head matmuls are
  compute-bound.

Shapes:
  hidden [B, T, D] (or any [..., D]), head [D, V], targets / weights [B, T] (or the matching [...]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 1024  # tokens per logits chunk: 1024 x 129,280 f32 logits = 0.5 GB (and as much for their gradient)
IMPLS = ("fused", "remat")


def _chunk_loss(head: jax.Array, hidden: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted cross-entropy sum of one chunk; float32 logits. [C, D] x [D, V] -> scalar."""
    logits = jnp.einsum("cd,dv->cv", hidden.astype(jnp.float32), head.astype(jnp.float32))  # [C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]  # [C]
    return jnp.sum((lse - target_logit) * weights)


def _chunk_loss_and_grads(head, hidden, targets, weights):
    """One chunk's per-token losses and the gradients of their weighted sum.

    Shapes: head [D, V], hidden [C, D] -> (nll [C], d_hidden [C, D], d_head [D, V]).
    """
    h = hidden.astype(jnp.float32)
    w32 = head.astype(jnp.float32)
    logits = jnp.einsum("cd,dv->cv", h, w32)  # [C, V]
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]  # the one-hot, never stored
    nll = (jnp.log(total) + top)[:, 0] - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)  # [C]
    soft = e / total
    d_logits = jnp.where(hit, soft - 1.0, soft) * weights[:, None]  # [C, V]
    return nll, jnp.einsum("cv,dv->cd", d_logits, w32), jnp.einsum("cd,cv->dv", h, d_logits)


def _chunks(hidden, targets, weights, chunk_size):
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
    # Chunk j holds tokens j, j + N/C, j + 2N/C, ...: [N, D] -> [C, N/C, D] -> [N/C, C, D]. When the token axis is
    # split over devices (batch sharding), every chunk then holds an equal share of each device's tokens, so a
    # device computes logits for its own rows of the chunk only (a contiguous [N/C, C] split would put each chunk on
    # one device and make XLA gather it everywhere).
    k = h.shape[0] // c
    return (h.reshape(c, k, d).swapaxes(0, 1), t.reshape(c, k).swapaxes(0, 1), w.reshape(c, k).swapaxes(0, 1),
            n)  # [N/C, C, D], [N/C, C], [N/C, C]


def _remat_loss(hidden, head, targets, weights, chunk_size):
    h, t, w, _ = _chunks(hidden, targets, weights, chunk_size)
    chunk = jax.checkpoint(_chunk_loss)

    def body(total, xs):
        return total + chunk(head, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_loss(hidden, head, targets, weights, chunk_size):
    return _remat_loss(hidden, head, targets, weights, chunk_size)  # undifferentiated calls need no gradients


def _fused_fwd(hidden, head, targets, weights, chunk_size):
    h, t, w, n = _chunks(hidden, targets, weights, chunk_size)

    def body(d_head, xs):
        nll, d_h, d_w = _chunk_loss_and_grads(head, *xs)
        return d_head + d_w, (nll, d_h)

    d_head, (nll, d_hidden) = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), (h, t, w))
    nll = nll.swapaxes(0, 1).reshape(-1)[:n]  # back to token order: [N/C, C] -> [C, N/C] -> [N]
    loss = jnp.sum(nll * w.swapaxes(0, 1).reshape(-1)[:n])
    d_hidden = d_hidden.swapaxes(0, 1).reshape(-1, hidden.shape[-1])[:n].reshape(hidden.shape)
    # Residuals in the inputs' dtypes: the backward returns cotangents of those dtypes.
    return loss, (d_hidden.astype(hidden.dtype), d_head.astype(head.dtype), nll.reshape(weights.shape).astype(
        weights.dtype))


def _fused_bwd(chunk_size, res, g):
    del chunk_size
    d_hidden, d_head, nll = res
    return (g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype), None, (g * nll).astype(nll.dtype)


_fused_loss.defvjp(_fused_fwd, _fused_bwd)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    impl: str = "remat",
) -> jax.Array:
    """Sum over tokens of `weights * (-log softmax(hidden @ head)[target])`, one chunk of logits at a time.

    Args:
      hidden: final normed hidden states, any leading shape, last axis D.
      head: the output projection [D, V].
      targets: int token ids with hidden's leading shape.
      weights: per-token weights (0 masks a token out) with hidden's leading shape.
      chunk_size: tokens per chunk; the token count is padded (with weight 0) to a multiple of it.
      impl: "fused" or "remat" (see the module docstring); same values and gradients.

    Returns:
      A float32 scalar: the weighted sum (divide by the token count yourself, so microbatches add up).

    Shapes:
      hidden [..., D] -> [N, D] -> [N/C, C, D]; per chunk logits [C, V] (never all of [N, V]).
    """
    if impl == "fused":
        return _fused_loss(hidden, head, targets, weights, chunk_size)
    if impl == "remat":
        return _remat_loss(hidden, head, targets, weights, chunk_size)
    raise ValueError(f"unknown cross-entropy impl {impl!r}; choose one of {', '.join(IMPLS)}")


def token_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, *,
                        chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
    """Each token's `-log softmax(hidden @ head)[target]`, one chunk of logits at a time (no gradients needed:
    evaluation uses it to split the loss by position).

    Shapes:
      hidden [..., D], head [D, V], targets [...] -> float32 [...]; per chunk logits [C, V].
    """
    h, t, _, n = _chunks(hidden, targets, jnp.zeros(targets.shape, jnp.float32), chunk_size)

    def one(xs):
        hc, tc = xs
        logits = jnp.einsum("cd,dv->cv", hc.astype(jnp.float32), head.astype(jnp.float32))  # [C, V]
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]

    nll = jax.lax.map(one, (h, t))  # [N/C, C]
    return nll.swapaxes(0, 1).reshape(-1)[:n].reshape(targets.shape)  # back to token order


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
