"""Held-out evaluation: values against a direct computation, determinism, one compile, position buckets, bytes.

The evaluator runs on the toy model of test_train.py (same interface as `DeepseekV4.forward_train`), so it
compiles in seconds; the real model is evaluated by the entry-point tests (tests/experiments/test_faults.py).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import evaluation, train
from deepseek_v4 import loss as loss_lib
from deepseek_v4.tokenizer import get_tokenizer
from tests.deepseek_v4.test_train import V, _batch, _Toy


def _batches():
    return [_batch(b=4, t=1100, seed=seed) for seed in range(3)]  # rows 2-3: one document, positions up to 1099


@pytest.fixture(scope="module")
def setup():
    model = _Toy(nnx.Rngs(0))
    tx = train.make_optimizer(train.TrainSettings(optimizer="adamw", steps=10))
    graphdef, state = train.init_state(model, tx, seed=0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    table = np.arange(V, dtype=np.int32) % 5  # bytes per token id (some 0, like BOS / EOS)
    ev = evaluation.Evaluator(graphdef, _batches(), sharding, byte_lengths=table, loss_chunk=16)
    return model, state, ev, table


def _direct(model, batches, table):
    """Losses from all logits at once, in numpy."""
    nll_sum = tokens = bytes_ = 0.0
    mtp_sum = mtp_tokens = 0.0
    pos = {(0, 1024): [0.0, 0.0], (1024, 4096): [0.0, 0.0]}
    for b in batches:
        out = model.forward_train(jnp.asarray(b["tokens"]), jnp.asarray(b["segment_ids"]), jnp.asarray(b["positions"]))
        logp = np.asarray(jax.nn.log_softmax(out.hidden @ model.head[...], axis=-1))  # [B, T, V]
        nll = -np.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
        valid = b["segment_ids"] != 0
        nll_sum += nll[valid].sum()
        tokens += valid.sum()
        bytes_ += table[b["targets"]][valid].sum()
        for (lo, hi), acc in pos.items():
            sel = valid & (b["positions"] >= lo) & (b["positions"] < hi)
            acc[0] += nll[sel].sum()
            acc[1] += sel.sum()
        logp1 = np.asarray(jax.nn.log_softmax(out.mtp_hidden[0] @ model.head[...], axis=-1))
        for r in range(b["tokens"].shape[0]):  # depth 1: position t predicts targets[t + 1] of its own document
            for t in range(b["tokens"].shape[1] - 1):
                if valid[r, t] and b["segment_ids"][r, t + 1] == b["segment_ids"][r, t]:
                    mtp_sum -= logp1[r, t, b["targets"][r, t + 1]]
                    mtp_tokens += 1
    rec = {"eval_loss": nll_sum / tokens, "eval_mtp_loss": mtp_sum / mtp_tokens,
           "eval_bits_per_byte": nll_sum / math.log(2) / bytes_}
    for (lo, hi), (s, n) in pos.items():
        rec[evaluation.bucket_key(lo, hi)] = s / n
    return rec


def test_metrics_match_a_direct_computation(setup):
    model, state, ev, table = setup
    got = ev(state)
    want = _direct(model, _batches(), table)
    assert set(want) <= set(got)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
    assert got["eval_tokens"] == sum(int((b["segment_ids"] != 0).sum()) for b in _batches())


def test_same_batches_every_call_and_one_compile(setup):
    _, state, ev, _ = setup
    first = ev(state)
    again = ev(state)
    assert first == again  # bit-identical: the same batches, the same function
    assert ev.traces == 1  # traced once for all calls (sparse mode); no recompile per call


def test_position_buckets_and_their_names():
    assert evaluation.position_buckets(128) == [(0, 1024)]
    assert evaluation.position_buckets(1024) == [(0, 1024)]
    assert evaluation.position_buckets(1025) == [(0, 1024), (1024, 4096)]
    assert [evaluation.bucket_key(*b) for b in evaluation.position_buckets(1 << 20)] == [
        "eval_loss_pos_0-1K", "eval_loss_pos_1K-4K", "eval_loss_pos_4K-16K", "eval_loss_pos_16K-64K",
        "eval_loss_pos_64K-256K", "eval_loss_pos_256K-1M"]


def test_eval_settings_are_checked():
    with pytest.raises(ValueError, match="--eval_batches must be >= 1"):
        evaluation.EvalSettings(eval_batches=0)
    with pytest.raises(ValueError, match="--eval_every must be >= 0"):
        evaluation.EvalSettings(eval_every=-1)
    s = evaluation.EvalSettings(eval_every=10)
    assert [n for n in range(1, 26) if s.due(n, 25)] == [10, 20, 25]
    assert not evaluation.EvalSettings(eval_every=0).due(25, 25)


def test_token_cross_entropy_matches_the_reference():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((3, 7, 8)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((8, 33)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 33, (3, 7)), jnp.int32)
    got = loss_lib.token_cross_entropy(hidden, head, targets, chunk_size=4)  # 21 tokens: a padded last chunk
    logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)[..., 0]
    want = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_byte_lengths_count_the_utf8_bytes_of_the_text():
    tok = get_tokenizer()
    table = tok.byte_lengths()
    text = "Naïve café — “quoted” 日本語, with 123456 numbers.\n\nFin"
    ids = tok.encode_document(text)  # BOS and EOS count no bytes
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[tok.bos_id] == 0 and table[tok.eos_id] == 0
