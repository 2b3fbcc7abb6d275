"""Real FP8 GEMMs (`deepseek_v4.fp8_gemm`): the forward against the FP8 emulation (same values up to float32
summation order), FP8 Dgrad / Wgrad against their dequantised spelling, per weight layout (matrix, heads,
grouped); the model's wiring (`layers.qlinear`, `layers.runs_fp8_gemm`: every FP8-class weight) and the grouped
MoE's FP8 activations. XLA CPU executes FP8 dots, so the GEMMs are checked here by switching `fp8_gemm.native`
on; the GPU test runs the model where a GPU is."""

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
    backward = lambda f: jax.jit(lambda x, w, dy: jax.vjp(f, x, w)[1](dy))  # noqa: E731  (one compile, not eager)
    dx, dw = backward(fp8_gemm.fp8_linear)(x, w, dy)
    assert dx.shape == x.shape and dw.shape == w.shape and dw.dtype == w.dtype
    want_dx, want_dw = jax.jit(fp8_gemm.quantised_backward_reference)(x, w, dy)
    assert _rel_err(dx, want_dx) <= TOL and _rel_err(dw, want_dw) <= TOL
    # ... which is the emulation's straight-through backward up to the FP8 rounding of dy (and of x per 128 tokens).
    for a, b in zip((dx, dw), backward(fp8_gemm.emulated_linear)(x, w, dy)):
        assert TOL < _rel_err(a, b) <= 2**-3
    xb = x.astype(jnp.bfloat16)
    bf = jax.jit(fp8_gemm.fp8_linear)(xb, w)
    assert bf.dtype == jnp.bfloat16
    assert _rel_err(bf, jax.jit(fp8_gemm.emulated_linear)(xb, w)) <= TOLERANCES["kernel_bf16"]


@pytest.mark.skipif(not fp8_gemm.backend_runs_fp8_dots(), reason="XLA on this backend does not execute FP8 dots")
def test_qlinear_takes_the_fp8_gemm_where_native_and_the_emulation_elsewhere(monkeypatch):
    monkeypatch.setattr(fp8_gemm, "native", lambda: False)  # the CPU wiring (also on a GPU host)
    cfg = get_config("tiny", quant="fp8")
    x, w = _inputs(k=cfg.hidden_size, n=64)
    want = jax.jit(lambda x, w: layers.qact(x, cfg) @ layers.qweight(w, cfg, "attn.wkv"))(x, w)
    qlinear = lambda c: jax.jit(lambda x, w: layers.qlinear(x, w, c, "attn.wkv"))  # noqa: E731
    np.testing.assert_array_equal(np.asarray(qlinear(cfg)(x, w)), np.asarray(want))
    monkeypatch.setattr(fp8_gemm, "native", lambda: True)  # the GPU wiring, run by XLA CPU
    assert "f8E4M3FN" in qlinear(cfg).lower(x, w).as_text()
    assert _rel_err(qlinear(cfg)(x, w), want) <= TOL
    np.testing.assert_array_equal(np.asarray(qlinear(get_config("tiny"))(x, w)), np.asarray(x @ w))


# One weight per layout of the FP8-class linears, with partial 128-blocks: "heads" [in, N, H] (wq_b, the indexer's
# wq_b), "grouped" [G, I, O] (wo_a; O = 96, so the blocks of the official [G*O, I] matrix span the groups and Dgrad
# cuts O in 32-slices), "matrix" [in, out] (wq_a, wkv, wo_b, the shared expert, e_proj / h_proj).
LAYOUT_CASES = {
    "attn.wq_b": ((2, 5, 96), (96, 3, 80)),
    "attn.wo_a": ((2, 5, 2, 200), (2, 200, 96)),
    "ffn.shared.w2": ((2, 5, 200), (200, 72)),
}


@pytest.mark.parametrize("param", ["attn.wq_b", "attn.wo_a",
                                   pytest.param("ffn.shared.w2", marks=pytest.mark.slow)])  # matrix: as above
