"""The grain pipeline: token conservation, packing layout, process shards, mixture shares, exact resume."""

import collections
import contextlib
import json
import os
import threading

import numpy as np
import pytest

from deepseek_v4 import data
from deepseek_v4.corpus import prepare, shakespeare
from deepseek_v4.synthetic import SyntheticIterator

T = 32  # seq_len of these tests
TOKENIZER_ID = "test-tokenizer"


def _write(path, lengths, first_value):
    """A prepared dataset of documents BOS + unique ids + EOS; returns the documents."""
    docs, value = [], first_value
    for n in lengths:
        docs.append(np.concatenate([[0], np.arange(value, value + n - 2), [1]]).astype(np.int32))
        value += n - 2
    prepare.write_dataset(docs, str(path), tokenizer_id=TOKENIZER_ID, num_shards=3)
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two datasets with short, exact-fit and longer-than-T documents (A: 40 docs, B: 25 docs)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lengths_a = list(rng.integers(3, 3 * T, size=36)) + [T + 1, 2 * T + 1, 5 * T + 7, 3]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prepare, "CHUNK_TOKENS", 7)  # tiny records: most pieces span several of them
        docs_a = _write(root / "a", lengths_a, first_value=2)
    docs_b = _write(root / "b", list(rng.integers(3, 2 * T, size=25)), first_value=100_000)
    return {"a": (str(root / "a"), docs_a), "b": (str(root / "b"), docs_b)}


def _pairs(docs):
    return collections.Counter((int(d[i]), int(d[i + 1])) for d in docs for i in range(len(d) - 1))


def _batch_pairs(batches):
    out = collections.Counter()
    for b in batches:
        mask = b["segment_ids"] > 0
        out.update(zip(b["tokens"][mask].tolist(), b["targets"][mask].tolist()))
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_one_epoch_loses_and_duplicates_no_token(corpus):
    path, docs = corpus["a"]
    batches = list(data.make_train_iterator([path], None, T, 4, seed=1, num_epochs=1))
    for b in batches:
        assert all(v.shape == (4, T) and v.dtype == np.int32 for v in b.values())
    got = _batch_pairs(batches)
    assert sum(got.values()) == sum(len(d) - 1 for d in docs)
    assert got == _pairs(docs)


def test_segments_positions_and_targets_at_every_boundary(corpus):
    path, docs = corpus["a"]
    where = {int(v): (d, i) for d, doc in enumerate(docs) for i, v in enumerate(doc) if v > 1}
    seen_continuation = 0
    batches = list(data.make_train_iterator([path], None, T, 4, seed=2, num_epochs=1))
    for n, b in enumerate(batches):
        for r in range(4):
            seg, pos, tok, tgt = (b[k][r] for k in ("segment_ids", "positions", "tokens", "targets"))
            n_used = int((seg > 0).sum())
            assert (seg[n_used:] == 0).all() and (pos[n_used:] == 0).all(), "padding only at the end of a row"
            assert (tok[n_used:] == 0).all() and (tgt[n_used:] == 0).all()
            if n_used == 0:
                assert n == len(batches) - 1, "only the last batch of a finite run has padding rows"
                continue
            ids = seg[:n_used]
            assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
            for s in np.unique(ids):
                span = np.flatnonzero(seg == s)
                assert (np.diff(span) == 1).all()
                np.testing.assert_array_equal(pos[span], np.arange(span.size))  # positions restart per piece
                d, i = where[int(tok[span[0]])] if tok[span[0]] > 1 else (where[int(tgt[span[0]])][0], 0)
                assert i % T == 0, "pieces start at multiples of seq_len within their document"
                assert span.size == min(T, len(docs[d]) - 1 - i), "a piece is as long as it can be"
                np.testing.assert_array_equal(tok[span], docs[d][i : i + span.size])
                np.testing.assert_array_equal(tgt[span], docs[d][i + 1 : i + 1 + span.size])
                seen_continuation += i > 0
    assert seen_continuation >= 5, "long documents must have been split"


