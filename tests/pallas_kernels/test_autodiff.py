"""`pallas_kernels.autodiff.differentiable`: the custom-VJP plumbing every differentiable kernel uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.autodiff import differentiable


def _forward(x, ids, w, scale):  # ids: integer, no cotangent; scale: static
    y = scale * x * w[ids]
    return y.sum(), (x, ids, w)


def _backward(scale, res, d_out):
    x, ids, w = res
    dw = jnp.zeros_like(w).at[ids].add(scale * x * d_out)
    return scale * w[ids] * d_out, dw


def test_gradients_come_from_the_backward_and_integer_inputs_get_none():
    f = differentiable(_forward, _backward, n_static=1, grad_argnums=(0, 2))
    x, ids, w = jnp.arange(3.0), jnp.array([0, 2, 2]), jnp.array([1.0, 5.0, -2.0])
    assert float(f(x, ids, w, 3.0)) == float(_forward(x, ids, w, 3.0)[0])
    got = jax.grad(lambda x, w: f(x, ids, w, 3.0), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: _forward(x, ids, w, 3.0)[0], argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e)
    # the backward really is the one used: a wrong backward shows in the gradient
    wrong = differentiable(_forward, lambda s, r, d: (2 * _backward(s, r, d)[0], _backward(s, r, d)[1]), n_static=1,
                           grad_argnums=(0, 2))
    assert not np.allclose(jax.grad(lambda x: wrong(x, ids, w, 3.0))(x), want[0])


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="n_static must be in"):
        differentiable(_forward, _backward, n_static=5)
    with pytest.raises(ValueError, match="grad_argnums must be positions"):
        differentiable(_forward, _backward, n_static=1, grad_argnums=(3,))
