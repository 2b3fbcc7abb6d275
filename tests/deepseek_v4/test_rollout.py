"""Rollouts for GRPO (deepseek_v4/rollout.py): sampler log-probs, the kept set, keys, routing capture and replay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, inference, moe, rollout

_LOGITS = jax.random.normal(jax.random.key(3), (6, 40)) * 3.0
_KEYS = np.stack([rollout.sequence_key(0, 1, p, 0) for p in range(6)])


def _reference_kept_set(row: np.ndarray, temperature: float, top_p: float, top_k: int) -> set[int]:
    """The top-k then top-p set written out with numpy: the k most likely, then the smallest prefix (by
    probability) whose mass reaches top_p."""
    logits = row.astype(np.float64) / temperature
    order = np.argsort(-logits)
    if top_k:
        order = order[:top_k]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    return {int(i) for i, b in zip(order, before) if b < top_p}


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 1.0, 5), (1.3, 0.8, 0), (0.9, 0.6, 12)])
def test_sampler_log_probs_are_log_softmax_of_the_processed_logits_at_the_sampled_ids(temperature, top_p, top_k):
    kept = rollout.kept_width(_LOGITS.shape[1], top_p, top_k)
    tokens, logp, ids, valid = rollout.sample_with_log_probs(_LOGITS, jnp.asarray(_KEYS), jnp.int32(2),
                                                             temperature=temperature, top_p=top_p, top_k=top_k,
                                                             kept=kept)
    processed = inference.sampling_logits(_LOGITS, temperature=temperature, top_p=top_p, top_k=top_k)
    expected = jnp.take_along_axis(jax.nn.log_softmax(processed, axis=-1), tokens[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(logp, expected, rtol=1e-6)
    for b in range(_LOGITS.shape[0]):
        chosen = _reference_kept_set(np.asarray(_LOGITS[b]), temperature, top_p, top_k)
        assert int(tokens[b]) in chosen
        if kept:  # the kept ids are exactly the top-k / top-p set
            assert {int(i) for i, v in zip(ids[b], valid[b]) if v} == chosen
    if not kept:  # temperature only: the whole vocabulary is kept, nothing is stored
        assert ids.shape == (_LOGITS.shape[0], 0)


def test_draws_depend_on_the_sequence_key_and_position_only():
    kwargs = dict(temperature=1.0, top_p=1.0, top_k=0, kept=0)
    a = rollout.sample_with_log_probs(_LOGITS, jnp.asarray(_KEYS), jnp.int32(4), **kwargs)[0]
    rows = [rollout.sample_with_log_probs(_LOGITS[b:b + 1], jnp.asarray(_KEYS[b:b + 1]), jnp.int32(4), **kwargs)[0]
            for b in range(3)]
    np.testing.assert_array_equal(a[:3], np.concatenate(rows))  # a row's draw does not depend on its batch
    keys = {rollout.sequence_key(s, t, p, g).tobytes() for s in (0, 1) for t in (0, 1) for p in (0, 1) for g in (0, 1)}
    assert len(keys) == 16
    np.testing.assert_array_equal(rollout.sequence_key(5, 2, 1, 3), rollout.sequence_key(5, 2, 1, 3))


def test_kept_width():
    assert rollout.kept_width(100, 1.0, 0) == 0
    assert rollout.kept_width(100, 0.9, 0) == 100
    assert rollout.kept_width(100, 0.9, 20) == 20
    assert rollout.kept_width(10, 1.0, 20) == 10


def test_route_with_replayed_experts_takes_them_and_weights_them_by_the_current_scores():
    x = jax.random.normal(jax.random.key(0), (5, 8))
    gate = jax.random.normal(jax.random.key(1), (8, 6))
    bias = jnp.linspace(-0.5, 0.5, 6)
    scores, idx, weights = moe.route(x, gate, bias, None, 2, 1.5)
    _, idx2, weights2 = moe.route(x, gate, bias, None, 2, 1.5, expert_ids=idx)
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_allclose(weights2, weights, rtol=1e-6)
    other = (idx + 1) % 6
    _, idx3, weights3 = moe.route(x, gate, bias, None, 2, 1.5, expert_ids=other)
    picked = jnp.take_along_axis(scores, other, axis=-1)
    np.testing.assert_array_equal(idx3, other)
    np.testing.assert_allclose(weights3, picked / picked.sum(-1, keepdims=True) * 1.5, rtol=1e-6)


@pytest.mark.slow  # compiles the cached prefill / decode and one checking program per sequence length (~1 min)
def test_rollout_routing_replays_to_the_free_forward_and_log_probs_match_it():
    cfg = get_config("tiny")
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    prompts = [[5, 17, 99, 4, 250, 7], [1000, 3, 8]]
    keys = np.stack([rollout.sequence_key(0, 0, p, 0) for p in range(2)])
    out = rollout.sample_rollouts(model, prompts, keys, max_new_tokens=5, temperature=0.8, top_k=7)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forwards(state, seq, captured):
        """The free training forward, the one replaying `captured`, and the full forward's logits (one compile
        per length instead of one eager dispatch per operation)."""
        model = nnx.merge(graphdef, state)
        free = model.forward_train(seq[:, :-1])
        replayed = model.forward_train(seq[:, :-1], expert_ids=captured[:, None])
        return free.expert_ids, free.hidden, replayed.hidden, model(seq)

    for i, prompt in enumerate(prompts):
        seq = prompt + out.completions[i]
        captured = out.expert_ids[i]  # [L, T, K]
        assert captured.shape == (cfg.num_hidden_layers, len(seq) - 1, cfg.num_experts_per_tok)
        free_ids, free_hidden, replayed_hidden, logits = forwards(state, jnp.asarray([seq]), captured)
        np.testing.assert_array_equal(np.asarray(free_ids)[:, 0], captured)
        np.testing.assert_array_equal(replayed_hidden, free_hidden)
        # the sampler's log-probs are those of the full forward's logits, processed as the sampler did
        logits = logits[0, len(prompt) - 1: -1]
        processed = inference.sampling_logits(logits, temperature=0.8, top_p=1.0, top_k=7)
        lp = jnp.take_along_axis(jax.nn.log_softmax(processed, -1), jnp.asarray(out.completions[i])[:, None], -1)
        np.testing.assert_allclose(out.log_probs[i], lp[:, 0], atol=2e-4)
        np.testing.assert_array_equal(out.kept_ids[i][:, :7].shape, (len(out.completions[i]), 7))
