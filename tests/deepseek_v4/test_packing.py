"""Per-document compression (docs/packing.md): every document of a packed row gets the logits, loss and gradients
it gets alone, whatever its offset in the row, in the reference and the Pallas (interpret) attention paths; and
inputs shorter than the compression ratios work."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, attention, get_config

# Document lengths per row (none a multiple of 4 or 16, the tiny ratios); the rest of each row is padding.
LAYOUTS = ((13, 6, 23), (30, 9))
T = 47


# Tiny cut to a hash-routed CSA layer (ratio 4), a learned-routed HCA layer (ratio 16, scanned) and the sliding-window
# MTP layer, with a 512-token vocabulary: every attention kind and block position, a third of tiny's compile.
SHORT = dict(num_hidden_layers=2, compress_ratios=(4, 16, 0), num_hash_layers=1, vocab_size=512)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_config("tiny", **SHORT)
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return cfg, graphdef, (params, rest)


def _packed_batch(vocab):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (len(LAYOUTS), T)).astype(np.int32)
    seg = np.zeros((len(LAYOUTS), T), np.int32)
    pos = np.zeros((len(LAYOUTS), T), np.int32)
    targets = rng.integers(0, vocab, (len(LAYOUTS), T)).astype(np.int32)
    for b, lengths in enumerate(LAYOUTS):
        start = 0
        for doc, n in enumerate(lengths, start=1):
            seg[b, start:start + n] = doc
            pos[b, start:start + n] = np.arange(n)
            start += n
    return tokens, seg, pos, targets


def _doc_losses(graphdef, rest, params, tokens, seg, pos, targets):
    """Cross entropy summed over the real tokens, and the logits."""
    logits = nnx.merge(graphdef, params, rest)(tokens, seg, pos)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(seg > 0, ce, 0.0)), logits


def _run(graphdef, state, tokens, seg, pos, targets, impl):
    with attention.kernel_implementation(impl, interpret=None if impl == "reference" else True):
        params, rest = state
        fn = jax.jit(jax.value_and_grad(functools.partial(_doc_losses, graphdef, rest), has_aux=True))
        return fn(params, tokens, seg, pos, targets)


def _alone_batch(tokens, pos, targets):
    """Each packed document alone in a row of its own, from the row's first token (rows as long as the longest
    document; a shorter document is followed by padding), and where each one sits in the packed batch."""
    docs = [(b, start, n) for b, lengths in enumerate(LAYOUTS) for start, n in zip(np.cumsum((0,) + lengths), lengths)]
    width = max(n for _, _, n in docs)
    alone = [np.zeros((len(docs), width), np.int32) for _ in range(4)]
    for row, (b, start, n) in enumerate(docs):
        for dst, src in zip(alone, (tokens, None, pos, targets)):
            dst[row, :n] = 1 if src is None else src[b, start:start + n]
    return alone, docs


@pytest.mark.slow  # two forward+backward compiles per path (packed rows, the documents alone): 30-60 s each
@pytest.mark.parametrize("impl", ["reference", "pallas_gpu", "pallas_tpu"])
def test_packed_documents_equal_the_documents_alone(tiny, impl):
    """Logits, loss and parameter gradients of each packed document equal those of the document run alone
    (float32, < 1e-5): compression windows start at each document's first token, whatever its row offset."""
    cfg, graphdef, state = tiny
    tokens, seg, pos, targets = _packed_batch(cfg.vocab_size)
    (loss, logits), grads = _run(graphdef, state, tokens, seg, pos, targets, impl)
    alone, docs = _alone_batch(tokens, pos, targets)
    (want_loss, logits_alone), want_grads = _run(graphdef, state, *alone, impl)  # summed over the documents
    for row, (b, start, n) in enumerate(docs):
        np.testing.assert_allclose(np.asarray(logits[b, start:start + n]), np.asarray(logits_alone[row, :n]),
                                   atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)))
    assert err <= 1e-5 * max(scale, 1.0), (err, scale)


def test_entry_slots_follow_each_document():
    """Entry j of a document ends at its token (j+1)*m - 1; a tail shorter than m gives no entry."""
    seg = jnp.asarray([[1] * 6 + [2] * 9 + [0] * 2], jnp.int32)  # T = 17, m = 4: C = 5 slots
    slots = attention.entry_slots(seg, 4)
    ends = [int(e) for e, s in zip(slots.end[0], slots.segment[0]) if s >= 0]
    segs = [int(s) for s in slots.segment[0] if s >= 0]
    assert ends == [3, 9, 13] and segs == [1, 2, 2]  # doc 1: rows 0-3; doc 2 (from row 6): rows 6-9, 10-13
    assert [bool(h) for h, s in zip(slots.has_previous[0], slots.segment[0]) if s >= 0] == [False, False, True]


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_indexer_loss(graphdef, state, tokens):
    """One compile per length (the persistent cache keeps it) instead of one eager dispatch per operation."""
    model = nnx.merge(graphdef, *state)
    return model(tokens), model.forward_train(tokens, indexer_loss=True).indexer_loss


@pytest.mark.parametrize("length", [1, 3, 15])
def test_inputs_shorter_than_the_largest_ratio(tiny, length):
    cfg, graphdef, state = tiny
    tokens = jnp.arange(length, dtype=jnp.int32)[None] % cfg.vocab_size
    out, indexer_loss = _forward_and_indexer_loss(graphdef, state, tokens)
    assert out.shape == (1, length, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(out)))
    assert bool(jnp.isfinite(indexer_loss))
