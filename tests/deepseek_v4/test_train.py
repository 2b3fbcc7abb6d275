"""The train step: gradient accumulation, skipped non-finite steps, the router-bias update, MTP weight switch.

The mechanics are checked on a toy model with the same interface as `DeepseekV4.forward_train` (it compiles in
seconds). The real model's train step is exercised through the entry point in tests/experiments/test_faults.py,
whose reference run is the smoke test (the loss falls over 12 steps).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import train
from deepseek_v4.config import get_config
from deepseek_v4.layers import RouterBias

V, D, E, K = 64, 16, 4, 2


@dataclasses.dataclass
class _Out:
    hidden: jax.Array
    mtp_hidden: tuple
    expert_counts: jax.Array
    hash_expert_counts: jax.Array
    balance_loss: jax.Array
    dropped_tokens: jax.Array
    indexer_loss: jax.Array
    indexer_recall: jax.Array


class _Shared(nnx.Module):
    def __init__(self, rngs):
        self.w1 = nnx.Param(jax.random.normal(rngs.params(), (D, 2 * D)) * 0.3, logical_axes=("embed", "mlp"))
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (2 * D, D)) * 0.3, logical_axes=("mlp", "embed"))


class _FFN(nnx.Module):
    def __init__(self, rngs):
        self.gate = nnx.Param(jax.random.normal(rngs.params(), (D, E)) * 0.3, logical_axes=("embed", None))
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32))
        self.shared = _Shared(rngs)


class _Toy(nnx.Module):
    """Embedding -> one MLP -> head; a router that only produces expert counts and a balance loss."""

    def __init__(self, rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, D)) * 0.3, logical_axes=("vocab", "embed"))
        self.head = nnx.Param(jax.random.normal(rngs.params(), (D, V)) * 0.3, logical_axes=("embed", "vocab"))
        self.ffn = _FFN(rngs)

    def forward_train(self, tokens, segment_ids, positions, *, sparse_attention=True, indexer_loss=False):
        x = self.embed[...][tokens]
        h = x + jnp.tanh(x @ self.ffn.shared.w1[...]) @ self.ffn.shared.w2[...]
        scores = jax.nn.softmax(h @ self.ffn.gate[...], axis=-1)
        _, top = jax.lax.top_k(scores + self.ffn.router_bias[...], K)
        valid = (segment_ids != 0).astype(jnp.float32)
        per_row = jnp.sum(jax.nn.one_hot(top, E) * valid[..., None, None], axis=(1, 2))  # [B, E]
        counts = jnp.sum(per_row, axis=0)
        # Per sequence f_i * P_i, averaged over sequences (so microbatches average to the full batch).
        balance = jnp.mean(jnp.sum(per_row / tokens.shape[1] * jnp.mean(scores, axis=1), axis=-1)) * E
        return _Out(hidden=h, mtp_hidden=(0.5 * h,), expert_counts=counts[None], hash_expert_counts=counts[None],
                    balance_loss=balance, dropped_tokens=jnp.float32(0.0), indexer_loss=jnp.float32(0.25),
                    indexer_recall=jnp.float32(1.0))

    def context_size(self, length):
        return 1  # never split over a context axis

    def update_router_bias(self, expert_counts, speed):
        signs = jnp.sign(jnp.mean(expert_counts, axis=-1, keepdims=True) - expert_counts)
        self.ffn.router_bias[...] = self.ffn.router_bias[...] + speed * signs[0]


def _batch(b=4, t=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, V, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[0, 8:] = 2
    seg[1, 10:] = 0  # padding
    tokens[seg == 0] = 0
    targets = np.roll(tokens, -1, axis=1)
    targets[seg == 0] = 0
    pos = np.zeros((b, t), np.int32)
    for r in range(b):
        for s in np.unique(seg[r]):
            idx = np.where(seg[r] == s)[0]
            pos[r, idx] = np.arange(len(idx))
    return {"tokens": tokens, "targets": targets, "segment_ids": seg, "positions": pos}


# One settings object for every toy test (steps=10, wsd decay over the last 5 steps), so the step compiles once
# (plus once more with grad_accum=2).
_SETTINGS = dict(steps=10, warmup_steps=0, learning_rate=1e-2, optimizer="adamw", loss_chunk=16, bias_speed=0.01,
                 schedule="wsd", decay_fraction=0.5)


class _Toyrun:
    def __init__(self, **overrides):
        self.s = train.TrainSettings(**{**_SETTINGS, **overrides})
        self.tx = train.make_optimizer(self.s)
        self.graphdef, _ = train.init_state(_Toy(nnx.Rngs(0)), self.tx, seed=0)
        self.fn = train.make_train_step(self.graphdef, get_config("tiny"), self.tx, self.s, phase="sparse")

    def state(self):
        return train.init_state(_Toy(nnx.Rngs(0)), self.tx, seed=0)[1]

    def step(self, state, batch):
        return self.fn(state, jax.tree.map(jnp.asarray, batch))


@pytest.fixture(scope="module")
def toy():
    return _Toyrun()


def _leaves(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]  # copies: the step donates its input


def test_grad_accum_matches_one_big_batch(toy):
    batch = _batch()
    accum = _Toyrun(grad_accum=2)
    new1, m1 = toy.step(toy.state(), batch)
    new2, m2 = accum.step(accum.state(), batch)
    for key in ("loss", "mtp_loss", "total_loss", "grad_norm", "balance_loss", "indexer_loss"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=key)
    for a, b in zip(_leaves(new1.params), _leaves(new2.params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(_leaves(new1.extras), _leaves(new2.extras)):
        np.testing.assert_array_equal(a, b)  # same total expert counts -> same sign update


def test_non_finite_loss_skips_the_update(toy):
    state = toy.state()
    before = _leaves(state)
    poisoned = _batch()
    poisoned["loss_weights"] = np.ones(poisoned["tokens"].shape, np.float32)
    poisoned["loss_weights"][2, 5] = np.nan  # one token's loss weight: the loss is NaN
    new, m = toy.step(state, poisoned)
    assert not bool(m["update_ok"])
    assert int(new.skipped) == 1 and int(new.step) == 1
    after = _leaves(new)
    # Everything but the step and skipped counters is bit-identical.
    n_diff = sum(not np.array_equal(a, b) for a, b in zip(before, after))
    assert n_diff == 2
    # A good step afterwards updates again, and the optimizer's schedule did not advance on the bad one.
    newer, m2 = toy.step(new, _batch())
    assert bool(m2["update_ok"]) and int(newer.skipped) == 1
    assert float(m2["lr"]) == float(m["lr"])
    assert any(not np.array_equal(a, b) for a, b in zip(after, _leaves(newer)))


def test_loss_weights_scale_each_token(toy):
    ones = _batch()
    ones["loss_weights"] = np.ones(ones["tokens"].shape, np.float32)
    _, plain = toy.step(toy.state(), _batch())
    _, weighted = toy.step(toy.state(), ones)
    for key in ("loss", "mtp_loss", "tokens"):
        assert float(weighted[key]) == float(plain[key]), key
    # Weight 0 on row 3 takes it out of both cross entropies, exactly like padding would (rows do not interact).
    dropped = {**ones, "loss_weights": ones["loss_weights"].copy()}
    dropped["loss_weights"][3] = 0.0
    padded = _batch()
    padded["segment_ids"][3] = 0
    _, m_dropped = toy.step(toy.state(), dropped)
    _, m_padded = toy.step(toy.state(), padded)
    for key in ("loss", "mtp_loss", "tokens"):
        np.testing.assert_allclose(float(m_dropped[key]), float(m_padded[key]), rtol=1e-6, err_msg=key)


def test_router_bias_follows_the_sign_rule_outside_the_optimizer(toy):
    state = toy.state()
    forward = jax.jit(lambda p, e, *b: nnx.merge(toy.graphdef, p, e).forward_train(*b).expert_counts[0])
    counts = np.asarray(forward(state.params, state.extras,
                                *(jnp.asarray(_batch()[k]) for k in ("tokens", "segment_ids", "positions"))))
    new, m = toy.step(state, _batch())
    want = 0.01 * np.sign(counts.mean() - counts)
    got = np.asarray(nnx.merge(toy.graphdef, new.params, new.extras).ffn.router_bias[...])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert np.any(want != 0)
    # The bias is not a parameter: the optimizer state has no moments for it.
    assert all("router_bias" not in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        new.opt_state)[0])


def test_mtp_weight_drops_when_the_lr_decays(toy):
    state = toy.state()
    weights = []
    for i in range(7):
        state, m = toy.step(state, _batch(seed=i))
        weights.append(float(m["mtp_weight"]))
    assert toy.s.decay_start == 5
    assert weights == pytest.approx([0.3] * 5 + [0.1] * 2)


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        train.TrainSettings(grad_accum=0)
    with pytest.raises(ValueError, match="exceed steps"):
        train.TrainSettings(steps=10, warmup_steps=9, decay_fraction=0.5)
    with pytest.raises(ValueError, match="optimizer must be"):
        train.TrainSettings(optimizer="sgd")


def test_a_plugged_in_loss_shares_the_step_and_reports_its_metrics(toy):
    """`make_train_step(loss_fn=...)`: another phase's loss runs in the same step; its extra aux keys are logged."""
    def doubled(model, micro, counts, **kw):
        total, aux = train.next_token_loss(model, micro, counts, **kw)
        return 2.0 * total, {**aux, "doubled_total": 2.0 * total}

    plugged = train.make_train_step(toy.graphdef, get_config("tiny"), toy.tx, toy.s, phase="sparse", loss_fn=doubled)
    batch = jax.tree.map(jnp.asarray, _batch())
    _, plain = toy.step(toy.state(), _batch())
    _, m = plugged(toy.state(), batch)
    np.testing.assert_allclose(m["doubled_total"], 2 * plain["total_loss"], rtol=1e-6)
    np.testing.assert_allclose(m["grad_norm"], 2 * plain["grad_norm"], rtol=1e-5)
    assert float(m["loss"]) == float(plain["loss"]) and bool(m["update_ok"])
