"""`query_offset`: the kernels run on a frame cut from a longer sequence (context parallelism, docs/kernels.md).

A frame holds rows [s, s + L) of the per-document problem of test_document_entries, with `entry_end` kept in the
sequence's positions and `query_offset = s`; s < 0 puts halo rows (a segment nothing else has) before the start.
The references on a frame equal the whole sequence's rows (anchors); both Pallas styles (interpret mode) equal the
references in values and gradients at a positive and a negative offset, the offset traced (one compile each).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dense_attention import dense_attention, reference
from pallas_kernels.lightning_indexer import indexer_scores, lightning_indexer
from tests.conftest import TOLERANCES
from tests.pallas_kernels.attention_cases import compare, matches_reference
from tests.pallas_kernels.test_document_entries import BLOCKS, CASE, INDEXER_BLOCKS, problem

FRAME = 36  # rows per frame
OFFSETS = (9, -5)  # frame [9, 45) of the 45 rows; frame [5 halo rows; rows 0 .. 30]
HALO = -3  # segment id of rows before the sequence: matches no query, entry or padding


def frame_rows(a, offset: int, fill=0):
    """Rows [offset, offset + FRAME) of a [B, T, ...] array; rows before 0 hold `fill`."""
    a = jnp.asarray(a)
    if offset >= 0:
        return a[:, offset:offset + FRAME]
    pad = jnp.full((a.shape[0], -offset) + a.shape[2:], fill, a.dtype)
    return jnp.concatenate([pad, a[:, :FRAME + offset]], axis=1)


@functools.cache
def dense_frame(offset: int):
    """(q, kv, entries, eseg, eend, sink, seg, offset) of the frame; entries and their keys whole."""
    *_, (q, kv, entries, eseg, eend, sink, seg), _ = problem()
    return (frame_rows(q, offset), frame_rows(kv, offset), entries, eseg, eend, sink,
            frame_rows(seg, offset, HALO), jnp.int32(offset))


@functools.cache
def dense_fn(impl, interpret=False):
    def fn(q, kv, entries, eseg, eend, sink, seg, offset):
        kw = {} if impl == "reference" else {"block_sizes": BLOCKS[impl], "interpret": interpret}
        return dense_attention(q, kv, entries, eseg, sink, seg, ratio=CASE.ratio, window=CASE.window,
                               entry_end=eend, query_offset=offset, impl=impl, **kw)

    return fn


def test_dense_reference_on_a_frame_equals_the_whole_sequence():
    """Frame rows whose window lies inside the frame (or before the sequence) equal the whole sequence's."""
    *_, (q, kv, entries, eseg, eend, sink, seg), _ = problem()
    whole = reference.dense_attention(q, kv, entries, eseg, sink, seg, ratio=CASE.ratio, window=CASE.window,
                                      entry_end=eend)
    for offset in OFFSETS:
        got = dense_fn("reference")(*dense_frame(offset))
        keep = CASE.window - 1 if offset > 0 else -offset  # rows with their whole window in the frame
        compare(f"dense reference, offset {offset}", got[:, keep:], frame_rows(whole, offset)[:, keep:],
                TOLERANCES["kernel_f32"])


@pytest.mark.parametrize("impl", sorted(BLOCKS))
@pytest.mark.parametrize("offset", OFFSETS)
def test_dense_pallas_matches_reference_with_offset(impl, offset, interpret):
    matches_reference(dense_fn(impl, interpret(impl)), dense_fn("reference"), dense_frame(offset),
                      TOLERANCES["kernel_f32"], argnums=(0, 1, 2, 5), name=f"dense {impl}, offset {offset}")


def indexer_frame(offset: int):
    *_, (q_idx, k_idx, w, eseg, eend, seg) = problem()
    return (frame_rows(q_idx, offset), k_idx, frame_rows(w, offset), eseg, frame_rows(seg, offset, HALO), eend,
            jnp.int32(offset))


def test_indexer_reference_on_a_frame_equals_the_whole_sequence():
    *_, (q_idx, k_idx, w, eseg, eend, seg) = problem()
    whole = lightning_indexer(q_idx, k_idx, w, eseg, seg, ratio=CASE.ratio, topk=CASE.topk, entry_end=eend,
                              impl="reference")
    scores = indexer_scores(q_idx, k_idx, w, eseg, seg, ratio=CASE.ratio, entry_end=eend)
    for offset in OFFSETS:
        qf, kf, wf, esf, sf, eef, off = indexer_frame(offset)
        got = lightning_indexer(qf, kf, wf, esf, sf, ratio=CASE.ratio, topk=CASE.topk, entry_end=eef,
                                query_offset=off, impl="reference")
        got_scores = indexer_scores(qf, kf, wf, esf, sf, ratio=CASE.ratio, entry_end=eef, query_offset=off)
        keep = max(-offset, 0)
        np.testing.assert_array_equal(np.asarray(got)[:, keep:], np.asarray(frame_rows(whole, offset))[:, keep:])
        np.testing.assert_array_equal(np.asarray(got_scores)[:, keep:],
                                      np.asarray(frame_rows(scores, offset))[:, keep:])
        assert np.all(np.asarray(got)[:, :keep] == -1)  # halo rows see no entry


@pytest.mark.parametrize("impl", sorted(INDEXER_BLOCKS))
def test_indexer_pallas_matches_reference_with_offset(impl, interpret):
    kernel = jax.jit(functools.partial(lightning_indexer, ratio=CASE.ratio, topk=CASE.topk, impl=impl,
                                       block_sizes=INDEXER_BLOCKS[impl], interpret=interpret(impl)))
    for offset in OFFSETS:
        q, k, w, eseg, seg, eend, off = indexer_frame(offset)
        want = lightning_indexer(q, k, w, eseg, seg, ratio=CASE.ratio, topk=CASE.topk, entry_end=eend,
                                 query_offset=off, impl="reference")
        got = kernel(q, k, w, eseg, seg, entry_end=eend, query_offset=off)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"offset {offset}")


def test_bad_query_offset_raises_value_error():
    args = dense_frame(OFFSETS[0])
    with pytest.raises(ValueError, match="query_offset"):
        dense_attention(*args[:7][:3], args[3], args[5], args[6], ratio=CASE.ratio, entry_end=args[4],
                        query_offset=jnp.zeros(2, jnp.int32))
    q, k, w, eseg, seg, eend, _ = indexer_frame(OFFSETS[0])
    with pytest.raises(ValueError, match="query_offset"):
        lightning_indexer(q, k, w, eseg, seg, ratio=CASE.ratio, topk=CASE.topk, query_offset=1.5)
