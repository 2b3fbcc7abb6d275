"""FP8 / MXFP4 formats: round trips, exact scale rule, edge values, numpy == JAX bits, QAT fake-quant."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from deepseek_v4 import quant


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _exponents(scale) -> np.ndarray:
    return _bits(scale).astype(np.int32) - 127


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


# ---- FP8 weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 200), (2, 130, 257), (128, 128)])
def test_fp8_blocks_round_trip_and_scale_rule(rng, shape):
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[..., :3, :5] *= 300  # one block with a much larger range
    q, s = quant.quantize_fp8_blocks(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == ml_dtypes.float8_e8m0fnu
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    d = quant.dequantize_fp8_blocks(q, s)
    scale = np.repeat(np.repeat(quant.e8m0_to_float32(s), 128, -2), 128, -1)[..., : shape[-2], : shape[-1]]
    # Round to nearest with 3 mantissa bits: relative error <= 2**-4, plus half the subnormal step.
    assert (np.abs(d - w) <= 2.0**-4 * np.abs(w) + scale * 2.0**-10).all()
    # Scale rounded up to a power of two: each block's amax / scale lies in (224, 448].
    wp = np.pad(np.abs(w), [(0, 0)] * (w.ndim - 2) + [(0, -shape[-2] % 128), (0, -shape[-1] % 128)])
    amax = wp.reshape(*wp.shape[:-2], wp.shape[-2] // 128, 128, wp.shape[-1] // 128, 128).max(axis=(-3, -1))
    ratio = amax / quant.e8m0_to_float32(s)
    assert ((ratio > 224) & (ratio <= 448)).all(), ratio


def test_fp8_numpy_and_jax_give_the_same_bits(rng):
    w = (rng.standard_normal((3, 200, 260)) * 0.05).astype(np.float32)
    q, s = quant.quantize_fp8_blocks(w)
    qj, sj = jax.jit(quant.quantize_fp8_blocks)(jnp.asarray(w))
    np.testing.assert_array_equal(_bits(qj), _bits(q))
    np.testing.assert_array_equal(_bits(sj), _bits(s))
    dj = jax.jit(quant.dequantize_fp8_blocks)(qj, sj)
    np.testing.assert_array_equal(_bits(dj), _bits(quant.dequantize_fp8_blocks(q, s)))


def test_fp8_edge_values():
    w = np.zeros((256, 256), np.float32)
    # Block (0, 0): all zero. Block (0, 1): max exactly 448 * 2**-3 and E4M3 subnormals (multiples of 2**-9).
    w[0, 128] = 448 * 2.0**-3
    sub = np.arange(1, 8, dtype=np.float32) * 2.0**-9 * 2.0**-3
    w[1, 128:135] = sub
    # Block (1, 0): the largest float32 (no overflow to inf/NaN). Block (1, 1): float32 subnormals.
    big = np.float32(1e38)  # near the float32 maximum (which itself rounds up to 2**128 = inf on dequantisation)
    w[128, 0], w[129, 1] = big, -big
    w[128:130, 128:130] = np.float32(1e-40)
    q, s = quant.quantize_fp8_blocks(w)
    d = quant.dequantize_fp8_blocks(q, s)
    assert np.isfinite(d).all() and np.isfinite(q.astype(np.float32)).all()
    np.testing.assert_array_equal(_exponents(s)[0], [0, -3])  # zero block -> scale 1; exact max -> 2**-3
    assert (d[:128, :128] == 0).all()
    assert d[0, 128] == w[0, 128] and q[0, 128].astype(np.float32) == 448
    np.testing.assert_array_equal(d[1, 128:135], sub)  # E4M3 subnormals survive exactly
    assert (np.abs(d[[128, 129], [0, 1]] - [big, -big]) <= 2.0**-4 * big).all()
    assert np.abs(d[128:130, 128:130] - 1e-40).max() < 1e-40  # tiny blocks: clipped scale 2**-127, no NaN
    assert _exponents(s)[1, 1] == -127


@pytest.mark.parametrize("fn", [quant.quantize_fp8_blocks, quant.quantize_act_fp8, quant.quantize_mxfp4])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected(fn, bad):
    w = np.zeros((4, 64), np.float32)
    w[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        fn(w)


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="floating-point"):
        quant.quantize_fp8_blocks(np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.quantize_mxfp4(np.ones((4, 48), np.float32))
    q, s = quant.quantize_fp8_blocks(np.ones((200, 100), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        quant.dequantize_fp8_blocks(q, s[:1])
    with pytest.raises(ValueError, match="NaN code"):
        quant.e8m0_to_float32(np.full((1,), 255, np.uint8).view(ml_dtypes.float8_e8m0fnu))


# ---- FP8 activations -------------------------------------------------------------------------------------


def test_act_fp8_tiles(rng):
    x = (rng.standard_normal((3, 5, 300)) * 4).astype(np.float32)
    q, s = quant.quantize_act_fp8(x)
    assert q.shape == x.shape and s.shape == (3, 5, 3)
    qj, sj = jax.jit(quant.quantize_act_fp8)(jnp.asarray(x))
    np.testing.assert_array_equal(_bits(qj), _bits(q))
    np.testing.assert_array_equal(_bits(sj), _bits(s))
    d = quant.dequantize_act_fp8(q, s)
    tile_scale = np.repeat(quant.e8m0_to_float32(s), 128, -1)[..., :300]
    assert (np.abs(d - x) <= 2.0**-4 * np.abs(x) + tile_scale * 2.0**-10).all()
    fq = jax.jit(quant.fake_quant_act_fp8)(jnp.asarray(x))
    np.testing.assert_array_equal(_bits(fq), _bits(d))


# ---- MXFP4 ---------------------------------------------------------------------------------------------


def test_e2m1_table_matches_ml_dtypes():
    decoded = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(_bits(quant.E2M1_VALUES), _bits(decoded))


def test_e2m1_rounding_gives_the_bits_of_the_float4_cast(rng):
    # Every midpoint between E2M1 magnitudes, the float32 values either side of it, every 4099th float32 in [0, 6],
    # random values and subnormals, both signs; numpy and JAX (rounding is done by comparisons, not by a cast).
    from pallas_kernels import formats
    grid = np.array([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6], np.float32)
    sweep = np.arange(0, np.float32(6).view(np.uint32) + 1, 4099, dtype=np.uint32).view(np.float32)
    x = np.concatenate([grid, np.nextafter(grid, np.float32(-1)), np.nextafter(grid, np.float32(7)), sweep,
                        rng.uniform(0, 6, 10000).astype(np.float32), np.float32([1e-40, 1e-30])])
    x = np.concatenate([x, -x])
    want = x.astype(ml_dtypes.float4_e2m1fn)
    for xp in (np, jnp):
        codes, values = (np.asarray(a) for a in formats._e2m1_round(xp, xp.asarray(x)))
        np.testing.assert_array_equal(codes, want.view(np.uint8))
        np.testing.assert_array_equal(_bits(values), _bits(want.astype(np.float32)))


def test_pack_low_nibble_is_even_index():
    codes = np.array([[1, 2, 15, 0, 7, 8]], np.uint8)
    packed = quant.pack_fp4(codes)
    assert packed.dtype == np.int8
    np.testing.assert_array_equal(packed.view(np.uint8), [[0x21, 0x0F, 0x87]])
    np.testing.assert_array_equal(quant.unpack_fp4(packed), codes)
    np.testing.assert_array_equal(quant.unpack_fp4(packed.view(np.uint8)), codes)
    np.testing.assert_array_equal(quant.unpack_fp4(quant.pack_fp4(codes.T, axis=0), axis=0), codes.T)


def test_mxfp4_code_values_and_ties_to_even():
    codes = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75], np.float32)  # halfway points
    w = np.zeros((2, 32), np.float32)
    w[0, :8], w[0, 8:16] = codes, -codes
    w[1, :8], w[1, 31] = ties, 6.0  # amax 6 -> scale 1
    packed, scale = quant.quantize_mxfp4(w)
    assert packed.shape == (2, 16) and scale.shape == (2, 1)
    np.testing.assert_array_equal(_exponents(scale)[:, 0], [0, 0])
    d = quant.dequantize_mxfp4(packed, scale)
    np.testing.assert_array_equal(d[0], w[0])  # every code value is exact
    np.testing.assert_array_equal(d[1, :8], [0, 1, 1, 2, 2, 4, 4, -1])  # ties go to the even mantissa


def test_mxfp4_round_trip_layouts_and_edges(rng):
    w = (rng.standard_normal((3, 64, 96)) * 0.02).astype(np.float32)  # [E, out, in]
    w[0, 0, :32] = 0  # an all-zero block
    w[1, 2, 32:64] *= 1e4
    packed, scale = quant.quantize_mxfp4(w)
    assert packed.dtype == np.int8 and packed.shape == (3, 64, 48) and scale.shape == (3, 64, 3)
    d = quant.dequantize_mxfp4(packed, scale)
    assert np.isfinite(d).all() and (d[0, 0, :32] == 0).all() and _exponents(scale)[0, 0, 0] == 0
    s = np.repeat(quant.e8m0_to_float32(scale), 32, -1)
    assert (np.abs(d - w) <= 0.25 * np.maximum(s, np.abs(w))).all()  # half an E2M1 step: 0.25 below 2, |x|/4 above
    ratio = np.abs(w).reshape(3, 64, 3, 32).max(-1) / quant.e8m0_to_float32(scale)
    assert ((ratio[ratio > 0] > 3) & (ratio[ratio > 0] <= 6)).all()  # scale rounded up, nothing saturates
    # Our expert layout [E, in, out] quantises along axis -2: the same bytes, transposed.
    pt, st = quant.quantize_mxfp4(np.swapaxes(w, -1, -2), axis=-2)
    np.testing.assert_array_equal(pt, np.swapaxes(packed, -1, -2))
    np.testing.assert_array_equal(_bits(st), _bits(np.swapaxes(scale, -1, -2)))
    # JAX gives the same bytes.
    pj, sj = jax.jit(quant.quantize_mxfp4)(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(pj), packed)
    np.testing.assert_array_equal(_bits(sj), _bits(scale))


# ---- QAT fake quantisation -----------------------------------------------------------------------------


def test_fp4_qat_forward_equals_exported_weights_bit_for_bit(rng):
    w = (rng.standard_normal((4, 256, 128)) * 0.02).astype(np.float32)  # [E, D, F]: input axis -2
    exported = quant.dequantize_mxfp4(*quant.quantize_mxfp4(w, axis=-2), axis=-2)
    fq = jax.jit(lambda x: quant.fake_quant_mxfp4(x, axis=-2))(jnp.asarray(w))
    np.testing.assert_array_equal(_bits(fq), _bits(exported))
    fq_bf16 = jax.jit(lambda x: quant.fake_quant_mxfp4(x, axis=-2))(jnp.asarray(w, jnp.bfloat16))
    exported_bf16 = quant.dequantize_mxfp4(*quant.quantize_mxfp4(w.astype(ml_dtypes.bfloat16), axis=-2), axis=-2)
    np.testing.assert_array_equal(np.asarray(fq_bf16, np.float32), exported_bf16)  # FP4 values are exact in bf16
    # The paper's FP4 -> FP8 step is exact for such weights, so the FP8-GEMM forward would be the same.
    assert quant.fp4_to_fp8_is_lossless(w, axis=-2)


def test_fp4_to_fp8_loss_is_detected():
    w = np.full((128, 128), 0.01, np.float32)
    w[0, :32] = 1e6  # 1x32 scales 2**17 vs 2**-9 in one 128x128 block: beyond E4M3's range
    assert not quant.fp4_to_fp8_is_lossless(w)


def test_fake_quant_gradients_are_straight_through(rng):
    w = jnp.asarray(rng.standard_normal((128, 64)) * 0.02, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
    fqs = (quant.fake_quant_fp8_blocks, quant.fake_quant_act_fp8, quant.fake_quant_mxfp4)

    @jax.jit
    def outs_and_grads(w, ct):
        return [fq(w) for fq in fqs], [jax.vjp(fq, w)[1](ct)[0] for fq in fqs]

    outs, grads = outs_and_grads(w, ct)
    for out, g in zip(outs, grads, strict=True):
        np.testing.assert_array_equal(g, ct)
        assert not np.array_equal(out, w)  # it does quantise
    exported = quant.dequantize_fp8_blocks(*quant.quantize_fp8_blocks(np.asarray(w)))
    np.testing.assert_array_equal(_bits(outs[0]), _bits(exported))


# ---- safetensors ---------------------------------------------------------------------------------------


def test_safetensors_fp8_round_trip(tmp_path, rng):
    from safetensors.numpy import load_file, save_file

    w = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    q, s = quant.quantize_fp8_blocks(w)
    packed, s4 = quant.quantize_mxfp4(w)
    path = str(tmp_path / "w.safetensors")
    save_file({"w.weight": q, "w.scale": s, "e.weight": packed, "e.scale": s4}, path)
    quant.patch_numpy_fp8_dtypes()
    quant.patch_numpy_fp8_dtypes()  # idempotent
    back = load_file(path)
    assert back["w.weight"].dtype == ml_dtypes.float8_e4m3fn and back["e.weight"].dtype == np.int8
    for k, v in {"w.weight": q, "w.scale": s, "e.weight": packed, "e.scale": s4}.items():
        np.testing.assert_array_equal(_bits(back[k]), _bits(v))