def test_every_layout_of_the_fp8_gemm_equals_the_emulation_and_its_backward_is_fp8(param, monkeypatch):
    """The FP8 path of `layers.qlinear` (XLA CPU runs the FP8 dots) against the emulation, per layout: forward
    values; Dgrad / Wgrad against the FP8 backward rule spelt with float32 matmuls of dequantised operands."""
    cfg = get_config("tiny", quant="fp8")
    x_shape, w_shape = LAYOUT_CASES[param]
    kx, kw = jax.random.split(jax.random.key(5))
    x = 3.0 * jax.random.normal(kx, x_shape)
    w = 0.05 * jax.random.normal(kw, w_shape)
    monkeypatch.setattr(fp8_gemm, "native", lambda: False)  # the CPU wiring (also on a GPU host)
    qlinear = jax.jit(lambda x, w: layers.qlinear(x, w, cfg, param))
    want = qlinear(x, w)  # the emulation
    assert not layers.runs_fp8_gemm(cfg, param)
    monkeypatch.setattr(fp8_gemm, "native", lambda: True)  # the GPU wiring, run by XLA CPU
    assert layers.runs_fp8_gemm(cfg, param) and not layers.runs_fp8_gemm(get_config("tiny"), param)
    real = jax.jit(lambda x, w: layers.qlinear(x, w, cfg, param))
    assert "f8E4M3FN" in real.lower(x, w).as_text()
    got, pull = jax.vjp(real, x, w)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel_err(got, want) <= TOL
    dy = jnp.cos(got)
    dx, dw = jax.jit(pull)(dy)
    if param == "attn.wo_a":
        want_dx, want_dw = jax.jit(fp8_gemm.grouped_backward_reference)(x.reshape(-1, *x_shape[-2:]), w,
                                                                        dy.reshape(-1, *dy.shape[-2:]))
    else:
        want_dx, want_dw = jax.jit(fp8_gemm.quantised_backward_reference)(
            x.reshape(-1, x_shape[-1]), w.reshape(w_shape[0], -1), dy.reshape(-1, w.size // w_shape[0]))
    assert _rel_err(dx, want_dx.reshape(x.shape)) <= TOL and _rel_err(dw, want_dw.reshape(w.shape)) <= TOL


def test_the_emulation_of_each_layout_is_the_einsum_it_replaced(monkeypatch):
    """On CPU `layers.qlinear` is the emulation the layers computed before, bit for bit (the heads and grouped
    einsums, the MTP projections' float32 activation quantised before the cast)."""
    monkeypatch.setattr(fp8_gemm, "native", lambda: False)  # the CPU wiring (also on a GPU host)
    cfg = get_config("tiny", quant="fp8")
    k = iter(jax.random.split(jax.random.key(6), 8))
    bf = jnp.bfloat16
    c_q, wq_b = jax.random.normal(next(k), (2, 5, 96), bf), 0.05 * jax.random.normal(next(k), (96, 3, 80))
    o, wo_a = jax.random.normal(next(k), (2, 5, 2, 200), bf), 0.05 * jax.random.normal(next(k), (2, 200, 96))
    e, e_proj = jax.random.normal(next(k), (2, 5, 64)), 0.05 * jax.random.normal(next(k), (64, 64))

    @jax.jit
    def pairs(c_q, wq_b, o, wo_a, e, e_proj):
        qw = lambda w, p: layers.qweight(w, cfg, p).astype(bf)  # noqa: E731
        return [
            (layers.qlinear(c_q, wq_b, cfg, "attn.wq_b"),
             jnp.einsum("btq,qnh->btnh", layers.qact(c_q, cfg), qw(wq_b, "attn.wq_b"))),
            (layers.qlinear(o, wo_a, cfg, "attn.wo_a"),
             jnp.einsum("btgi,gio->btgo", layers.qact(o, cfg), qw(wo_a, "attn.wo_a"))),
            (layers.qlinear(e, e_proj, cfg, "e_proj", bf), layers.qact(e, cfg).astype(bf) @ qw(e_proj, "e_proj")),
        ]

    for got, want in pairs(c_q, wq_b, o, wo_a, e, e_proj):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_every_fp8_class_weight_of_the_model_takes_the_fp8_gemm(monkeypatch):
    """Tracing the tiny model (CSA, HCA and sliding layers, hash and learned MoE, MTP) under `quant` with the GPU
    wiring asks `layers.runs_fp8_gemm` about every weight the parameter table stores FP8, and about no other."""
    from flax import nnx

    from deepseek_v4 import DeepseekV4, params

    asked = set()
    decide = layers.runs_fp8_gemm

    def spy(cfg, param):
        asked.add(param)
        return decide(cfg, param)

    monkeypatch.setattr(fp8_gemm, "native", lambda: True)
    monkeypatch.setattr(layers, "runs_fp8_gemm", spy)
    cfg = get_config("tiny", quant="fp8")
    tokens = jnp.zeros((1, 32), jnp.int32)
    jax.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)).forward_train(tokens))
    assert asked == {k.path for k in params.PARAMS if k.storage == params.FP8}


@pytest.mark.slow  # three MoE layers compiled (~20 s on 2 idle CPU cores)
def test_grouped_moe_hands_the_kernel_fp8_activations_where_native(monkeypatch):
    """moe_impl="grouped" under `fp8` with the GPU wiring: the routed experts' rows reach the grouped matmul as
    E4M3 tiles (the gating weight then scales the rows after w2); the layer's output equals the emulation's."""
    from flax import nnx

    from deepseek_v4 import moe
    from sharding import mesh as mesh_lib

    cfg = get_config("tiny", hidden_size=256, moe_intermediate_size=128, quant="fp8", moe_impl="grouped")
    layer = moe.MoE(cfg, layer=3, hash_layer=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(2), (2, 12, cfg.hidden_size))
    tokens, mask = jnp.zeros((2, 12), jnp.int32), jnp.ones((2, 12), bool)
    run = lambda: jax.jit(lambda st: nnx.merge(graphdef, st)(x, tokens, mask)[0])  # noqa: E731
    monkeypatch.setattr(fp8_gemm, "native", lambda: False)  # the CPU wiring (also on a GPU host)
    assert moe.expert_activation_format(cfg) == "float"
    want = run()(state)
    monkeypatch.setattr(fp8_gemm, "native", lambda: True)
    assert moe.expert_activation_format(cfg) == "fp8"
    assert moe.expert_activation_format(cfg.replace(quant="fp4")) == "float"
    fn = run()
    assert "f8E4M3FN" in fn.lower(state).as_text()
    assert _rel_err(fn(state), want) <= TOL
    with jax.set_mesh(mesh_lib.make_mesh("data=2,expert=4")):  # the expert-parallel dispatch, grouped per shard
        assert _rel_err(run()(state), want) <= TOL


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
