"""Three training rules checked on their own: the global-norm clip inside the train step, the sequence-wise
balance loss against the V3/V4 formula written out, and the indexer loss's gradient reaching the indexer only
(docs/training.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, train
from deepseek_v4.moe import MoE
from deepseek_v4.params import path_keys
from tests.deepseek_v4.test_train import _batch, _Toyrun

SMALL = dict(vocab_size=1024, num_hidden_layers=2, compress_ratios=(4, 16, 0), num_hash_layers=1)


def _first_moments(opt_state):
    """AdamW's first moments (mu) by parameter path."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = [str(k) for k in path_keys(path)]
        if "mu" in names:
            out[".".join(names[names.index("mu") + 1:])] = np.asarray(x)
    return out


def test_global_norm_clip_scales_the_gradient_inside_the_step():
    # AdamW's first step is invariant to the gradient's scale, so the clip is read off its first moment:
    # mu = (1 - b1) * clipped gradient. The unclipped run gives the raw gradient and its norm.
    plain = _Toyrun(clip_norm=0.0)
    state, m = plain.step(plain.state(), _batch())
    raw = {k: v / (1 - plain.s.adam_b1) for k, v in _first_moments(state.opt_state).items()}
    norm = float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in raw.values())))
    np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-5)  # the metric is the pre-clip global norm
    assert norm > 0.1

    clip = norm / 4
    clipped = _Toyrun(clip_norm=clip)
    state_c, m_c = clipped.step(clipped.state(), _batch())
    np.testing.assert_allclose(float(m_c["grad_norm"]), norm, rtol=1e-5)
    got = {k: v / (1 - clipped.s.adam_b1) for k, v in _first_moments(state_c.opt_state).items()}
    assert got.keys() == raw.keys() and len(got) >= 5
    scale = clip / (norm + 1e-6)
    for k in raw:
        np.testing.assert_allclose(got[k], raw[k] * scale, rtol=1e-4, atol=1e-9, err_msg=k)
    clipped_norm = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in got.values()))
    np.testing.assert_allclose(clipped_norm, clip, rtol=1e-4)


def _balance_by_formula(x, gate, bias, mask, k):
    """L_bal = sum_i f_i P_i per sequence, averaged over sequences, written out with loops (DeepSeek-V3 eq. 17-20
    with V4's sqrt(softplus) affinities): f_i = E / (K T) * #{t : i in TopK(s_t + b)}, P_i = 1/T sum_t s_it / sum_j
    s_jt, over the sequence's T real tokens."""
    x, gate, bias = (np.asarray(a, np.float64) for a in (x, gate, bias))
    b, t, _ = x.shape
    e = gate.shape[1]
    per_seq = []
    for r in range(b):
        real = [i for i in range(t) if mask[r, i]]
        n = len(real)
        f, p = np.zeros(e), np.zeros(e)
        for i in real:
            s = np.sqrt(np.log1p(np.exp(x[r, i] @ gate)))
            for j in np.argsort(-(s + bias), kind="stable")[:k]:
                f[j] += e / (k * n)
            p += s / s.sum() / n
        per_seq.append(float(np.sum(f * p)))
    return float(np.mean(per_seq))


def test_balance_loss_is_the_sequence_wise_formula():
    cfg = get_config("tiny", **SMALL)
    moe = MoE(cfg, layer=1, hash_layer=False, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    moe.router_bias[...] = jnp.asarray(rng.normal(0, 0.05, cfg.n_routed_experts), jnp.float32)
    b, t = 3, 10
    x = jnp.asarray(rng.standard_normal((b, t, cfg.hidden_size)), jnp.float32)
    mask = np.ones((b, t), bool)
    mask[1, 6:] = False  # a sequence with padding: T counts its real tokens only
    graphdef, state = nnx.split(moe)
    _, stats = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, x, jnp.zeros((b, t), jnp.int32),
                                                                   jnp.asarray(mask))
    want = _balance_by_formula(x, moe.gate[...], moe.router_bias[...], mask, cfg.num_experts_per_tok)
    np.testing.assert_allclose(float(stats.balance_loss), want, rtol=1e-5)
    assert want > 0.5  # about 1 for a balanced router; clearly not a degenerate value


@pytest.mark.slow  # compiles the tiny model's forward and gradient
@pytest.mark.parametrize("sparse", [False, True], ids=["dense_warmup", "sparse"])
def test_indexer_loss_gradient_reaches_only_the_indexer(sparse):
    cfg = get_config("tiny", **SMALL)
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    graphdef, params, extras = train.split_model(model)
    t = 48  # 12 compressed entries per CSA layer, more than index_topk
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(2, cfg.vocab_size, (2, t)), jnp.int32)
    segments = jnp.asarray(np.r_[np.ones(30), 2 * np.ones(t - 30)][None].repeat(2, 0), jnp.int32)
    positions = jnp.asarray(np.r_[np.arange(30), np.arange(t - 30)][None].repeat(2, 0), jnp.int32)

    def indexer_loss(p):
        out = nnx.merge(graphdef, p, extras).forward_train(tokens, segments, positions, sparse_attention=sparse,
                                                          indexer_loss=True)
        return out.indexer_loss

    loss, grads = jax.jit(jax.value_and_grad(indexer_loss))(params)
    assert float(loss) > 0
    reached, leaked = [], []
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = ".".join(str(k) for k in path_keys(path))
        if np.any(np.asarray(g) != 0):
            (reached if ".indexer." in name else leaked).append(name)
    assert not leaked, leaked
    indexer_params = [".".join(str(k) for k in path_keys(p)) for p, _ in jax.tree_util.tree_flatten_with_path(
        params)[0] if ".indexer." in ".".join(str(k) for k in path_keys(p))]
    assert set(reached) == set(indexer_params)  # every indexer parameter learns from it
