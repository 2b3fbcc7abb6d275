"""The indexer's two objectives (docs/training.md): the sparse phase's selected-set KL from [B, T, K] tensors and
the warm-up's dense KL computed by query blocks, each against a brute-force computation from dense tensors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import DeepseekV4, attention, get_config
from pallas_kernels.dense_attention import dense_attention_and_entry_mass
from pallas_kernels.lightning_indexer import indexer_scores, lightning_indexer, selected_indexer_scores
from pallas_kernels.sparse_attention import selected_entry_mass, sparse_attention_and_selected_mass
from tests.pallas_kernels.attention_cases import brute_force_attention, sparse_mask

B, T, N, H, NI, HI, RATIO, WINDOW, TOPK = 2, 37, 3, 16, 2, 8, 4, 8, 3


@functools.cache  # one problem for both tests (jax arrays are immutable)
def _problem():
    rng = np.random.default_rng(7)
    seg = np.zeros((B, T), np.int32)
    seg[0, :14], seg[0, 14:33] = 1, 2  # two documents and padding
    seg[1] = 1
    slots = attention.entry_slots(jnp.asarray(seg), RATIO)
    C = slots.end.shape[1]
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    attn = dict(q=f(B, T, N, H), kv=f(B, T, H), entries=f(B, C, H), sink=f(N))
    idx = dict(q_idx=f(B, T, NI, HI), k_idx=f(B, C, HI), w_idx=f(B, T, NI))
    topk = lightning_indexer(idx["q_idx"], idx["k_idx"], idx["w_idx"], slots.segment, jnp.asarray(seg), ratio=RATIO,
                             topk=TOPK, entry_end=slots.end)
    return seg, slots, attn, idx, topk


def _kl_brute(target_mass, scores, valid):
    """float64 mean over queries with target mass of KL(normalised target || softmax(scores over valid))."""
    target_mass, scores = np.asarray(target_mass, np.float64), np.asarray(scores, np.float64)
    kls = []
    for b in range(target_mass.shape[0]):
        for t in range(target_mass.shape[1]):
            v = np.asarray(valid[b, t])
            if not v.any() or target_mass[b, t][v].sum() <= 0:
                continue
            p = target_mass[b, t][v] / target_mass[b, t][v].sum()
            s = scores[b, t][v]
            logq = s - s.max() - np.log(np.sum(np.exp(s - s.max())))
            kls.append(np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - logq), 0)))
    return float(np.mean(kls))


def test_selected_set_kl_matches_brute_force_from_dense_tensors():
    seg, slots, a, i, topk = _problem()
    segj = jnp.asarray(seg)

    @jax.jit
    def sparse_phase(a, i):  # one compile instead of one eager dispatch per operation
        out, mass = sparse_attention_and_selected_mass(a["q"], a["kv"], a["entries"], topk, a["sink"], segj,
                                                       window=WINDOW)
        loss, recall = attention.selected_set_kl(mass, selected_indexer_scores(i["q_idx"], i["k_idx"], i["w_idx"],
                                                                               topk), topk)
        # The gradient reaches the indexer's inputs only through the selected scores.
        g = jax.grad(lambda q: attention.selected_set_kl(
            mass, selected_indexer_scores(q, i["k_idx"], i["w_idx"], topk), topk)[0])(i["q_idx"])
        return out, mass, loss, recall, g

    out, mass, loss, recall, g = sparse_phase(a, i)
    # Brute force: full [T, T + C] probabilities of the sparse attention and dense [T, C] indexer scores, gathered.
    C = slots.end.shape[1]
    mask = sparse_mask(seg, np.asarray(topk), WINDOW, C)
    want_out, p = jax.jit(brute_force_attention)(a["q"], a["kv"], a["entries"], a["sink"], mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=1e-5)
    dense_mass = np.asarray(p[..., T:].sum(axis=2))  # [B, T, C]
    dense_scores = np.asarray(jax.jit(functools.partial(indexer_scores, ratio=RATIO))(
        i["q_idx"], i["k_idx"], i["w_idx"], slots.segment, segj, entry_end=slots.end))
    sel = np.maximum(np.asarray(topk), 0)
    valid = np.asarray(topk) >= 0
    sel_mass = np.where(valid, np.take_along_axis(dense_mass, sel, -1), 0.0)
    np.testing.assert_allclose(np.asarray(mass), sel_mass, atol=1e-6)
    alone = jax.jit(functools.partial(selected_entry_mass, window=WINDOW))(a["q"], a["kv"], a["entries"], topk,
                                                                          a["sink"], segj)
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(mass))  # the model's call: the same pass
    want = _kl_brute(sel_mass, np.take_along_axis(dense_scores, sel, -1), valid)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    assert 0.0 <= float(recall) <= 1.0 + 1e-6
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


def test_dense_kl_by_query_blocks_equals_the_dense_formula():
    seg, slots, a, i, topk = _problem()
    segj = jnp.asarray(seg)

    def blocked(q_idx, k_idx, w_idx):
        return attention.dense_indexer_kl(a["q"], a["kv"], a["entries"], slots, a["sink"], segj, q_idx, k_idx, w_idx,
                                          topk, ratio=RATIO, window=WINDOW)

    def dense(q_idx, k_idx, w_idx):  # the [B, T, C] formula
        _, mass = dense_attention_and_entry_mass(a["q"], a["kv"], a["entries"], slots.segment, a["sink"], segj,
                                                 ratio=RATIO, window=WINDOW, entry_end=slots.end)
        scores = indexer_scores(q_idx, k_idx, w_idx, slots.segment, segj, ratio=RATIO, entry_end=slots.end)
        kl, target, has = attention._kl_terms(mass, scores, jnp.isfinite(scores))
        picked = jnp.sum(jnp.take_along_axis(target, jnp.maximum(topk, 0), -1) * (topk >= 0), -1)
        n = jnp.maximum(jnp.sum(has), 1)
        return jnp.sum(jnp.where(has, kl, 0.0)) / n, jnp.sum(jnp.where(has, picked, 0.0)) / n

    def value_and_grads(kl):  # one compile per formula instead of one eager dispatch per operation
        return jax.jit(jax.value_and_grad(kl, argnums=(0, 1, 2), has_aux=True))

    args = (i["q_idx"], i["k_idx"], i["w_idx"])
    ((lb, rb), gb), ((ld, rd), gd) = value_and_grads(blocked)(*args), value_and_grads(dense)(*args)
    np.testing.assert_allclose([float(lb), float(rb)], [float(ld), float(rd)], rtol=1e-5, atol=1e-7)
    for x, y in zip(gb, gd):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@functools.cache
def _abstract_tiny():
    """Tiny's (graphdef, params, rest) as shapes only: tracing needs no parameter values, so none are initialised."""
    return nnx.split(nnx.eval_shape(lambda: DeepseekV4(get_config("tiny"), rngs=nnx.Rngs(0))), nnx.Param, ...)


