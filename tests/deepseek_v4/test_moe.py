"""The routed-expert implementations (padded, grouped, dense) against the readable spec
`moe.routed_experts_reference`: values and gradients, balanced, crowded and empty experts, the padding mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_v4 import get_config, moe
from sharding import mesh as mesh_lib

CFG = get_config("tiny")
N, K = 37, 2


def _inputs(crowded: bool):
    k = jax.random.split(jax.random.key(15), 6)
    d, f, e = CFG.hidden_size, CFG.moe_intermediate_size, CFG.n_routed_experts
    x = jax.random.normal(k[0], (N, d))
    w1, w3 = (0.3 * jax.random.normal(kk, (e, d, f)) for kk in k[1:3])
    w2 = 0.3 * jax.random.normal(k[3], (e, f, d))
    idx = jnp.argsort(jax.random.uniform(k[4], (N, e)), axis=-1)[:, :K].astype(jnp.int32)
    if crowded:  # 20 tokens on expert 3 (several overflow rounds of the padded path) and expert 5 empty
        idx = idx.at[:, 0].set(jnp.where(jnp.arange(N) < 20, 3, idx[:, 0]))
        idx = jnp.where(idx == 5, 6, idx)
        idx = idx.at[:, 1].set(jnp.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % e, idx[:, 1]))
    w = jax.random.uniform(k[5], (N, K))
    return x, idx, w, w1, w3, w2


def _run(impl, idx, mask, hook=None):
    def fn(x, w, w1, w3, w2):
        if impl == "reference":
            return moe.routed_experts_reference(x, idx, w, w1, w3, w2, CFG.swiglu_limit, hook)
        return moe.routed_experts(x, idx, w, w1, w3, w2, mask, CFG.replace(moe_impl=impl), hook)[0]

    return fn


@pytest.mark.parametrize("crowded", [False, True])
@pytest.mark.parametrize("impl", ["padded", "grouped", "dense"])
def test_values_and_gradients_equal_the_reference(impl, crowded):
    x, idx, w, w1, w3, w2 = _inputs(crowded)
    mask = jnp.ones((N,), bool)
    hook = lambda h: h + 0.25 * jnp.sin(3.0 * h)  # noqa: E731  (a per-element stand-in for FP8 fake quantisation)
    for act in (None, hook):
        got_fn, want_fn = _run(impl, idx, mask, act), _run("reference", idx, mask, act)
        np.testing.assert_allclose(np.asarray(jax.jit(got_fn)(x, w, w1, w3, w2)),
                                   np.asarray(jax.jit(want_fn)(x, w, w1, w3, w2)), rtol=1e-5, atol=1e-5)
        grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4)))  # noqa: E731
        for a, b in zip(grad(want_fn)(x, w, w1, w3, w2), grad(got_fn)(x, w, w1, w3, w2)):
            # float32 summation order only (the padded and dense paths apply the gate after w2, the spec before):
            # a few ulps of the gradient's scale (entries reach ~1,000)
            scale = float(jnp.max(jnp.abs(a)))
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)


def test_padded_path_gives_padding_tokens_no_routed_output():
    x, idx, w, w1, w3, w2 = _inputs(False)
    mask = jnp.arange(N) < 30
    got = jax.jit(_run("padded", idx, mask))(x, w, w1, w3, w2)
    want = jax.jit(_run("reference", idx, mask))(x, w, w1, w3, w2)
    np.testing.assert_allclose(np.asarray(got[:30]), np.asarray(want[:30]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[30:]), 0.0)


def test_dense_impl_cannot_split_experts_and_raises_under_expert_parallelism():
    x, idx, w, w1, w3, w2 = _inputs(False)
    with jax.set_mesh(mesh_lib.make_mesh("data=2,expert=4")):
        with pytest.raises(ValueError, match="cannot split experts over the mesh's expert axis"):
            _run("dense", idx, jnp.ones((N,), bool))(x, w, w1, w3, w2)


def test_grouped_impl_runs_the_expert_parallel_dispatch_on_a_mesh():
    x, idx, w, w1, w3, w2 = _inputs(True)
    mask = jnp.ones((N,), bool)
    want = jax.jit(_run("reference", idx, mask))(x, w, w1, w3, w2)
    with jax.set_mesh(mesh_lib.make_mesh("data=2,expert=4")):
        got = jax.jit(_run("grouped", idx, mask))(x, w, w1, w3, w2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", [pytest.param("fp8", marks=pytest.mark.slow), "fp4"])
def test_grouped_experts_in_stored_format_equal_the_fake_quantised_padded_path(quant):
    """Under `quant`, moe_impl="grouped" hands the kernel FP8 blocks / packed MXFP4 quantised from the master
    weights; the padded path multiplies fake-quantised floats. Same values, same (straight-through) gradients."""
    from flax import nnx

    cfg = get_config("tiny", hidden_size=64, moe_intermediate_size=32, quant=quant)
    assert moe.expert_weight_format(cfg.replace(moe_impl="grouped")) == quant
    assert moe.expert_weight_format(cfg) == "float"
    layer = moe.MoE(cfg, layer=3, hash_layer=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    grouped_def, _ = nnx.split(moe.MoE(cfg.replace(moe_impl="grouped"), layer=3, hash_layer=False,
                                       rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (2, 12, cfg.hidden_size))
    tokens = jnp.zeros((2, 12), jnp.int32)
    mask = jnp.ones((2, 12), bool)

    def loss(state, gdef):
        y, _ = nnx.merge(gdef, state)(x, tokens, mask)
        return jnp.sum(jnp.sin(y)), y

    run = lambda gdef: jax.jit(jax.value_and_grad(lambda st: loss(st, gdef), has_aux=True))(state)  # noqa: E731
    (_, y_padded), g_padded = run(graphdef)
    (_, y_grouped), g_grouped = run(grouped_def)
    np.testing.assert_allclose(np.asarray(y_grouped), np.asarray(y_padded), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_padded), jax.tree.leaves(g_grouped)):
        scale = float(jnp.max(jnp.abs(a))) + 1e-30
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale)


def test_unknown_moe_impl_is_a_config_error():
    with pytest.raises(ValueError, match="moe_impl must be 'padded', 'grouped' or 'dense'"):
        get_config("tiny", moe_impl="ragged")
