"""Grouped expert matmul: Pallas kernels (interpret mode on CPU) against the pure-JAX reference.

One shape for everything, so each (implementation, format) compiles once: M = 40 rows (not a multiple of the
16-row tile), K = 224 (padded to two 128 tiles; partial FP8 scale block), N = 192 (three 64-wide tiles;
partial FP8 scale block), E = 4 experts. The group sizes are data, so the scenarios reuse the compilations.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import formats
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.expert_matmul import BlockSizes, common, expert_matmul
from pallas_kernels.testing import assert_matches_reference
from tests.conftest import TOLERANCES

E, M, K, N = 4, 40, 224, 192
BLOCKS = BlockSizes(block_m=16, block_k=128, block_n=64)
GROUPS = {
    "mixed_with_empty_and_unused_rows": [10, 0, 25, 3],
    "all_tokens_on_one_expert": [0, 0, 40, 0],
    "all_on_first_expert": [40, 0, 0, 0],
    "no_tokens_routed": [0, 0, 0, 0],
}
IMPLS = ("pallas_gpu", "pallas_tpu")


@pytest.fixture(scope="module")
def weights():
    """Float weights and their FP8 / MXFP4 forms in kernel layout [E, K, N], built from the official [E, N, K]."""
    rng = np.random.default_rng(0)
    official = (rng.standard_normal((E, N, K)) * 0.05).astype(np.float32)  # [E, out, in]
    q8, s8 = formats.quantize_fp8_blocks(official)
    p4, s4 = formats.quantize_mxfp4(official, axis=-1)
    t = lambda a: jnp.asarray(np.swapaxes(a, -1, -2))
    dense = {
        "float": official,
        "fp8": formats.dequantize_fp8_blocks(q8, s8),
        "mxfp4": formats.dequantize_mxfp4(p4, s4),
    }
    return {
        "float": (t(official), None, dense["float"]),
        "fp8": (t(q8), t(s8), dense["fp8"]),
        "mxfp4": (t(p4), t(s4), dense["mxfp4"]),
    }


@pytest.fixture(scope="module")
def lhs():
    return jnp.asarray(np.random.default_rng(1).standard_normal((M, K)), jnp.float32)


@functools.cache
def _fn(impl: str, interpret: bool = False):
    """One function object per implementation, so assert_matches_reference compiles it once per format."""
    if impl == "reference":
        return lambda x, w, gs, s: expert_matmul(x, w, gs, s, impl="reference")
    return lambda x, w, gs, s: expert_matmul(x, w, gs, s, impl=impl, block_sizes=BLOCKS,
                                                 interpret=interpret)


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("fmt", ["float", "fp8", "mxfp4"])
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_matches_reference(impl, fmt, groups, weights, lhs, interpret):
    w, s, _ = weights[fmt]
    gs = jnp.asarray(GROUPS[groups], jnp.int32)
    argnums = (0, 1) if fmt == "float" else (0,)  # quantised weights are constants
    report = assert_matches_reference(_fn(impl, interpret(impl)), _fn("reference"), (lhs, w, gs, s),
                                      TOLERANCES["kernel_f32"],
                                      argnums=argnums, name=f"{impl}/{fmt}/{groups}")
    assert set(report) == {"value"} | {f"grad[{i}]" for i in argnums}


@pytest.mark.parametrize("groups", ["mixed_with_empty_and_unused_rows", "no_tokens_routed"])
@pytest.mark.parametrize("fmt", ["float", "fp8", "mxfp4"])
def test_reference_is_dequantise_then_per_row_matmul(fmt, groups, weights, lhs):
    w, s, dense = weights[fmt]  # dense: numpy dequantisation of the official [E, out, in] tensors
    sizes = GROUPS[groups]
    out = np.asarray(jax.jit(_fn("reference"))(lhs, w, jnp.asarray(sizes, jnp.int32), s))
    owner = np.repeat(np.arange(E), sizes)
    want = np.zeros((M, N), np.float32)
    for m, g in enumerate(owner):
        want[m] = dense[g] @ np.asarray(lhs[m])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert (out[len(owner):] == 0).all()


def test_bf16_tokens_with_fp8_weights(weights, lhs, interpret):
    w, s, _ = weights["fp8"]
    gs = jnp.asarray(GROUPS["mixed_with_empty_and_unused_rows"], jnp.int32)
    assert_matches_reference(_fn("pallas_gpu", interpret("pallas_gpu")), _fn("reference"),
                             (lhs.astype(jnp.bfloat16), w, gs, s),
                             TOLERANCES["kernel_bf16"], name="pallas_gpu/fp8/bf16")


def test_work_items_cover_every_row_once():
    m_tiles, bm = 5, 8
    fn = jax.jit(lambda gs: common.work_items(gs, m_tiles, bm))
    rng = np.random.default_rng(2)
    cases = [[0, 0, 0], [40, 0, 0], [0, 0, 40], [8, 8, 8], [3, 0, 30], [0, 16, 0]] + [
        list(rng.multinomial(rng.integers(0, 41), [1 / 3] * 3)) for _ in range(6)]
    for sizes in cases:
        items = [np.asarray(a) for a in fn(jnp.asarray(sizes, jnp.int32))]
        tile, group, lo, hi, tile_first, group_first = items
        assert len(tile) == m_tiles + 3
        assert (np.diff(tile) >= 0).all() and (np.diff(group) >= 0).all(), sizes
        assert set(tile) == set(range(m_tiles)) and set(group) == {0, 1, 2}, sizes
        np.testing.assert_array_equal(tile_first, np.r_[1, np.diff(tile) != 0])
        np.testing.assert_array_equal(group_first, np.r_[1, np.diff(group) != 0])
        owner = np.full(m_tiles * bm, -1)
        for t, g, a, b in zip(tile, group, lo, hi, strict=True):
            rows = np.arange(t * bm, (t + 1) * bm)
            rows = rows[(rows >= a) & (rows < b)]
            assert (owner[rows] == -1).all(), sizes  # no row twice
            owner[rows] = g
        np.testing.assert_array_equal(owner, np.r_[np.repeat(np.arange(3), sizes), [-1] * (m_tiles * bm - sum(sizes))])


def test_impl_selection_never_falls_back_silently():
    assert resolve_impl(None, platform="cpu")[0] == "reference"
    assert resolve_impl(None, platform="gpu")[0] == "pallas_gpu"
    assert resolve_impl(None, platform="tpu")[0] == "pallas_tpu"
    assert resolve_impl("pallas_tpu", interpret=True, platform="gpu") == ("pallas_tpu", True)
    # impl="pallas" names this platform's kernel; on CPU there is none, so interpreting it is ambiguous.
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_impl("pallas", interpret=True, platform="cpu")
    for impl, platform in [("pallas", "cpu"), ("pallas_gpu", "cpu"), ("pallas_tpu", "gpu"), ("triton", "gpu")]:
        with pytest.raises(ValueError):
            resolve_impl(impl, platform=platform)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="asserts the CPU dispatch rule (impl='pallas' without "
                    "interpret raises); on a GPU/TPU it names the native kernel")
def test_bad_inputs_raise_value_error(weights, lhs):
    w8, s8, _ = weights["fp8"]
    w4, s4, _ = weights["mxfp4"]
    gs = jnp.asarray([10, 0, 25, 3], jnp.int32)
    bad = [
        ({"lhs": lhs, "rhs": w8, "group_sizes": gs, "rhs_scale": None}, "need rhs_scale"),
        ({"lhs": lhs, "rhs": w8, "group_sizes": gs, "rhs_scale": s8[:, :1]}, "does not match"),
        ({"lhs": lhs, "rhs": w4, "group_sizes": gs, "rhs_scale": s4.astype(jnp.bfloat16)}, "float8_e8m0fnu or float32"),
        ({"lhs": lhs[:, :100], "rhs": w4, "group_sizes": gs, "rhs_scale": s4}, "K = 100"),
        ({"lhs": lhs, "rhs": w8, "group_sizes": gs[:3], "rhs_scale": s8}, "group_sizes"),
        ({"lhs": lhs, "rhs": w8, "group_sizes": gs * 2, "rhs_scale": s8}, "sum to at most"),
        ({"lhs": lhs, "rhs": w8, "group_sizes": gs, "rhs_scale": s8, "impl": "pallas"}, "interpret=True"),
        ({"lhs": lhs, "rhs": w8, "group_sizes": gs, "rhs_scale": s8, "impl": "pallas_tpu", "interpret": True,
          "block_sizes": BlockSizes(16, 256, 64)}, "dividing 128"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            expert_matmul(**kwargs)
    with pytest.raises(ValueError, match="power of two"):
        BlockSizes(block_m=24)
