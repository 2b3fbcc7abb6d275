"""FP8 activations in the grouped expert matmul: E4M3 tokens in 1x128 tiles times FP8 weight blocks.

The Pallas kernels (interpret mode on CPU) against the reference, values and the gradients of DeepSeek's FP8
backward (`expert_matmul_stored(..., activation_format="fp8")`); the reference against the emulation (fake-quantised
activations times dequantised weights) and against the FP8 backward rule spelt with float32 matmuls. Shapes as in
test_expert_matmul.py: M = 40 (not a multiple of the 16-row tile), K = 224 and N = 192 (partial 128-blocks).
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import formats
from pallas_kernels.expert_matmul import BlockSizes, expert_matmul
from pallas_kernels.expert_matmul.stored import expert_matmul_stored, fp8_backward_reference
from pallas_kernels.testing import assert_matches_reference
from tests.conftest import TOLERANCES

E, M, K, N = 4, 40, 224, 192
BLOCKS = BlockSizes(block_m=16, block_k=128, block_n=64)
GROUPS = [10, 0, 25, 3]  # an empty expert and unused rows


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.standard_normal((M, K)) * 2.0, jnp.float32)
    w = jnp.asarray(rng.standard_normal((E, K, N)) * 0.05, jnp.float32)  # float master weights [E, in, out]
    return lhs, w, jnp.asarray(GROUPS, jnp.int32)


@functools.cache
def _fn(impl: str, interpret: bool = False):
    kw = {} if impl == "reference" else {"interpret": interpret}

    def fn(lhs, w, gs):
        return expert_matmul_stored(lhs, w, gs, "fp8", activation_format="fp8", impl=impl, **kw)

    return fn


@pytest.mark.slow  # ~20 s per style on 2 CPU cores (forward, FP8 Dgrad and float Wgrad kernels interpreted)
@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_fp8_activation_kernel_matches_reference_values_and_fp8_gradients(impl, operands, interpret):
    report = assert_matches_reference(_fn(impl, interpret(impl)), _fn("reference"), operands,
                                      TOLERANCES["kernel_f32"], argnums=(0, 1), name=f"{impl}/fp8 activations")
    assert set(report) == {"value", "grad[0]", "grad[1]"}


def test_fp8_activation_reference_is_the_emulation_with_the_fp8_backward(operands):
    lhs, w, gs = operands
    dy = jnp.cos(jnp.arange(M * N, dtype=jnp.float32).reshape(M, N))

    @jax.jit
    def run(lhs, w, gs, dy):
        y, pull = jax.vjp(lambda a, b: _fn("reference")(a, b, gs), lhs, w)
        x_fq = formats.dequantize_act_fp8(*formats.quantize_act_fp8(lhs))
        w_fq = formats.dequantize_fp8_blocks(*formats.quantize_fp8_blocks(w))
        emulated = jax.lax.ragged_dot(x_fq, w_fq, gs, precision=jax.lax.Precision.HIGHEST)
        return y, emulated, pull(dy), fp8_backward_reference(lhs, w, gs, dy)

    y, emulated, (d_lhs, d_w), (want_lhs, want_w) = run(lhs, w, gs, dy)
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
    assert y.dtype == lhs.dtype and rel(y, emulated) <= TOLERANCES["kernel_f32"]
    assert rel(d_lhs, want_lhs) <= TOLERANCES["kernel_f32"] and rel(d_w, want_w) <= TOLERANCES["kernel_f32"]
    assert np.all(np.asarray(y[sum(GROUPS):]) == 0) and np.all(np.asarray(d_w[1]) == 0)  # unused rows, empty expert


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret=True pins the CPU dispatch")
def test_fp8_activation_bad_inputs_raise_value_error(operands):
    lhs, w, gs = (np.asarray(a) for a in operands)  # numpy: the formats quantise without compiling anything
    xq, xs = formats.quantize_act_fp8(lhs)
    wq, ws = formats.quantize_fp8_blocks(w)
    w4, s4 = formats.quantize_mxfp4(w, axis=-2)
    bad = [
        (dict(lhs=xq, rhs=w, group_sizes=gs, lhs_scale=xs), "need FP8 weights"),
        (dict(lhs=xq, rhs=w4, group_sizes=gs, rhs_scale=s4, lhs_scale=xs), "need FP8 weights"),
        (dict(lhs=xq, rhs=wq, group_sizes=gs, rhs_scale=ws), "need lhs_scale"),
        (dict(lhs=xq, rhs=wq, group_sizes=gs, rhs_scale=ws, lhs_scale=xs[:, :1]), "need lhs_scale"),
        (dict(lhs=lhs, rhs=wq, group_sizes=gs, rhs_scale=ws, lhs_scale=xs), "lhs_scale given"),
        (dict(lhs=lhs[:, :N], rhs=wq, group_sizes=gs, rhs_scale=ws, transpose_rhs=True), "needs FP8 activations"),
        (dict(lhs=xq, rhs=wq, group_sizes=gs, rhs_scale=ws, lhs_scale=xs, transpose_rhs=True), "transpose_rhs"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            expert_matmul(**kwargs, impl="pallas_gpu", interpret=True, block_sizes=BLOCKS)
    with pytest.raises(ValueError, match="needs weight_format='fp8'"):
        expert_matmul_stored(lhs, w, gs, "fp4", activation_format="fp8")
    with pytest.raises(ValueError, match="activation_format must be"):
        expert_matmul_stored(lhs, w, gs, "fp8", activation_format="e5m2")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_fp8_activation_kernels_lower_at_the_flash_expert_shape(platform):
    """The FP8-activation forward and Dgrad (`transpose_rhs`) lower for CUDA (Triton) and TPU (Mosaic) at V4-Flash's
    w1 of the local experts of an 8-way expert split, default block sizes (lowering only: nothing is compiled)."""
    from pallas_kernels import budgets
    from pallas_kernels.expert_matmul import pallas_gpu, pallas_tpu

    if platform == "tpu" and jax.default_backend() != "tpu":
        pytest.skip("Mosaic lowers the FP8 tiles' conversion only with a TPU attached: it asks the chip version")
    module = pallas_gpu if platform == "cuda" else pallas_tpu
    shape = budgets.FLASH
    e, d, f, m = shape.local_experts, shape.hidden, shape.expert_hidden, 2048
    sd, e4m3, e8m0 = jax.ShapeDtypeStruct, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e8m0fnu

    def fwd_and_dgrad(x, xs, w, ws, dy, dys, gs):
        return (module.expert_matmul(x, w, gs, ws, lhs_scale=xs),
                module.expert_matmul(dy, w, gs, ws, lhs_scale=dys, transpose_rhs=True))

    shapes = (sd((m, d), e4m3), sd((m, d // 128), e8m0), sd((e, d, f), e4m3), sd((e, d // 128, f // 128), e8m0),
              sd((m, f), e4m3), sd((m, f // 128), e8m0), sd((e,), jnp.int32))
    text = jax.jit(fwd_and_dgrad).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert "expert_matmul_fp8_fp8act" in text and "expert_matmul_fp8_fp8act_dx" in text
