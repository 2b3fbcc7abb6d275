"""Expert-parallel MoE (shard_map + all_to_all) against a plain single-device reference: values, gradients, drops."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharding import expert_parallel
from sharding import mesh as mesh_lib
from tests.conftest import TOLERANCES

T, D, F, E, K = 32, 16, 8, 8, 2
LIMIT = 1.0  # small, so the clamps are active for some entries
TOL = TOLERANCES["sharded_vs_single_f32"]


def reference(x, idx, w, w1, w3, w2, keep=None, act_quant=None):
    """y[t] = sum_k w[t,k] * clamped_swiglu_{idx[t,k]}(x[t]) on one device, every expert on every token."""
    gate = jnp.minimum(jnp.einsum("td,edf->tef", x, w1), LIMIT)
    up = jnp.clip(jnp.einsum("td,edf->tef", x, w3), -LIMIT, LIMIT)
    h = jax.nn.silu(gate) * up
    if act_quant is not None:
        h = act_quant(h)
    ye = jnp.einsum("tef,efd->ted", h, w2)  # [T, E, D]
    w = w if keep is None else w * keep
    return jnp.sum(jnp.take_along_axis(ye, idx[..., None], axis=1) * w[..., None], axis=1)


def make_inputs(t=T, skew=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(t, D)).astype(np.float32)
    idx = np.argsort(rng.normal(size=(t, E)), axis=1)[:, :K].astype(np.int32)
    if skew:
        idx = np.tile(np.array([[3, 5]], np.int32), (t, 1))  # every token on the same two experts
    w = rng.uniform(size=(t, K)).astype(np.float32)
    w1, w3 = ((0.5 * rng.normal(size=(E, D, F))).astype(np.float32) for _ in range(2))
    w2 = (0.5 * rng.normal(size=(E, F, D))).astype(np.float32)
    return x, idx, w, w1, w3, w2


def kept_reference(idx, shards, cap):
    """The documented drop policy: per token shard, first choices before second ones, C slots per expert."""
    keep = np.zeros(idx.shape, np.float32)
    tl = idx.shape[0] // shards
    for s in range(shards):
        used = np.zeros(E, int)
        for k in range(K):
            for t in range(s * tl, (s + 1) * tl):
                if used[idx[t, k]] < cap:
                    keep[t, k], used[idx[t, k]] = 1.0, used[idx[t, k]] + 1
    return keep


def grads_and_values(mesh, capacity_factor=None, act_quant=None, local_ffn="padded"):
    def loss(x, w, w1, w3, w2, idx):
        y, dropped = expert_parallel.routed_experts(x, idx, w, w1, w3, w2, swiglu_limit=LIMIT,
                                                    capacity_factor=capacity_factor, mesh=mesh, act_quant=act_quant,
                                                    local_ffn=local_ffn)
        return jnp.sum(jnp.sin(y)), (y, dropped)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def reference_grads(x, idx, w, w1, w3, w2, keep=None, act_quant=None):
    def loss(x, w, w1, w3, w2):
        y = reference(x, idx, w, w1, w3, w2, keep, act_quant)
        return jnp.sum(jnp.sin(y)), y

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, w1, w3, w2)


@pytest.fixture(scope="module")
def inputs():
    args = make_inputs()
    return args, reference_grads(*args)


def check(got, want):
    (_, (y, _)), grads = got
    (_, y_ref), grads_ref = want
    np.testing.assert_allclose(y, y_ref, atol=TOL, rtol=TOL)
    for name, g, g_ref in zip(("x", "w", "w1", "w3", "w2"), grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, atol=TOL, rtol=TOL, err_msg=f"grad {name}")


@pytest.mark.parametrize("spec", ["expert=8", "data=2,expert=4", "data=2,fsdp=2,expert=2", "expert=4,tensor=2",
                                  "fsdp=8"])
@pytest.mark.parametrize("local_ffn", ["padded", "grouped"])
def test_dropless_matches_reference(spec, local_ffn, inputs):
    args, want = inputs
    x, idx, w, w1, w3, w2 = args
    got = grads_and_values(mesh_lib.make_mesh(spec), local_ffn=local_ffn)(x, w, w1, w3, w2, idx)
    assert int(got[0][1][1]) == 0
    check(got, want)


@pytest.mark.parametrize("local_ffn", ["padded", "grouped"])
def test_single_device_path_without_mesh(local_ffn, inputs):
    args, want = inputs
    x, idx, w, w1, w3, w2 = args
    got = grads_and_values(None, local_ffn=local_ffn)(x, w, w1, w3, w2, idx)
    assert int(got[0][1][1]) == 0
    check(got, want)


@pytest.mark.parametrize("local_ffn", ["padded", "grouped"])
def test_skewed_routing_and_ragged_token_count_stay_dropless(local_ffn):
    # 30 tokens on 8 shards (padded inside), all of them routed to experts 3 and 5: the worst case, which the
    # dropless mode serves in one round of the balanced capacity and 4 (E/K - 1) quarter-size overflow rounds.
    args = make_inputs(t=30, skew=True)
    x, idx, w, w1, w3, w2 = args
    got = grads_and_values(mesh_lib.make_mesh("data=2,expert=4"), local_ffn=local_ffn)(x, w, w1, w3, w2, idx)
    assert got[0][1][0].shape == (30, D)
    assert int(got[0][1][1]) == 0
    check(got, reference_grads(*args))


def test_capacity_mode_drops_and_counts_exactly(inputs):
    args, _ = inputs
    x, idx, w, w1, w3, w2 = args
    cf, shards = 1.0, 8
    cap = expert_parallel.capacity(T // shards, E, K, cf)
    assert cap == math.ceil(cf * (T // shards) * K / E)
    keep = kept_reference(idx, shards, cap)
    assert 0 < (keep == 0).sum() < keep.size
    got = grads_and_values(mesh_lib.make_mesh("data=2,expert=4"), capacity_factor=cf)(x, w, w1, w3, w2, idx)
    assert int(got[0][1][1]) == int((keep == 0).sum())
    check(got, reference_grads(*args, keep=keep))


def test_activation_hook_and_expert_parallelism():
    args = make_inputs()
    x, idx, w, w1, w3, w2 = args
    hook = lambda h: h + 0.25 * jnp.sin(3.0 * h)  # noqa: E731  (a per-element stand-in for FP8 fake quantisation)
    mesh = mesh_lib.make_mesh("data=2,expert=4")
    check(grads_and_values(mesh, act_quant=hook)(x, w, w1, w3, w2, idx), reference_grads(*args, act_quant=hook))
    assert expert_parallel.expert_parallelism(mesh) == 4
    assert expert_parallel.expert_parallelism() == 1  # no active mesh
    with jax.set_mesh(mesh_lib.make_mesh("fsdp=8")):
        assert expert_parallel.expert_parallelism() == 1


def test_capacity_bounds_and_bad_inputs():
    assert expert_parallel.capacity(16, 8, 2, None) == 4  # dropless: rounds of the balanced load
    assert expert_parallel.capacity(16, 8, 2, 100.0) == 16
    assert expert_parallel.capacity(16, 256, 2, 0.01) == 1
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        expert_parallel.capacity(16, 8, 2, 0.0)
    x, idx, w, w1, w3, w2 = make_inputs()
    with pytest.raises(ValueError, match="expert weights must be"):
        expert_parallel.routed_experts(x, idx, w, w1, w3, w1, swiglu_limit=LIMIT)
    with pytest.raises(ValueError, match="must be \\[T=32, K\\]"):
        expert_parallel.routed_experts(x, idx[:4], w, w1, w3, w2, swiglu_limit=LIMIT)
    with pytest.raises(ValueError, match="local_ffn must be 'padded' or 'grouped'"):
        expert_parallel.routed_experts(x, idx, w, w1, w3, w2, swiglu_limit=LIMIT, local_ffn="ragged")
    with pytest.raises(ValueError, match="needs local_ffn='grouped'"):
        expert_parallel.routed_experts(x, idx, w, w1, w3, w2, swiglu_limit=LIMIT, weight_format="fp8")


def test_grouped_shards_take_fp8_weights_in_stored_format():
    """Under expert parallelism the grouped kernel gets E4M3 blocks + scales quantised from the master weights:
    the same values (and straight-through gradients) as the padded path on fake-quantised weights."""
    from deepseek_v4 import quant

    x, idx, w, w1, w3, w2 = make_inputs()
    mesh = mesh_lib.make_mesh("data=2,expert=4")

    def run(local_ffn, weight_format, fake):
        def loss(x, w1, w3, w2):
            ws = [quant.fake_quant_fp8_blocks(a) for a in (w1, w3, w2)] if fake else [w1, w3, w2]
            y, _ = expert_parallel.routed_experts(x, idx, w, *ws, swiglu_limit=LIMIT, mesh=mesh,
                                                  local_ffn=local_ffn, weight_format=weight_format)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, w1, w3, w2)

    (v_got, g_got), (v_want, g_want) = run("grouped", "fp8", False), run("padded", "float", True)
    np.testing.assert_allclose(v_got, v_want, rtol=TOL, atol=TOL)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)


def test_padding_tokens_take_no_expert_slot_in_the_moe_layer():
    from flax import nnx

    from deepseek_v4 import get_config
    from deepseek_v4.moe import MoE, swiglu

    cfg = get_config("tiny")  # moe_impl="padded", the expert-parallel dispatch
    dense_cfg = cfg.replace(moe_impl="dense")  # every expert on every token, padding included
    graphdef, state = nnx.split(MoE(cfg, layer=3, hash_layer=False, rngs=nnx.Rngs(0)))
    dense_graphdef, _ = nnx.split(MoE(dense_cfg, layer=3, hash_layer=False, rngs=nnx.Rngs(0)))
    b, t = 4, 8
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size))
    tokens = jnp.zeros((b, t), jnp.int32)
    mask = jnp.ones((b, t), bool).at[1, 5:].set(False).at[3].set(False)  # padding: a row tail and a whole row

    def run(state, x, m, graphdef=graphdef):
        y, stats = nnx.merge(graphdef, state)(x, tokens, m)
        return y, stats.expert_counts

    dense = jax.jit(functools.partial(run, graphdef=dense_graphdef))
    one_y, one_counts = dense(state, x, mask)  # one device: the dense MoE
    ref_none, _ = dense(state, x, jnp.zeros_like(mask))
    with jax.set_mesh(mesh_lib.make_mesh("data=2,expert=4")):
        ep_y, ep_counts = jax.jit(run)(state, x, mask)  # expert-parallel all-to-all
        ep_none, _ = jax.jit(run)(state, x, jnp.zeros_like(mask))
    live = np.asarray(mask)
    tol = TOLERANCES["sharded_vs_single_f32"]
    np.testing.assert_allclose(np.asarray(ep_y)[live], np.asarray(one_y)[live], rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(ep_counts), np.asarray(one_counts))
    assert int(np.sum(ep_counts)) == int(live.sum()) * cfg.num_experts_per_tok
    # All padding: the expert-parallel layer dispatches nothing, so only the shared expert's output is left; the
    # dense MoE still evaluates the routed experts for padding (whose outputs no loss reads).
    shared = nnx.merge(graphdef, state).shared
    want = swiglu(x.reshape(-1, cfg.hidden_size), shared.w1[...], shared.w3[...], shared.w2[...], cfg.swiglu_limit,
                  None).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(ep_none), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(ref_none - want))) > 1e-3
