"""Properties of the model that hold for any weights: causality, the document rule of packed rows, mHC mixing,
routing rules; plus the multi-device smoke test and the model_stats figures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_v4 import DeepseekV4, get_config, mhc, moe
from tests.conftest import TOLERANCES
from tools.model_stats import model_stats

T = 48  # three HCA windows of the tiny config (ratio 16), twelve CSA windows (ratio 4), three sliding windows


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, tokens, segment_ids, positions):
        return nnx.merge(graphdef, state)(tokens, segment_ids, positions)

    return cfg, model, state, logits


def _tokens(seed, shape, vocab):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def _plain(shape):
    return jnp.ones(shape, jnp.int32), jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


def test_logits_shape_and_dtype(tiny):
    cfg, _, state, logits = tiny
    out = logits(state, _tokens(0, (2, 21), cfg.vocab_size), *_plain((2, 21)))
    assert out.shape == (2, 21, cfg.vocab_size) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_causality(tiny):
    cfg, _, state, logits = tiny
    tokens = _tokens(1, (1, T), cfg.vocab_size)
    seg, pos = _plain(tokens.shape)
    base = logits(state, tokens, seg, pos)
    for t in (0, 15, 16, 31, 40):
        changed = tokens.at[:, t + 1:].set(_tokens(2 + t, (1, T - t - 1), cfg.vocab_size))
        out = logits(state, changed, seg, pos)
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]))
        assert float(jnp.max(jnp.abs(out[:, t + 1:] - base[:, t + 1:]))) > 0


def test_no_information_crosses_a_document_boundary(tiny):
    """Changing every token of the first document (incl. ones that share compression windows with the second
    document) never changes the second document's logits."""
    cfg, _, state, logits = tiny
    split = 21  # not aligned to 4 or 16: windows of both ratios straddle the boundary
    seg = jnp.asarray([[1] * split + [2] * (T - split)], jnp.int32)
    pos = jnp.asarray([list(range(split)) + list(range(T - split))], jnp.int32)
    tokens = _tokens(3, (1, T), cfg.vocab_size)
    base = logits(state, tokens, seg, pos)
    other = tokens.at[:, :split].set(_tokens(4, (1, split), cfg.vocab_size))
    out = logits(state, other, seg, pos)
    np.testing.assert_array_equal(np.asarray(out[:, split:]), np.asarray(base[:, split:]))
    assert float(jnp.max(jnp.abs(out[:, :split] - base[:, :split]))) > 0


def test_aligned_packed_document_equals_the_document_alone(tiny):
    """A document that starts on a window boundary of every ratio gives the same logits packed as alone."""
    cfg, _, state, logits = tiny
    split = 16
    seg = jnp.asarray([[1] * split + [2] * (T - split)], jnp.int32)
    pos = jnp.asarray([list(range(split)) + list(range(T - split))], jnp.int32)
    tokens = _tokens(5, (1, T), cfg.vocab_size)
    packed = logits(state, tokens, seg, pos)[:, split:]
    alone_tokens = jnp.concatenate([tokens[:, split:], tokens[:, :split]], axis=1)  # pad to the same length
    seg2 = jnp.asarray([[1] * (T - split) + [2] * split], jnp.int32)
    pos2 = jnp.asarray([list(range(T - split)) + list(range(split))], jnp.int32)
    alone = logits(state, alone_tokens, seg2, pos2)[:, : T - split]
    np.testing.assert_allclose(np.asarray(packed), np.asarray(alone), atol=2e-5, rtol=0)


