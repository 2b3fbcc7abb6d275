"""Context parallelism: the layout, the halo exchange, and one-device equivalence of logits and train steps.

The model is the cut-down `tiny` of `tests.sharding.equivalence` (hash-routed sliding layer, scanned (CSA 4,
HCA 16) x 2, MTP) on rows of 256 tokens: on context=8 every rank holds two 16-token chunks (one HCA slot, one
window each). Packed documents end on chunk (and rank) boundaries and off them, and one row ends in padding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_v4 import DeepseekV4, attention
from sharding import context as cp
from sharding import mesh as mesh_lib
from tests.conftest import TOLERANCES
from tests.sharding.equivalence import SMALL, assert_same_steps, run, small_config, small_model

B, T, STEPS = 2, 256, 3
MESHES = ["context=8", "data=2,context=4", "context=2,expert=4", "context=2,fsdp=2,tensor=2"]
METRICS = ("loss", "mtp_loss", "indexer_loss", "grad_norm", "balance_loss")


def packed_rows() -> dict[str, np.ndarray]:
    """Documents ending at 19 (inside a chunk), 32 and 128 (chunk and rank boundaries), 200; row 1 ends in padding."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(2, SMALL["vocab_size"], size=(B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    for i, start in enumerate((19, 32, 128, 200)):
        seg[:, start:] = i + 2
    seg[1, 240:] = 0
    pos = np.zeros((B, T), np.int32)
    for t in range(1, T):
        pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos}


# ---- the layout and the halo exchange (fast) ------------------------------------------------------------------


def test_layout_holds_chunks_i_and_2n_minus_1_minus_i():
    perm = cp.layout_permutation(16, 4)  # 8 chunks of 2
    assert perm.tolist() == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]
    x = jnp.arange(32).reshape(2, 16)
    np.testing.assert_array_equal(cp.from_layout(cp.to_layout(x, 4), 4), x)
    assert cp.to_layout(x, 1) is x


def test_causal_work_is_balanced():
    """Query-key pairs under a causal mask per rank: the two-chunk layout is even, the naive split is not."""
    n, length = 8, 1024
    work = np.arange(1, length + 1)  # query t attends to t + 1 keys
    balanced = work[cp.layout_permutation(length, n)].reshape(n, -1).sum(1)
    naive = work.reshape(n, -1).sum(1)
    assert balanced.max() / balanced.mean() < 1.01
    assert naive.max() / naive.mean() > 1.7  # the last rank of the naive split does 15/8 of the mean


def test_bad_length_is_one_line_error_before_compiling():
    with pytest.raises(ValueError, match="context=8 needs a sequence length that is a multiple of 256") as e:
        cp.check_length(384, 8, 16, 16)
    assert "\n" not in str(e.value)
    model = nnx.eval_shape(lambda: DeepseekV4(small_config(), rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh_lib.make_mesh("context=8")):
        with pytest.raises(ValueError, match="multiple of 256"):
            model.context_size(384)
        assert model.context_size(512) == 8


def test_previous_chunk_tails():
    """Each chunk receives the last rows of the chunk before it in natural order (zeros before the first)."""
    n, tc, rows = 4, 3, 2
    mesh = mesh_lib.make_mesh("data=2,context=4")
    x = cp.to_layout(jnp.arange(1, 2 * n * tc + 1).reshape(1, -1), n)  # natural row t holds t + 1

    def body(x):
        h0, h1 = cp.previous_chunk_tails(x, rows, n)
        return jnp.concatenate([h0, h1], axis=1)

    got = jax.shard_map(body, mesh=mesh, in_specs=P(None, "context"), out_specs=P(None, "context"))(x)
    got = np.asarray(got).reshape(n, 2, rows)
    for r in range(n):
        for j, chunk in enumerate((r, 2 * n - 1 - r)):
            want = np.arange(chunk * tc - rows, chunk * tc) + 1 if chunk else np.zeros(rows)
            np.testing.assert_array_equal(got[r, j], want, err_msg=f"rank {r} chunk {chunk}")


# ---- equivalence with one device (slow: compiles) -------------------------------------------------------------


@pytest.mark.slow  # one forward compile per mesh
def test_logits_match_single_device():
    """Forward logits on context=8 for 512 tokens (not a multiple of 128 x 8), documents crossing ranks."""
    rows = packed_rows()
    tokens, seg, pos = (np.concatenate([rows[k], rows[k]], axis=1) for k in ("tokens", "segment_ids", "positions"))
    graphdef, state = small_model(seed=1)
    forward = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
    want = np.asarray(forward(state, tokens, seg, pos))
    with jax.set_mesh(mesh_lib.make_mesh("context=8")):
        got = np.asarray(forward(state, tokens, seg, pos))
    tol = TOLERANCES["sharded_vs_single_f32"]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.slow  # one forward compile per mesh
def test_warmup_indexer_objective_matches_single_device():
    """The dense phase's indexer KL and recall, hidden and MTP states, on context=8 (outputs in the layout)."""
    rows = packed_rows()
    graphdef, state = small_model(seed=2)

    @jax.jit
    def forward(st, tokens, seg, pos):
        out = nnx.merge(graphdef, st).forward_train(tokens, seg, pos, sparse_attention=False, indexer_loss=True)
        return out.hidden, out.mtp_hidden[0], out.indexer_loss, out.indexer_recall

    args = (state, rows["tokens"], rows["segment_ids"], rows["positions"])
    want = jax.device_get(forward(*args))
    with jax.set_mesh(mesh_lib.make_mesh("context=8")):
        got = jax.device_get(forward(*args))
    tol = TOLERANCES["sharded_vs_single_f32"]
    assert want[2] > 0
    for name, w, g in zip(("hidden", "mtp hidden"), want[:2], got[:2]):
        np.testing.assert_allclose(cp.from_layout(g, 8), w, rtol=tol, atol=tol, err_msg=name)
    np.testing.assert_allclose(got[2:], want[2:], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def single():
    return run(mesh_lib.make_mesh("data=1", devices=jax.devices()[:1]), [packed_rows()] * STEPS, METRICS)


@pytest.mark.slow  # one train-step compile per mesh
@pytest.mark.parametrize("spec", MESHES)
def test_three_train_steps_match_single_device(spec, single):
    """Sparse phase, indexer on."""
    assert_same_steps(single, run(mesh_lib.make_mesh(spec), [packed_rows()] * STEPS, METRICS))
    want_metrics = single[0]
    assert want_metrics[0]["indexer_loss"] > 0 and want_metrics[0]["mtp_loss"] > 0


@pytest.mark.slow  # one train-step compile with interpreted Pallas kernels
def test_pallas_kernels_under_context_parallelism_match_single_device(single):
    """The Pallas attention and indexer kernels (Mosaic style, interpreted on CPU) run per chunk frame with their
    query offsets: three train steps on data=2,context=4 equal one device's (reference kernels)."""
    with attention.kernel_implementation("pallas_tpu", interpret=True):
        got = run(mesh_lib.make_mesh("data=2,context=4"), [packed_rows()] * STEPS, METRICS)
    assert_same_steps(single, got)
