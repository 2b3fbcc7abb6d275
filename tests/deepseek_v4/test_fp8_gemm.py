"""Real FP8 GEMMs (`deepseek_v4.fp8_gemm`): the forward against the FP8 emulation (same values up to float32
summation order), FP8 Dgrad / Wgrad against their dequantised spelling, the model's wiring (`layers.qlinear`).
XLA CPU executes FP8 dots, so the GEMMs are checked here too; the GPU test runs the model where a GPU is."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_v4 import fp8_gemm, get_config, layers
from tests.conftest import TOLERANCES

TOL = TOLERANCES["fp8_gemm_vs_emulation_f32"]


def _inputs(m=33, k=300, n=200, dtype=jnp.float32):
    kx, kw = jax.random.split(jax.random.key(3))
    x = (3.0 * jax.random.normal(kx, (m, k))).astype(dtype)
    w = 0.05 * jax.random.normal(kw, (k, n))  # float32 master weight
    return x, w


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.skipif(not fp8_gemm.backend_runs_fp8_dots(), reason="XLA on this backend does not execute FP8 dots")
def test_fp8_forward_equals_the_emulation_and_the_backward_is_fp8():
    x, w = _inputs()  # K = 300: two whole 128-slices and a padded one
    got = jax.jit(fp8_gemm.fp8_linear)(x, w)
    want = jax.jit(fp8_gemm.emulated_linear)(x, w)
    assert got.shape == (33, 200) and got.dtype == jnp.float32
    assert _rel_err(got, want) <= TOL
    # The operands really are FP8 in the lowered program.
    assert "f8E4M3FN" in jax.jit(fp8_gemm.fp8_linear).lower(x, w).as_text()
    # Backward: Dgrad and Wgrad as FP8 GEMMs (dy 1x128 along N; x and dy re-tiled 128x1 along the tokens).
    dy = jnp.cos(got)
    _, pull = jax.vjp(jax.jit(fp8_gemm.fp8_linear), x, w)
    dx, dw = pull(dy)
    assert dx.shape == x.shape and dw.shape == w.shape and dw.dtype == w.dtype
    want_dx, want_dw = jax.jit(fp8_gemm.quantised_backward_reference)(x, w, dy)
    assert _rel_err(dx, want_dx) <= TOL and _rel_err(dw, want_dw) <= TOL
    # ... which is the emulation's straight-through backward up to the FP8 rounding of dy (and of x per 128 tokens).
    _, pull_emulated = jax.vjp(fp8_gemm.emulated_linear, x, w)
    for a, b in zip((dx, dw), pull_emulated(dy)):
        assert TOL < _rel_err(a, b) <= 2**-3
    xb = x.astype(jnp.bfloat16)
    bf = jax.jit(fp8_gemm.fp8_linear)(xb, w)
    assert bf.dtype == jnp.bfloat16
    assert _rel_err(bf, jax.jit(fp8_gemm.emulated_linear)(xb, w)) <= TOLERANCES["kernel_bf16"]


@pytest.mark.skipif(not fp8_gemm.backend_runs_fp8_dots(), reason="XLA on this backend does not execute FP8 dots")
def test_qlinear_takes_the_fp8_gemm_where_native_and_the_emulation_elsewhere(monkeypatch):
    cfg = get_config("tiny", quant="fp8")
    x, w = _inputs(k=cfg.hidden_size, n=64)
    want = jax.jit(lambda x, w: layers.qact(x, cfg) @ layers.qweight(w, cfg, "attn.wkv"))(x, w)
    qlinear = lambda c: jax.jit(lambda x, w: layers.qlinear(x, w, c, "attn.wkv"))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(qlinear(cfg)(x, w)), np.asarray(want))
    monkeypatch.setattr(fp8_gemm, "native", lambda: True)  # the GPU wiring, run by XLA CPU
    assert "f8E4M3FN" in qlinear(cfg).lower(x, w).as_text()
    assert _rel_err(qlinear(cfg)(x, w), want) <= TOL
    np.testing.assert_array_equal(np.asarray(qlinear(get_config("tiny"))(x, w)), np.asarray(x @ w))


@pytest.mark.gpu
@pytest.mark.skipif(not fp8_gemm.native(), reason="needs a GPU: the model takes the FP8 GEMMs only there")
def test_model_forward_with_fp8_gemms_equals_the_emulation(monkeypatch):
    from flax import nnx

    from deepseek_v4 import DeepseekV4

    cfg = get_config("tiny", quant="fp8")
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, cfg.vocab_size, jnp.int32)
    seg, pos = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), tokens.shape)
    real = model(tokens, seg, pos)
    monkeypatch.setattr(fp8_gemm, "native", lambda: False)
    emulated = model(tokens, seg, pos)
    assert _rel_err(real, emulated) <= 10 * TOL  # one more rounding order per FP8 linear, through the layers