def test_mhc_mixing_matrices_are_doubly_stochastic(tiny):
    cfg, model, _, _ = tiny
    x = jax.random.normal(jax.random.key(6), (2, 5, cfg.hc_mult, cfg.hidden_size))
    site = model.prefix[0].hc_attn
    fn = site.fn[...] + 0.5 * jax.random.normal(jax.random.key(7), site.fn.shape)
    pre, post, comb = mhc.hc_weights(x, fn, site.base[...], site.scale[...], cfg)
    # The projection ends on a column normalisation (as the reference does): columns are exact; rows converge
    # geometrically and, for strongly peaked logits like these, are within a few percent after 20 iterations.
    np.testing.assert_allclose(np.asarray(comb.sum(-2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(comb.sum(-1)), 1.0, atol=0.1)
    flat = mhc.hc_weights(x, site.fn[...], site.base[...], site.scale[...], cfg)[2]  # at initialisation
    np.testing.assert_allclose(np.asarray(flat.sum(-1)), 1.0, atol=1e-4)
    assert bool(jnp.all(comb > 0)) and bool(jnp.all((post > 0) & (post < 2))) and bool(jnp.all(pre > 0))


def test_hash_routing_is_deterministic_and_picks_distinct_experts():
    cfg = get_config("tiny")
    a, b = moe.default_hash_table(cfg, 0), moe.default_hash_table(cfg, 0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (cfg.vocab_size, cfg.num_experts_per_tok)
    s = np.sort(np.asarray(a), axis=1)
    assert np.all(s[:, 1:] != s[:, :-1])
    assert not np.array_equal(np.asarray(a), np.asarray(moe.default_hash_table(cfg, 1)))
    counts = np.bincount(np.asarray(a).ravel(), minlength=cfg.n_routed_experts)
    assert counts.min() > 0.9 * counts.mean()


def test_hash_layer_routes_by_token_id_only(tiny):
    cfg, model, _, _ = tiny
    layer = model.prefix[0].ffn
    assert layer.hash_layer
    x1 = jax.random.normal(jax.random.key(8), (4, cfg.hidden_size))
    x2 = jax.random.normal(jax.random.key(9), (4, cfg.hidden_size))
    tok = jnp.asarray([5, 5, 77, 129279])
    table = layer.tid2eid[...][tok]
    _, i1, _ = moe.route(x1, layer.gate[...], None, table, cfg.num_experts_per_tok, cfg.routed_scaling_factor)
    _, i2, _ = moe.route(x2, layer.gate[...], None, table, cfg.num_experts_per_tok, cfg.routed_scaling_factor)
    np.testing.assert_array_equal(np.asarray(i1), np.asarray(i2))
    np.testing.assert_array_equal(np.asarray(i1[0]), np.asarray(i1[1]))


def test_router_weights_sum_to_the_scaling_factor_and_bias_only_selects(tiny):
    cfg, model, _, _ = tiny
    gate = model.stack.blocks[0].ffn.gate[...][0]
    x = jax.random.normal(jax.random.key(10), (64, cfg.hidden_size))
    bias = jnp.zeros((cfg.n_routed_experts,)).at[3].set(100.0)
    scores, idx, w = moe.route(x, gate, bias, None, cfg.num_experts_per_tok, cfg.routed_scaling_factor)
    np.testing.assert_allclose(np.asarray(w.sum(-1)), cfg.routed_scaling_factor, rtol=1e-6)
    assert bool(jnp.all(jnp.any(idx == 3, axis=-1)))  # the bias forces expert 3 into every selection ...
    picked = jnp.take_along_axis(scores, idx, -1)
    np.testing.assert_allclose(np.asarray(w), np.asarray(picked / picked.sum(-1, keepdims=True) * 1.5), rtol=1e-6)


def test_bias_update_follows_the_sign_rule(tiny):
    cfg, shared, _, _ = tiny
    model = nnx.merge(*nnx.split(shared))  # a copy: new Variables over the same arrays; the update replaces values
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward_train(t))(state, _tokens(11, (2, 20), cfg.vocab_size))
    counts = out.expert_counts
    assert counts.shape[1] == cfg.n_routed_experts
    np.testing.assert_allclose(np.asarray(counts.sum(-1)), 2 * 20 * cfg.num_experts_per_tok)
    model.update_router_bias(counts, 0.001)
    expected = 0.001 * np.sign(np.asarray(counts.mean(-1, keepdims=True) - counts))
    np.testing.assert_allclose(np.asarray(model.stack.blocks[0].ffn.router_bias[...][0]), expected[0], atol=1e-9)
    np.testing.assert_allclose(np.asarray(model.mtp[0].block.ffn.router_bias[...]), expected[-1], atol=1e-9)


def test_train_forward_outputs(tiny):
    cfg, model, state, logits = tiny
    graphdef = nnx.split(model)[0]
    tokens = _tokens(12, (2, 40), cfg.vocab_size)

    dense = jax.jit(lambda s: nnx.merge(graphdef, s).forward_train(tokens, sparse_attention=False,
                                                                   indexer_loss=True))(state)
    assert float(dense.indexer_loss) >= 0 and 0 <= float(dense.indexer_recall) <= 1 + 1e-6
    assert int(dense.dropped_tokens) == 0
    out = jax.jit(lambda s: nnx.merge(graphdef, s).forward_train(tokens, indexer_loss=True))(state)
    assert out.hidden.shape == (2, 40, cfg.hidden_size) and len(out.mtp_hidden) == 1
    n_learned = cfg.num_hidden_layers - cfg.num_hash_layers + cfg.num_nextn_predict_layers
    assert out.expert_counts.shape == (n_learned, cfg.n_routed_experts)
    assert out.hash_expert_counts.shape == (cfg.num_hash_layers, cfg.n_routed_experts)
    assert float(out.indexer_loss) >= 0 and 0 <= float(out.indexer_recall) <= 1 + 1e-6
    np.testing.assert_allclose(np.asarray(out.hidden @ model.head[...]),
                               np.asarray(logits(state, tokens, *_plain((2, 40)))), atol=1e-4)


def test_bf16_forward_tracks_f32(tiny):
    cfg, model, _, _ = tiny
    from tests.conftest import TOLERANCES

    graphdef, state = nnx.split(model)
    bf16_graphdef = nnx.split(nnx.eval_shape(lambda: DeepseekV4(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))))[0]
    bf16 = nnx.merge(bf16_graphdef, state)
    tokens = _tokens(13, (1, 24), cfg.vocab_size)
    a = jax.jit(lambda t: model(t))(tokens)
    b = jax.jit(lambda t: bf16(t))(tokens)
    assert b.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(a)))
    assert float(jnp.max(jnp.abs(a - b))) < TOLERANCES["bf16_vs_f32_logits_rel"] * scale