def _shapes_in_train_step(**kw):
    """Every intermediate shape of the jaxpr of a training step's gradient (tiny, T = 1600: CSA C = 400)."""
    graphdef, params, rest = _abstract_tiny()
    tokens = jnp.zeros((1, 1600), jnp.int32)

    def loss(p, r):
        out = nnx.merge(graphdef, p, r).forward_train(tokens, indexer_loss=True, **kw)
        return jnp.sum(out.hidden) + out.indexer_loss

    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(jax.core, "jaxprs_in_params") else []:
                walk(sub)
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    walk(inner)
                elif isinstance(p, (tuple, list)):
                    for q in p:
                        q = getattr(q, "jaxpr", q)
                        if hasattr(q, "eqns"):
                            walk(q)

    walk(jax.make_jaxpr(jax.grad(loss))(params, rest).jaxpr)
    return shapes


def test_no_query_by_entry_tensor_in_a_sparse_training_step():
    """Forward and backward of a sparse-phase step with the indexer loss hold no tensor with a C = 400 axis and
    T * C or more elements (T = 1600; also no stack of per-block [Q, C] pieces); the earlier dense-mass objective
    does (so the check can see one)."""
    def has_t_by_c(shapes):
        return [s for s in shapes if 400 in s and np.prod(s) >= 1600 * 400]

    assert has_t_by_c(_shapes_in_train_step()) == []
    assert has_t_by_c(_shapes_in_train_step(dense_target_in_sparse_phase=True))
    assert has_t_by_c(_shapes_in_train_step(sparse_attention=False)) == []  # the warm-up's dense KL, by blocks
