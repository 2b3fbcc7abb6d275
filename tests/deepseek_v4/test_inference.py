"""Generation with the compressed KV cache: decoded logits equal the full forward's, sampling, generate(), MTP
speculative decoding. Tiny config: window 16, CSA ratio 4 (index top-k 8), HCA ratio 16; float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, inference

EXACT = 1e-4  # float32 decode against the full forward (only summation order differs)
T = 48  # past CSA's top-k (8 entries from position 35 on), three HCA windows, three window wrap-arounds
# The long prompt's rows and cache; generate() runs with the same cache size, its check on rows this long, so the
# two slow tests share their decode step and full forward (a compile each).
LONG = 320


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny")
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    full = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    return cfg, model, state, full


def _tokens(seed, shape, vocab):
    return np.asarray(jax.random.randint(jax.random.key(seed), shape, 2, vocab, jnp.int32))


def _decode_errors(model, state, tokens, lengths, max_len, chunk):
    """Prefill each row's first lengths[b] tokens, then decode the rest of the row teacher-forced.

    Returns the decoded float32 logits [B, T, V] (NaN where not produced: before each prompt's last token).
    """
    b, t = tokens.shape
    out = np.full((b, t, model.cfg.vocab_size), np.nan, np.float32)
    logits, _, cache = inference.prefill(model, [list(r[:n]) for r, n in zip(tokens, lengths)], max_len, chunk)
    out[np.arange(b), np.asarray(lengths) - 1] = np.asarray(logits)
    decode = inference._steps(nnx.graphdef(model))[1]
    pos = np.asarray(lengths).copy()
    while pos.min() < t:
        current = tokens[np.arange(b), np.minimum(pos, t - 1)]
        _, logits, cache = decode(state, cache, jnp.asarray(current), jax.random.key(0),
                                  sampling=(True, 1.0, 1.0, 0))
        live = pos < t
        out[np.arange(b)[live], pos[live]] = np.asarray(logits)[live]
        pos += 1
    return out


def test_decode_equals_full_forward(tiny):
    """Prompts of 1, m-1, m, m+1 tokens (CSA m = 4, HCA m = 16), prefilled in chunks of 8 (one batch, different
    lengths), then decoded one token at a time to position 47: across compression boundaries, window
    wrap-around (window 16) and CSA's top-k from below (fewer than 8 entries) to above the entry count."""
    cfg, model, state, full = tiny
    lengths = [1, 3, 4, 5, 15, 16, 17, 33]
    tokens = _tokens(0, (len(lengths), T), cfg.vocab_size)
    want = np.asarray(full(state, jnp.asarray(tokens)))
    got = _decode_errors(model, state, tokens, lengths, 64, 8)
    for row, n in enumerate(lengths):
        err = np.abs(got[row, n - 1:] - want[row, n - 1:]).max()
        assert err < EXACT, (n, err)


@pytest.mark.slow
def test_long_prompt_decode_equals_full_forward(tiny):
    """A prompt of several hundred tokens (prefilled in chunks of 64), then decoding across more boundaries."""
    cfg, model, state, full = tiny
    tokens = _tokens(1, (2, LONG), cfg.vocab_size)
    lengths = [300, 287]
    want = np.asarray(full(state, jnp.asarray(tokens)))
    got = _decode_errors(model, state, tokens, lengths, LONG, 64)
    for row, n in enumerate(lengths):
        err = np.abs(got[row, n - 1:] - want[row, n - 1:]).max()
        assert err < EXACT, (n, err)


@pytest.mark.slow
def test_generate_greedy_and_speculative(tiny):
    """generate() continues each prompt with the full forward's argmax; MTP speculation gives the same tokens."""
    cfg, model, state, full = tiny
    prompts = [list(_tokens(2, (11,), cfg.vocab_size)), list(_tokens(3, (4,), cfg.vocab_size))]
    new = inference.generate(model, prompts, max_new_tokens=12, prefill_chunk=8, max_len=LONG)
    assert [len(n) for n in new] == [12, 12]
    rows = np.zeros((2, LONG), np.int32)  # zeros after each sequence: causal, so its logits are unchanged
    for i, (p, n) in enumerate(zip(prompts, new)):
        rows[i, : len(p) + len(n)] = p + n
    want = np.asarray(full(state, jnp.asarray(rows))).argmax(-1)
    for i, (p, n) in enumerate(zip(prompts, new)):
        assert n == list(want[i, len(p) - 1: len(p) + len(n) - 1])
    assert inference.generate(model, prompts, max_new_tokens=12, prefill_chunk=8, speculative=True,
                              max_len=LONG) == new


def test_sample_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 512))
    keys = jax.random.key(7)
    greedy = inference.sample(logits, keys, greedy=True, temperature=1.0, top_p=1.0, top_k=0)
    assert set(np.asarray(greedy).tolist()) == {0}

    def draws(**kw):
        return np.asarray(inference.sample(logits, keys, greedy=False, **kw))

    defaults = dict(temperature=inference.DEFAULT_TEMPERATURE, top_p=inference.DEFAULT_TOP_P, top_k=0)
    assert (inference.DEFAULT_TEMPERATURE, inference.DEFAULT_TOP_P) == (1.0, 1.0)
    free = draws(**defaults)
    assert set(free.tolist()) == {0, 1, 2, 3}  # every token is reachable at the defaults
    np.testing.assert_array_equal(free, draws(**defaults))  # seeded
    assert set(draws(temperature=1.0, top_p=1.0, top_k=2).tolist()) == {0, 1}
    assert set(draws(temperature=1.0, top_p=0.7, top_k=0).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(temperature=1.0, top_p=0.01, top_k=0).tolist()) == {0}
    cold = draws(temperature=0.05, top_p=1.0, top_k=0)
    assert (cold == 0).mean() > 0.99


def test_bad_requests(tiny):
    _, model, _, _ = tiny
    with pytest.raises(ValueError, match="max_len"):
        inference.generate(model, [[5] * 40], max_new_tokens=30, max_len=64)
    with pytest.raises(ValueError, match="non-empty"):
        inference.generate(model, [[]])
    with pytest.raises(ValueError, match="greedy"):
        inference.generate(model, [[5]], greedy=False, speculative=True)
    with pytest.raises(ValueError, match="temperature"):
        inference.generate(model, [[5]], greedy=False, temperature=0.0)
