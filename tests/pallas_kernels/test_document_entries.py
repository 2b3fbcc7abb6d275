"""Entries compressed per document (docs/packing.md): slot c holds the entry whose last token is in rows
[c*m, (c+1)*m), `entry_end` gives that row. Dense attention and the lightning indexer (reference and both Pallas
styles in interpret mode) against brute force built from the rule `entry_end[c] <= t`, values and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dense_attention import dense_attention, pallas_gpu, pallas_tpu
from pallas_kernels.lightning_indexer import indexer_scores, lightning_indexer
from pallas_kernels.lightning_indexer import pallas_gpu as indexer_gpu
from pallas_kernels.lightning_indexer import pallas_tpu as indexer_tpu
from tests.conftest import TOLERANCES
from tests.pallas_kernels.attention_cases import Case, brute_force_attention, compare, matches_reference, segments

# Documents at offsets that are not multiples of the ratio; T = 45 gives C = ceil(45 / 4) = 12 slots.
CASE = Case(T=45, window=16, ratio=4, topk=5, layouts=((10, 21, 9), (7, 38)), NI=2, HI=16)
BLOCKS = {
    "pallas_tpu": pallas_tpu.BlockSizes(block_q=16, block_kv=16, block_e=8, block_q_dkv=16, block_kv_dkv=16),
    "pallas_gpu": pallas_gpu.BlockSizes(block_kv=16, block_e=8, block_kv_dkv=16),
}
INDEXER_BLOCKS = {
    "pallas_tpu": indexer_tpu.BlockSizes(block_q=8, block_c=8, chunk_q=16),
    "pallas_gpu": indexer_gpu.BlockSizes(block_q=8, block_c=8, chunk_q=16),
}


def document_slots(seg: np.ndarray, ratio: int) -> tuple[np.ndarray, np.ndarray]:
    """(entry_segment, entry_end) [B, ceil(T/m)] by the per-document rule, written with loops."""
    B, T = seg.shape
    C = -(-T // ratio)
    eseg = np.full((B, C), -1, np.int32)
    eend = np.tile((np.arange(C, dtype=np.int32) + 1) * ratio - 1, (B, 1))
    for b in range(B):
        start = 0
        while start < T:
            stop = start
            while stop < T and seg[b, stop] == seg[b, start]:
                stop += 1
            for end in range(start + ratio - 1, stop, ratio):
                assert eseg[b, end // ratio] == -1
                eseg[b, end // ratio], eend[b, end // ratio] = seg[b, start], end
            start = stop
    return eseg, eend


@functools.cache
def problem():
    rng = np.random.default_rng(3)
    seg = segments(CASE)
    eseg, eend = document_slots(seg, CASE.ratio)
    C = eseg.shape[1]
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    attn = (f(CASE.B, CASE.T, CASE.N, CASE.H), f(CASE.B, CASE.T, CASE.H), f(CASE.B, C, CASE.H), jnp.asarray(eseg),
            jnp.asarray(eend), f(CASE.N), jnp.asarray(seg))
    idx = (f(CASE.B, CASE.T, CASE.NI, CASE.HI), f(CASE.B, C, CASE.HI), f(CASE.B, CASE.T, CASE.NI), jnp.asarray(eseg),
           jnp.asarray(eend), jnp.asarray(seg))
    return seg, eseg, eend, attn, idx


def admissible(seg, eseg, eend, b, t):
    return [c for c in range(eseg.shape[1]) if eend[b, c] <= t and eseg[b, c] == seg[b, t]]


def dense_fn(impl, interpret=False):
    def fn(q, kv, entries, eseg, eend, sink, seg):
        kw = {} if impl == "reference" else {"block_sizes": BLOCKS[impl], "interpret": interpret}
        return dense_attention(q, kv, entries, eseg, sink, seg, ratio=CASE.ratio, window=CASE.window,
                               entry_end=eend, impl=impl, **kw)

    return fn


def test_dense_reference_matches_brute_force():
    seg, eseg, eend, args, _ = problem()
    B, T, C = CASE.B, CASE.T, eseg.shape[1]
    mask = np.zeros((B, T, T + C), bool)
    for b in range(B):
        for t in range(T):
            for j in range(T):
                mask[b, t, j] = t - CASE.window < j <= t and seg[b, j] == seg[b, t]
            for c in admissible(seg, eseg, eend, b, t):
                mask[b, t, T + c] = True

    def brute(q, kv, entries, eseg, eend, sink, seg):
        return brute_force_attention(q, kv, entries, sink, mask)[0]

    matches_reference(dense_fn("reference"), brute, args, TOLERANCES["kernel_f32"], argnums=(0, 1, 2, 5),
                      name="dense reference, per-document entries")


@pytest.mark.parametrize("impl", sorted(BLOCKS))
def test_dense_pallas_matches_reference(impl, interpret):
    *_, args, _ = problem()
    matches_reference(dense_fn(impl, interpret(impl)), dense_fn("reference"), args, TOLERANCES["kernel_f32"],
                      argnums=(0, 1, 2, 5),
                      name=f"dense {impl}, per-document entries")


def test_indexer_scores_match_brute_force():
    seg, eseg, eend, _, (q_idx, k_idx, w, *_rest) = problem()
    got = indexer_scores(q_idx, k_idx, w, jnp.asarray(eseg), jnp.asarray(seg), ratio=CASE.ratio,
                         entry_end=jnp.asarray(eend))
    q64, k64, w64 = (np.asarray(a, np.float64) for a in (q_idx, k_idx, w))
    want = np.full(got.shape, -np.inf)
    for b in range(CASE.B):
        for t in range(CASE.T):
            for c in admissible(seg, eseg, eend, b, t):
                dots = np.maximum(q64[b, t] @ k64[b, c], 0.0)
                want[b, t, c] = np.sum(w64[b, t] * CASE.NI**-0.5 * dots * CASE.HI**-0.5)
    assert np.array_equal(np.isinf(np.asarray(got)), np.isinf(want))
    finite = np.isfinite(want)
    compare("indexer scores, per-document entries", np.asarray(got)[finite], want[finite], TOLERANCES["kernel_f32"])


@pytest.mark.parametrize("impl", sorted(INDEXER_BLOCKS))
def test_indexer_pallas_matches_reference(impl, interpret):
    *_, (q_idx, k_idx, w, eseg, eend, seg) = problem()
    want = lightning_indexer(q_idx, k_idx, w, eseg, seg, ratio=CASE.ratio, topk=CASE.topk, entry_end=eend,
                             impl="reference")
    got = jax.jit(functools.partial(lightning_indexer, ratio=CASE.ratio, topk=CASE.topk, impl=impl,
                                    block_sizes=INDEXER_BLOCKS[impl], interpret=interpret(impl)))(
        q_idx, k_idx, w, eseg, seg, entry_end=eend)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_entry_end_raises_value_error():
    *_, args, _ = problem()
    q, kv, entries, eseg, eend, sink, seg = args
    with pytest.raises(ValueError, match="entry_end"):
        dense_attention(q, kv, entries, eseg, sink, seg, ratio=CASE.ratio, entry_end=eend[:, :1])
