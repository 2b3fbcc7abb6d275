"""Lightning indexer: reference scores and top-k vs a brute-force float64 anchor, both Pallas styles
(interpret mode) vs the reference, the differentiable `indexer_scores`, and C == 0."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.lightning_indexer import indexer_scores, lightning_indexer, pallas_gpu, pallas_tpu, reference
from tests.conftest import TOLERANCES
from tests.pallas_kernels.attention_cases import (
    FAST_COMPILE,
    Case,
    admissible,
    brute_indexer_scores,
    compare,
    entry_segments,
    segments,
)

CASES = {
    # T = 44 is not a multiple of the 8-query blocks nor the 16-query chunks; packed documents and padding;
    # top-k 6 < C = 11, so late queries must choose.
    "packed": Case(T=44, window=16, ratio=4, topk=6, layouts=((10, 21, 9), (44,)), NI=4, HI=16),
    # top-k larger than the available entries (C = 3): every query gets -1 slots.
    "short": Case(T=12, window=16, ratio=4, topk=5, layouts=((5, 7),), NI=4, HI=16),
}
BLOCKS = {
    "pallas_tpu": pallas_tpu.BlockSizes(block_q=8, block_c=8, chunk_q=16),
    "pallas_gpu": pallas_gpu.BlockSizes(block_q=8, block_c=8, chunk_q=16),
}


@functools.cache
def problem(name: str):
    case = CASES[name]
    rng = np.random.default_rng(2)
    seg = segments(case)
    eseg = entry_segments(seg, case.ratio)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    args = (
        f(case.B, case.T, case.NI, case.HI),
        f(case.B, case.C, case.HI),
        f(case.B, case.T, case.NI),
        jnp.asarray(eseg),
        jnp.asarray(seg),
    )
    return case, args, brute_indexer_scores(*args[:3], seg, eseg, case.ratio)


@functools.cache
def indexer_fn(name: str, impl: str, interpret: bool = False):
    """The compiled top-k of one case and implementation (compiled once, with FAST_COMPILE)."""
    case, args, _ = problem(name)
    if impl == "reference":
        fn = functools.partial(reference.lightning_indexer, ratio=case.ratio, topk=case.topk, block_q=8)
    else:
        fn = functools.partial(
            lightning_indexer, ratio=case.ratio, topk=case.topk, impl=impl, block_sizes=BLOCKS[impl],
            interpret=interpret,
        )
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def check_topk(name: str, idx: np.ndarray, brute: np.ndarray, case: Case, seg, eseg) -> None:
    """Checks a top-k answer against float64 brute-force scores, independently of tie order."""
    K = min(case.topk, case.C)
    assert idx.shape == (case.B, case.T, K) and idx.dtype == np.int32
    tol = TOLERANCES["kernel_f32"]
    for b in range(case.B):
        for t in range(case.T):
            adm = admissible(seg, eseg, case.ratio, b, t)
            row = idx[b, t]
            n_valid = min(K, len(adm))
            assert np.all(row[:n_valid] >= 0) and np.all(row[n_valid:] == -1), f"{name}: slots of ({b},{t}): {row}"
            chosen = row[:n_valid]
            assert set(chosen.tolist()) <= set(adm) and len(set(chosen.tolist())) == n_valid, f"{name}: ({b},{t})"
            got_scores = brute[b, t, chosen]
            best = np.sort(brute[b, t, adm])[::-1][:n_valid]
            assert np.all(np.diff(got_scores) <= tol), f"{name}: ({b},{t}) not in descending score order"
            np.testing.assert_allclose(got_scores, best, atol=tol, err_msg=f"{name}: ({b},{t}) not the top-k")


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_scores_match_brute_force(name):
    case, args, brute = problem(name)
    got = np.asarray(jax.jit(functools.partial(indexer_scores, ratio=case.ratio, block_q=8))(*args))
    finite = np.isfinite(brute)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    assert np.all(got[~finite] == -np.inf)
    compare(f"{name} indexer scores", np.where(finite, got, 0), np.where(finite, brute, 0), TOLERANCES["kernel_f32"])


def test_indexer_scores_gradient_matches_dense_formula():
    case, args, brute = problem("packed")
    finite = jnp.asarray(np.isfinite(brute))
    NI, HI = case.NI, case.HI

    def dense(q, k, w):
        dots = jax.nn.relu(jnp.einsum("bthd,bcd->bthc", q, k)) * HI**-0.5
        return jnp.where(finite, jnp.einsum("bthc,bth->btc", dots, w * NI**-0.5), 0.0)

    def blocked(q, k, w):
        return jnp.where(finite, indexer_scores(q, k, w, args[3], args[4], ratio=case.ratio, block_q=8), 0.0)

    ct = jnp.asarray(np.random.default_rng(0).standard_normal(brute.shape), jnp.float32)
    got = jax.jit(lambda *a: jax.vjp(blocked, *a)[1](ct))(*args[:3])
    want = jax.jit(lambda *a: jax.vjp(dense, *a)[1](ct))(*args[:3])
    for label, g, w in zip(("q_idx", "k_idx", "weights"), got, want, strict=True):
        compare(f"indexer_scores d{label}", g, w, TOLERANCES["kernel_f32"], scale_by_max=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_topk_is_the_brute_force_topk(name):
    case, args, brute = problem(name)
    idx = np.asarray(indexer_fn(name, "reference")(*args))
    check_topk(f"reference {name}", idx, brute, case, np.asarray(args[4]), np.asarray(args[3]))


@pytest.mark.parametrize("impl", sorted(BLOCKS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_pallas_matches_reference(name, impl, interpret):
    case, args, brute = problem(name)
    got = np.asarray(indexer_fn(name, impl, interpret(impl))(*args))
    want = np.asarray(indexer_fn(name, "reference")(*args))
    print(f"indexer {impl} {name}: {np.mean(got == want):.4f} of slots identical to the reference")
    check_topk(f"{impl} {name}", got, brute, case, np.asarray(args[4]), np.asarray(args[3]))
    # Selected scores agree with the reference's selection (ties may pick different, equally good entries).
    for b in range(case.B):
        for t in range(case.T):
            valid = want[b, t] >= 0
            np.testing.assert_allclose(
                brute[b, t, got[b, t][valid]], brute[b, t, want[b, t][valid]], atol=TOLERANCES["kernel_f32"]
            )


@pytest.mark.parametrize("impl", ["reference", "pallas_gpu", "pallas_tpu"])
def test_no_entries_gives_empty_topk(impl, interpret):
    B, T, NI, HI = 1, 3, 2, 8  # T < ratio: C = 0
    args = (
        jnp.ones((B, T, NI, HI)),
        jnp.ones((B, 0, HI)),
        jnp.ones((B, T, NI)),
        jnp.zeros((B, 0), jnp.int32),
        jnp.ones((B, T), jnp.int32),
    )
    out = lightning_indexer(*args, ratio=4, topk=8, impl=impl, interpret=interpret(impl))
    assert out.shape == (B, T, 0) and out.dtype == jnp.int32


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="asserts the CPU dispatch rule (impl='pallas' without "
                    "interpret raises); on a GPU/TPU it names the native kernel")
def test_bad_requests_raise_value_error():
    _, args, _ = problem("short")
    q, k, w, eseg, seg = args
    with pytest.raises(ValueError, match="interpret"):
        lightning_indexer(*args, ratio=4, topk=2, impl="pallas")
    with pytest.raises(ValueError, match="weights"):
        lightning_indexer(q, k, w[..., :1], eseg, seg, ratio=4, topk=2)
    with pytest.raises(ValueError, match="chunk_q"):
        lightning_indexer(
            *args,
            ratio=4,
            topk=2,
            impl="pallas_tpu",
            interpret=True,
            block_sizes=pallas_tpu.BlockSizes(block_q=8, block_c=8, chunk_q=12),
        )


@pytest.mark.parametrize("platform,module", [("cuda", pallas_gpu), ("tpu", pallas_tpu)])
def test_kernels_lower_for_their_backend(platform, module):
    """The scoring kernel lowers to Triton (CUDA) / Mosaic (TPU) at real widths in bfloat16."""
    B, T, NI, HI, ratio = 1, 1024, 64, 128, 4
    sd = jax.ShapeDtypeStruct
    shapes = (
        sd((B, T, NI, HI), jnp.bfloat16),
        sd((B, T // ratio, HI), jnp.bfloat16),
        sd((B, T, NI), jnp.bfloat16),
        sd((B, T // ratio), jnp.int32),
        sd((B, T), jnp.int32),
    )
    fn = functools.partial(module.lightning_indexer, ratio=ratio, topk=64)
    text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert "indexer_scores" in text
