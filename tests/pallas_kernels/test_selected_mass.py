"""The sparse phase's selected-set mass on the Pallas path (interpret mode) against the reference's one pass.

With a Pallas `impl`, `sparse_attention_and_selected_mass` takes the output from the kernel and the mass from
the reference's forward pass beside it (docs/kernels.md says why the kernels do not return it): the pair must
equal the reference's pair, and the output's gradients the reference's, on the packed case (three documents,
padding, empty top-k slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import reference, selected_entry_mass, sparse_attention_and_selected_mass
from tests.conftest import TOLERANCES
from tests.pallas_kernels.test_sparse_attention import BLOCKS, CASES, problem


@pytest.mark.slow  # interpret-mode kernels, forward and backward: ~25-40 s each
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_the_pallas_path_returns_the_reference_mass_and_output_gradients(impl):
    case, (q, kv, entries, topk, sink, seg) = problem("packed")
    window = CASES["packed"].window
    cot = jax.random.normal(jax.random.key(3), q.shape, jnp.float32)

    def run(fn):
        def loss(q, kv, entries, sink):
            out, mass = fn(q, kv, entries, topk, sink, seg)
            return jnp.sum(out * cot), (out, mass)

        (_, (out, mass)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, kv, entries, sink)
        return out, mass, grads

    want_out, want_mass, want_grads = run(lambda *a: reference.sparse_attention_and_selected_mass(*a, window=window))
    out, mass, grads = run(lambda *a: sparse_attention_and_selected_mass(
        *a, window=window, impl=impl, block_sizes=BLOCKS[impl], interpret=True))
    tol = TOLERANCES["kernel_f32"]
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(mass), np.asarray(want_mass))  # the same pass computes it
    assert float(jnp.max(mass)) > 0 and bool(jnp.all(jnp.where(topk < 0, mass == 0, True)))
    for g, w, name in zip(grads, want_grads, ("q", "kv", "entries", "sink")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol, err_msg=name)
    # The model's call (global arrays, no gradient) gives the same mass.
    alone = selected_entry_mass(q, kv, entries, topk, sink, seg, window=window)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(want_mass))
    # On the Pallas path the mass carries no gradient (it is the KL's stop-gradient target).
    g_mass = jax.grad(lambda q: jnp.sum(sparse_attention_and_selected_mass(
        q, kv, entries, topk, sink, seg, window=window, impl=impl, block_sizes=BLOCKS[impl], interpret=True)[1]))(q)
    assert not np.any(np.asarray(g_mass))
