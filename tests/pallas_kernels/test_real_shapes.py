"""Every kernel family lowers for CUDA (Triton) and TPU (Mosaic) at V4-Flash and V4-Pro shapes, forward and
backward, with its default block sizes; and those block sizes fit the H200's shared memory and a TPU core's
scoped VMEM by the arithmetic of docs/kernels.md ("Block sizes at the real shapes"). Lowering needs no device:
nothing is compiled or run (compiling needs the device's toolchain, which `tools.device_check` exercises)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import pytest

from pallas_kernels import budgets
from pallas_kernels.dense_attention import pallas_gpu as dense_gpu
from pallas_kernels.dense_attention import pallas_tpu as dense_tpu
from pallas_kernels.expert_matmul import pallas_gpu as expert_gpu
from pallas_kernels.expert_matmul import pallas_tpu as expert_tpu
from pallas_kernels.lightning_indexer import pallas_gpu as indexer_gpu
from pallas_kernels.lightning_indexer import pallas_tpu as indexer_tpu
from pallas_kernels.sparse_attention import pallas_gpu as sparse_gpu
from pallas_kernels.sparse_attention import pallas_tpu as sparse_tpu
from tests.conftest import TOLERANCES

SD = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
T = 1024  # tokens per row: the grid repeats the same program, so lowering at 1K checks what 1M would run
MODELS = {
    "flash": budgets.FLASH,
    "pro": pytest.param(budgets.PRO, marks=pytest.mark.slow),
}
PLATFORMS = {"cuda": (dense_gpu, sparse_gpu, indexer_gpu, expert_gpu), "tpu": (dense_tpu, sparse_tpu, indexer_tpu,
                                                                               expert_tpu)}


def _lower(fn, shapes, platform):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("ratio", [4, 128], ids=["csa_dense_phase", "hca"])
def test_dense_attention_lowers(shape, ratio, platform):
    module = PLATFORMS[platform][0]
    n, h, c = shape.heads, shape.head_dim, T // ratio
    shapes = (SD((1, T, n, h), BF16), SD((1, T, h), BF16), SD((1, c, h), BF16), SD((1, c), jnp.int32),
              SD((n,), jnp.float32), SD((1, T), jnp.int32))

    def fwd_bwd(q, kv, entries, entry_segment, sink, seg):
        f = lambda q, kv, e, s: module.dense_attention(q, kv, e, entry_segment, s, seg, ratio=ratio,  # noqa: E731
                                                        window=shape.window)
        out, vjp = jax.vjp(f, q, kv, entries, sink)
        return out, vjp(out)

    text = _lower(fwd_bwd, shapes, platform)
    assert "dense_fwd" in text and "dense_dq" in text and "window_dkv" in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", MODELS.values(), ids=MODELS.keys())
def test_sparse_attention_lowers(shape, platform):
    module = PLATFORMS[platform][1]
    n, h, k, c = shape.heads, shape.head_dim, shape.topk, T // shape.csa_ratio
    shapes = (SD((1, T, n, h), BF16), SD((1, T, h), BF16), SD((1, c, h), BF16), SD((1, T, k), jnp.int32),
              SD((n,), jnp.float32), SD((1, T), jnp.int32))

    def fwd_bwd(q, kv, entries, topk, sink, seg):
        f = lambda q, kv, e, s: module.sparse_attention(q, kv, e, topk, s, seg, window=shape.window)  # noqa: E731
        out, vjp = jax.vjp(f, q, kv, entries, sink)
        return out, vjp(out)

    text = _lower(fwd_bwd, shapes, platform)
    assert "sparse_fwd" in text and "sparse_dq" in text and "window_dkv" in text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", MODELS.values(), ids=MODELS.keys())
def test_lightning_indexer_lowers(shape, platform):
    module = PLATFORMS[platform][2]
    ratio, ni, hi = shape.csa_ratio, shape.index_heads, shape.index_head_dim
    t = 4 * shape.topk  # enough entries (T / ratio = topk) that the top-k is a real selection
    shapes = (SD((1, t, ni, hi), BF16), SD((1, t // ratio, hi), BF16), SD((1, t, ni), BF16),
              SD((1, t // ratio), jnp.int32), SD((1, t), jnp.int32))
    fn = functools.partial(module.lightning_indexer, ratio=ratio, topk=shape.topk)
    assert "indexer_scores" in _lower(fn, shapes, platform)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("shape", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "mxfp4"])
def test_expert_matmul_lowers(shape, fmt, platform):
    """w1 of the routed experts ([E, D, F], the local experts of an 8-way expert split), forward and the VJP
    w.r.t. the tokens (and the weights, when float)."""
    if platform == "tpu" and fmt != "bf16" and jax.default_backend() != "tpu":
        pytest.skip("Mosaic lowers sign() (the FP8/MXFP4 decode) only with a TPU attached: it asks the chip version")
    module = PLATFORMS[platform][3]
    e, d, f, m = shape.local_experts, shape.hidden, shape.expert_hidden, 2048
    if fmt == "bf16":
        w, s = SD((e, d, f), BF16), None
    elif fmt == "fp8":
        w, s = SD((e, d, f), ml_dtypes.float8_e4m3fn), SD((e, d // 128, f // 128), ml_dtypes.float8_e8m0fnu)
    else:
        w, s = SD((e, d // 2, f), jnp.int8), SD((e, d // 32, f), ml_dtypes.float8_e8m0fnu)

    def fwd_bwd(x, w, s, gs):
        if fmt == "bf16":
            out, vjp = jax.vjp(lambda x, w: module.expert_matmul(x, w, gs), x, w)
        else:
            out, vjp = jax.vjp(lambda x: module.expert_matmul(x, w, gs, s), x)
        return out, vjp(out)

    shapes = (SD((m, d), BF16), w, s, SD((e,), jnp.int32))
    if s is None:
        text = _lower(lambda x, w, gs: fwd_bwd(x, w, None, gs), shapes[:2] + shapes[3:], platform)
    else:
        text = _lower(fwd_bwd, shapes, platform)
    assert f"expert_matmul_{'float' if fmt == 'bf16' else fmt}" in text and "expert_matmul_" in text


@pytest.mark.parametrize("shape,gpu_heads", [(budgets.FLASH, 64), (budgets.PRO, 64)], ids=["flash", "pro"])
def test_default_blocks_fit_h200_shared_memory_and_tpu_vmem(shape, gpu_heads):
    """Flash fits whole; Pro's 128 heads of 512 fit a TPU core, and an H200 with the heads split two ways over
    "tensor" (64 per device: the dq program holds q and do, 2 x 128 x 512 x 2 bytes = 256 KiB, above 227 KiB,
    at 128)."""
    rows = [r for r in budgets.report(shape) if r["platform"] == "tpu"]
    rows += [r for r in budgets.report(shape, gpu_heads) if r["platform"] == "cuda"]
    assert len(rows) == 8
    for row in rows:
        assert row["bytes"] <= row["limit"], f"{row['kernel']} on {row['platform']}: {row['bytes']} > {row['limit']}"
        if "acc_registers_per_thread" in row:
            assert row["acc_registers_per_thread"] <= budgets.GPU_ACC_REGISTERS_PER_THREAD
    gpu_pro_whole = [r for r in budgets.report(budgets.PRO) if r["platform"] == "cuda" and "attention" in r["kernel"]]
    assert all(r["bytes"] > budgets.H200_SHARED_MEMORY for r in gpu_pro_whole)


def test_small_shapes_keep_the_kernels_default_blocks():
    for mod, platform in ((dense_gpu, "cuda"), (sparse_gpu, "cuda"), (dense_tpu, "tpu"), (sparse_tpu, "tpu")):
        assert budgets.attention_block_sizes(mod.BlockSizes, platform, 16, 128) == mod.BlockSizes()


def test_budget_shapes_are_the_presets():
    from deepseek_v4 import get_config

    for shape in (budgets.FLASH, budgets.PRO):
        c = get_config(shape.name)
        assert (shape.heads, shape.head_dim, shape.window, shape.csa_ratio, shape.hca_ratio, shape.topk,
                shape.index_heads, shape.index_head_dim, shape.hidden, shape.expert_hidden,
                shape.local_experts * 8) == (
            c.num_attention_heads, c.head_dim, c.sliding_window, c.csa_ratio, c.hca_ratio, c.index_topk,
            c.index_n_heads, c.index_head_dim, c.hidden_size, c.moe_intermediate_size, c.n_routed_experts)


@pytest.mark.slow
def test_flash_width_default_blocks_compute_the_reference_values(interpret):
    """The blocks `budgets` picks at 64 heads of 512 (TPU: 16 queries per step; GPU: 8 warps, one stage) give the
    reference's forward values, run by the kernels' own logic (interpreted on CPU) on 128 tokens."""
    from pallas_kernels.dense_attention import dense_attention
    from pallas_kernels.sparse_attention import sparse_attention

    t, n, h, ratio = 128, budgets.FLASH.heads, budgets.FLASH.head_dim, 4
    c = t // ratio
    k = jax.random.split(jax.random.key(0), 4)
    q, kv = jax.random.normal(k[0], (1, t, n, h)), jax.random.normal(k[1], (1, t, h))
    entries = jax.random.normal(k[2], (1, c, h))
    sink, seg, eseg = jnp.zeros((n,)), jnp.ones((1, t), jnp.int32), jnp.ones((1, c), jnp.int32)
    visible = jnp.maximum((jnp.arange(t) + 1) // ratio, 1)[:, None]
    topk = (jax.random.randint(k[3], (1, t, 16), 0, 1 << 20) % visible).astype(jnp.int32)
    dense_ref = dense_attention(q, kv, entries, eseg, sink, seg, ratio=ratio, impl="reference")
    sparse_ref = sparse_attention(q, kv, entries, topk, sink, seg, impl="reference")
    for impl in ("pallas_gpu", "pallas_tpu"):
        dense = jax.jit(lambda *a: dense_attention(*a, ratio=ratio, impl=impl, interpret=interpret(impl)))(
            q, kv, entries, eseg, sink, seg)
        sparse = jax.jit(lambda *a: sparse_attention(*a, impl=impl, interpret=interpret(impl)))(
            q, kv, entries, topk, sink, seg)
        for got, want in ((dense, dense_ref), (sparse, sparse_ref)):
            assert float(jnp.max(jnp.abs(got - want))) <= TOLERANCES["kernel_f32"] * max(1.0, float(
                jnp.max(jnp.abs(want))))