def test_process_shards_are_disjoint_and_cover_the_data(corpus):
    path, docs = corpus["a"]
    per_process = [
        _batch_pairs(
            data.make_train_iterator([path], None, T, 2, seed=3, process_index=p, process_count=3, num_epochs=1)
        )
        for p in range(3)
    ]
    for p in range(3):
        for q in range(p + 1, 3):
            assert not (per_process[p].keys() & per_process[q].keys())
    assert sum(per_process, collections.Counter()) == _pairs(docs)
    source = data.PieceSource(data.open_dataset(path), T, seed=5, process_index=0, process_count=1)
    two_epochs = [source.piece_index(k) for k in range(2 * source.num_pieces)]
    assert sorted(two_epochs[: source.num_pieces]) == list(range(source.num_pieces))
    assert sorted(two_epochs[source.num_pieces :]) == list(range(source.num_pieces))
    assert two_epochs[: source.num_pieces] != two_epochs[source.num_pieces :], "each epoch gets a new order"


def test_mixture_follows_token_weights(corpus):
    it = data.make_train_iterator([corpus["a"][0], corpus["b"][0]], [3.0, 1.0], T, 8, seed=4)
    tokens = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in _take(it, 40)])
    share_b = (tokens >= 100_000).sum() / (tokens != 0).sum()  # BOS (0) is shared by both datasets
    assert abs(share_b - 0.25) < 0.04, share_b


def test_exact_resume_mid_stream_and_across_epochs(corpus):
    dirs = [corpus["a"][0], corpus["b"][0]]
    reference = data.make_train_iterator(dirs, [1.0, 2.0], T, 3, seed=7)
    states, batches = [], []
    for _ in range(60):  # about three epochs of dataset B
        states.append(json.loads(json.dumps(reference.get_state())))
        batches.append(next(reference))
    assert any(s["grain"]["open"] for s in states), "some saved states must hold partly filled rows"
    for start in (0, 1, 17, 45):
        resumed = data.make_train_iterator(dirs, [1.0, 2.0], T, 3, seed=7)
        resumed.set_state(states[start])
        _assert_same_batches(_take(resumed, 8), batches[start : start + 8])


def test_orbax_checkpoint_round_trip(corpus, tmp_path):
    import orbax.checkpoint as ocp

    it = data.make_train_iterator([corpus["a"][0]], None, T, 2, seed=8)
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data_iter=data.checkpoint_args(it)))
        mngr.wait_until_finished()
        expected = _take(it, 4)
        fresh = data.make_train_iterator([corpus["a"][0]], None, T, 2, seed=8)
        mngr.restore(5, args=ocp.args.Composite(data_iter=data.checkpoint_args(fresh, restore=True)))
    _assert_same_batches(_take(fresh, 4), expected)


def test_resume_refuses_changed_settings(corpus):
    path = corpus["a"][0]
    state = data.make_train_iterator([path], None, T, 2, seed=9, process_count=2).get_state()
    with pytest.raises(ValueError, match="process_count was 2, is 4"):
        data.make_train_iterator([path], None, T, 2, seed=9, process_count=4).set_state(state)
    with pytest.raises(ValueError, match="seq_len was 32, is 64"):
        data.make_train_iterator([path], None, 2 * T, 2, seed=9, process_count=2).set_state(state)
    same = data.make_train_iterator([path], None, T, 2, seed=9, process_count=2)
    same.set_state(state)


def test_bad_arguments_are_one_line_errors(corpus, tmp_path):
    a, b = corpus["a"][0], corpus["b"][0]
    with pytest.raises(ValueError, match="one positive weight per dataset"):
        data.make_train_iterator([a, b], [1.0], T, 2, seed=0)
    with pytest.raises(ValueError, match="not a prepared dataset"):
        data.make_train_iterator([str(tmp_path)], None, T, 2, seed=0)
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        data.make_train_iterator([a], None, T, 2, seed=0, process_index=2, process_count=2)
    other = tmp_path / "other"
    prepare.write_dataset([np.array([0, 5, 1])], str(other), tokenizer_id="another", num_shards=1)
    with pytest.raises(ValueError, match="different tokenizers"):
        data.make_train_iterator([a, str(other)], None, T, 2, seed=0)


