"""Chunked cross entropy against the all-logits reference (values, gradients, masking, memory) and MTP targets."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_v4 import loss as loss_lib


def _inputs(b=2, t=7, d=8, v=50, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (b, t, d))
    head = jax.random.normal(k[1], (d, v)) * 0.5
    targets = jax.random.randint(k[2], (b, t), 0, v)
    weights = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.float32)
    return hidden, head, targets, weights


@pytest.mark.parametrize("impl", loss_lib.IMPLS)
@pytest.mark.parametrize("chunk", [1, 5, 100])
def test_chunked_matches_reference_values_and_grads(chunk, impl):
    hidden, head, targets, weights = _inputs()
    ref_fn = lambda h, w, m: loss_lib.reference_cross_entropy(h, w, targets, m)  # noqa: E731
    got_fn = lambda h, w, m: loss_lib.chunked_cross_entropy(h, w, targets, m, chunk_size=chunk, impl=impl)  # noqa: E731
    ref, ref_g = jax.value_and_grad(ref_fn, argnums=(0, 1, 2))(hidden, head, weights)
    got, got_g = jax.value_and_grad(got_fn, argnums=(0, 1, 2))(hidden, head, weights)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for g, r in zip(got_g, ref_g):  # hidden, head and (per-token loss) weight gradients
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # Scaled and bf16 inputs: cotangent scaling and dtypes follow the inputs.
    g2 = jax.grad(lambda h: 3.0 * got_fn(h, head, weights))(hidden.astype(jnp.bfloat16))
    assert g2.dtype == jnp.bfloat16
    np.testing.assert_allclose(g2.astype(jnp.float32), 3.0 * ref_g[0], rtol=0.05, atol=0.02)


def test_masked_tokens_do_not_count():
    hidden, head, targets, weights = _inputs()
    base = loss_lib.chunked_cross_entropy(hidden, head, targets, weights, chunk_size=4)
    # Changing a masked position's hidden state or target changes neither the loss nor any gradient.
    b, t = np.argwhere(np.asarray(weights) == 0)[0]
    hidden2 = hidden.at[b, t].set(100.0)
    targets2 = targets.at[b, t].set((targets[b, t] + 1) % head.shape[1])
    moved = loss_lib.chunked_cross_entropy(hidden2, head, targets2, weights, chunk_size=4)
    assert float(moved) == float(base)
    g = jax.grad(lambda h: loss_lib.chunked_cross_entropy(h, head, targets, weights, chunk_size=4))(hidden)
    assert float(jnp.abs(g[b, t]).max()) == 0.0


def test_uniform_logits_give_log_vocab():
    v = 37
    hidden = jnp.ones((1, 5, 4))
    head = jnp.zeros((4, v))
    loss = loss_lib.chunked_cross_entropy(hidden, head, jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5)), chunk_size=2)
    np.testing.assert_allclose(loss, 5 * np.log(v), rtol=1e-6)


def _shapes_in(jaxpr):
    """Shapes of every value computed anywhere in a jaxpr, sub-jaxprs (scan, checkpoint) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _shapes_in(sub)


@pytest.mark.parametrize("impl", loss_lib.IMPLS)
def test_backward_never_builds_all_logits(impl):
    b, t, d, v, chunk = 2, 16, 8, 64, 8
    hidden, head, targets, weights = _inputs(b, t, d, v)
    grad = jax.grad(lambda h, w: loss_lib.chunked_cross_entropy(h, w, targets, weights, chunk_size=chunk, impl=impl),
                    (0, 1))
    shapes = set(_shapes_in(jax.make_jaxpr(grad)(hidden, head).jaxpr))
    biggest = max(int(np.prod(s)) for s in shapes if s)
    assert (chunk, v) in shapes  # the per-chunk logits exist ...
    assert biggest < b * t * v  # ... but nothing as large as all logits does
    ref = jax.grad(lambda h, w: loss_lib.reference_cross_entropy(h, w, targets, weights), (0, 1))
    ref_shapes = set(_shapes_in(jax.make_jaxpr(ref)(hidden, head).jaxpr))
    assert max(int(np.prod(s)) for s in ref_shapes if s) >= b * t * v  # the check can fail


def test_mtp_targets_stay_inside_documents():
    # Row 0: doc 1 = positions 0-3, doc 2 = 4-5, padding 6-7. Row 1: one doc filling the row.
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    targets = jnp.arange(16).reshape(2, 8) + 100
    t1, w1 = loss_lib.mtp_targets(targets, seg, 1)
    np.testing.assert_array_equal(t1[0, :5], [101, 102, 103, 104, 105])
    np.testing.assert_array_equal(w1[0], [1, 1, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(w1[1], [1, 1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(t1[1, :7], targets[1, 1:])
    t2, w2 = loss_lib.mtp_targets(targets, seg, 2)
    np.testing.assert_array_equal(w2[0], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(t2[1, :6], targets[1, 2:])
    np.testing.assert_array_equal(loss_lib.token_mask(seg)[0], [1, 1, 1, 1, 1, 1, 0, 0])