def test_forward_on_eight_devices(tiny):
    cfg, _, state, logits = tiny
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    tokens = jax.device_put(_tokens(14, (8, 20), cfg.vocab_size), NamedSharding(mesh, P("data")))
    seg, pos = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in _plain((8, 20)))
    out = logits(state, tokens, seg, pos)
    ref = logits(state, *(jax.device_put(a, jax.devices()[0]) for a in (tokens, seg, pos)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("name, total, with_mtp, active", [
    ("flash", 284.3e9, None, 13.3e9),
    ("pro", 1573e9, 1599e9, 48.9e9),
])
def test_model_stats_match_the_published_sizes(name, total, with_mtp, active):
    s = model_stats(get_config(name))
    assert abs(s["total_params"] / total - 1) < 0.01
    assert abs(s["active_params"] / active - 1) < 0.01
    if with_mtp:
        assert abs(s["total_params_with_mtp"] / with_mtp - 1) < 0.01


def test_grouped_experts_equal_dense_experts():
    cfg = get_config("tiny")
    k = jax.random.split(jax.random.key(15), 6)
    n, d, f, e = 37, cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    x = jax.random.normal(k[0], (n, d))
    w1, w3 = (0.3 * jax.random.normal(kk, (e, d, f)) for kk in k[1:3])
    w2 = 0.3 * jax.random.normal(k[3], (e, f, d))
    idx = jnp.argsort(jax.random.uniform(k[4], (n, e)), axis=-1)[:, :2].astype(jnp.int32)
    idx = idx.at[:, 0].set(jnp.where(jnp.arange(n) < 20, 3, idx[:, 0]))  # a crowded expert
    idx = jnp.where(idx == 5, 6, idx)  # and an empty one
    idx = idx.at[:, 1].set(jnp.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % e, idx[:, 1]))
    w = jax.random.uniform(k[5], (n, 2))

    def both(x, w1, w3, w2):
        return (moe.routed_experts_reference(x, idx, w, w1, w3, w2, 10.0),
                moe.routed_experts_grouped(x, idx, w, w1, w3, w2, 10.0))

    dense, grouped = jax.jit(both)(x, w1, w3, w2)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), atol=1e-5)
    gd = jax.jit(jax.grad(lambda *a: jnp.sum(both(*a)[0] ** 2), argnums=(0, 1, 3)))(x, w1, w3, w2)
    gg = jax.jit(jax.grad(lambda *a: jnp.sum(both(*a)[1] ** 2), argnums=(0, 1, 3)))(x, w1, w3, w2)
    for a, b in zip(gd, gg):
        scale = float(np.abs(np.asarray(a)).max())  # grads reach ~2,000-4,000
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                   atol=TOLERANCES["reordered_f32_grads_of_scale"] * scale)


def test_full_remat_gives_the_same_gradients_and_recomputes_every_block():
    # Prefix (hash-routed CSA layer), a scanned unit (HCA, repeated twice) and MTP: every place a block runs.
    short = dict(num_hidden_layers=3, compress_ratios=(4, 16, 16, 0), num_hash_layers=1, vocab_size=512)
    tokens = _tokens(16, (2, 32), 512)
    grads, jaxprs = {}, {}
    for policy in ("none", "full"):
        cfg = get_config("tiny", remat_policy=policy, **short)
        graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
        if policy == "none":
            params = jax.tree.map(lambda v: v.replace(0.05 * jax.random.normal(jax.random.key(v.value.size),
                                                                                 v.value.shape)), params,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))
            rest = jax.tree.map(lambda v: v.replace(jnp.zeros(v.value.shape, v.value.dtype)), rest,
                                is_leaf=lambda x: isinstance(x, nnx.Variable))
            values = (params, rest)

        def loss(p, r, graphdef=graphdef):
            out = nnx.merge(graphdef, p, r).forward_train(tokens)
            return jnp.mean(out.hidden ** 2) + jnp.mean(out.mtp_hidden[0] ** 2)

        traced = jax.jit(jax.grad(loss)).trace(*values)  # one trace gives the jaxpr and the compiled gradient
        jaxprs[policy] = str(traced.jaxpr)
        grads[policy] = traced.lower().compile()(*values)
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    # remat2 = jax.checkpoint after differentiation; the model uses some inside layers whatever the policy.
    assert jaxprs["full"].count("remat2[") >= jaxprs["none"].count("remat2[") + 3  # prefix, scanned unit, MTP