@pytest.mark.slow  # four worker processes start, each importing grain and jax
def test_worker_processes_give_a_deterministic_resumable_stream(corpus):
    from absl import flags

    marked = not flags.FLAGS.is_parsed()
    if marked:
        flags.FLAGS.mark_as_parsed()  # what absl.app.run does in a real program
    path, docs = corpus["a"]
    try:
        it = data.make_train_iterator([path], None, T, 2, seed=10, num_workers=2, num_epochs=1)
        try:
            head = _take(it, 3)
            state = it.get_state()
            rest = list(it)
        finally:
            it.close()
        assert _batch_pairs(head + rest) == _pairs(docs)
        resumed = data.make_train_iterator([path], None, T, 2, seed=10, num_workers=2, num_epochs=1)
        try:
            resumed.set_state(state)
            _assert_same_batches(list(resumed), rest)
        finally:
            resumed.close()
    finally:
        if marked:
            flags.FLAGS.unparse_flags()


def test_to_global_lays_out_the_batch(corpus):
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    batch = next(data.make_train_iterator([corpus["a"][0]], None, T, 4, seed=11))
    out = data.to_global(batch, sharding)
    assert out.keys() == batch.keys()
    for k, v in out.items():
        assert v.shape == (4, T) and v.dtype == np.int32 and v.sharding == sharding
        np.testing.assert_array_equal(np.asarray(v), batch[k])


def test_default_corpus_is_prepared_once_and_split_by_play(tmp_path, monkeypatch):
    files = shakespeare.source_files()
    assert not set(files["train"]) & set(files["validation"])
    plays = {os.path.basename(f).split("_gut")[0] for f in files["validation"]}
    assert plays == {"julius_caesar", "macbeth"}
    assert not [f for f in files["train"] if os.path.basename(f).split("_gut")[0] in plays]
    assert len(files["train"]) + len(files["validation"]) == 77

    small = {"train": [f for f in files["train"] if "phoenix" in f], "validation": files["validation"][:1]}
    monkeypatch.setattr(shakespeare, "source_files", lambda: small)
    train = shakespeare.default_corpus(str(tmp_path), "train", progress=False)
    manifest = prepare.read_manifest(train)
    assert manifest["documents"] == 1 and manifest["tokens"] > 100
    again = shakespeare.default_corpus(str(tmp_path), "train", progress=False)
    assert again == train and prepare.read_manifest(again) == manifest, "a second call must reuse the cache"
    assert prepare.read_manifest(shakespeare.default_corpus(str(tmp_path), "validation", progress=False))
    with pytest.raises(ValueError, match="unknown split"):
        shakespeare.default_corpus(str(tmp_path), "test")


@pytest.mark.parametrize("with_lock", [True, False])
def test_concurrent_cache_preparation_is_safe(tmp_path, monkeypatch, with_lock):
    small = [f for f in shakespeare.source_files()["train"] if "phoenix" in f]
    if not with_lock:  # the atomic rename alone must keep the cache consistent
        monkeypatch.setattr(prepare, "_file_lock", lambda path: contextlib.nullcontext())
    results, errors = [], []

    def build():
        try:
            results.append(prepare.prepare_cached(str(tmp_path), "c", {"train": small}, progress=False))
        except Exception as e:  # noqa: BLE001  (collected and asserted below)
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert data.open_dataset(os.path.join(results[0], "train")).manifest["documents"] == 1
    assert sorted(os.listdir(tmp_path)) in (["c"], [".c.lock", "c"]), "no temporary directory may remain"


# ---- synthetic batches ------------------------------------------------------------------------------------


def test_synthetic_rows_depend_only_on_seed_batch_and_row():
    whole = SyntheticIterator(4, 16, seed=3, vocab=64)
    halves = [SyntheticIterator(2, 16, seed=3, vocab=64, first_row=r) for r in (0, 2)]
    for _ in range(2):
        want = next(whole)
        got = [next(h) for h in halves]
        for key in ("tokens", "targets", "segment_ids", "positions"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], err_msg=key)
    resumed = SyntheticIterator(4, 16, seed=3, vocab=64)
    resumed.set_state(whole.get_state())
    np.testing.assert_array_equal(next(resumed)["tokens"], next(whole)["tokens"])
    with pytest.raises(ValueError, match="different seq_len"):
        SyntheticIterator(4, 8, seed=3, vocab=64).set_state(whole.get_state())
