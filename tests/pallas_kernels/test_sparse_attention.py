"""Sparse attention: reference vs a brute-force full-mask anchor, and both Pallas styles (interpret mode)
vs the reference, in values and gradients w.r.t. q, kv, entries and sink."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from deepseek_v4 import attention
from pallas_kernels.sparse_attention import pallas_gpu, pallas_tpu, reference, sparse_attention
from tests.conftest import TOLERANCES
from tests.pallas_kernels.attention_cases import (
    Case,
    attention_inputs,
    compare,
    sparse_mask,
    brute_force_attention,
    matches_reference,
    random_topk,
)

CASES = {
    # T = 44 is not a multiple of the 16-token blocks; row 0 packs three documents and 4 padding tokens,
    # row 1 is one document; top-k 16 exceeds the C = 11 entries, so most slots are -1.
    "packed": Case(T=44, window=16, ratio=4, topk=16, layouts=((10, 21, 9), (44,))),
    # The whole sequence is shorter than the window.
    "short": Case(T=12, window=16, ratio=4, topk=5, layouts=((5, 7),)),
}
BLOCKS = {
    "pallas_tpu": pallas_tpu.BlockSizes(block_q=16, block_kv=16, block_k=8, block_q_dkv=16, block_kv_dkv=16),
    "pallas_gpu": pallas_gpu.BlockSizes(block_kv=16, block_k=8, block_kv_dkv=16),
}
DIFF_ARGS = (0, 1, 2, 4)  # q, kv, entries, sink


@functools.cache
def problem(name: str):
    case = CASES[name]
    x, rng = attention_inputs(case)
    topk = random_topk(np.asarray(x["segment_ids"]), np.asarray(x["entry_segment"]), case.ratio, case.topk, rng)
    args = (x["q"], x["kv"], x["entries"], jnp.asarray(topk), x["sink"], x["segment_ids"])
    return case, args


@functools.cache
def attention_fn(name: str, impl: str, interpret: bool = False):
    """One function object per (case, impl), so the shared checker compiles each once."""
    case = CASES[name]
    if impl == "reference":
        return functools.partial(reference.sparse_attention, window=case.window)
    return functools.partial(sparse_attention, window=case.window, impl=impl, block_sizes=BLOCKS[impl],
                             interpret=interpret)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_brute_force(name):
    """The anchor: full masked attention under a [T, T + C] mask built by loops straight from the rules."""
    case, args = problem(name)
    mask = sparse_mask(np.asarray(args[5]), np.asarray(args[3]), case.window, case.C)

    def brute_force(q, kv, entries, topk, sink, seg):
        return brute_force_attention(q, kv, entries, sink, mask)[0]

    matches_reference(
        attention_fn(name, "reference"),
        brute_force,
        args,
        TOLERANCES["kernel_f32"],
        argnums=DIFF_ARGS,
        name=f"sparse reference vs brute force {name}",
    )


@pytest.mark.parametrize("impl", sorted(BLOCKS))
@pytest.mark.parametrize("name", sorted(CASES))
def test_pallas_matches_reference(name, impl, interpret):
    _, args = problem(name)
    matches_reference(
        attention_fn(name, impl, interpret(impl)),
        attention_fn(name, "reference"),
        args,
        TOLERANCES["kernel_f32"],
        argnums=DIFF_ARGS,
        name=f"sparse {impl} {name}",
    )


def test_pallas_under_a_mesh_matches_reference(interpret):
    """On a (data=2, tensor=2) mesh the attention layer's `per_shard` runs the kernel per shard under shard_map
    (batch over data, heads over tensor); kv/entries gradients are summed over the head shards and the sink's
    over the batch shards."""
    _, args = problem("packed")
    q, kv, entries, topk, sink, seg = args
    mesh = Mesh(
        np.array(jax.devices()[:4]).reshape(2, 1, 1, 2),
        ("data", "fsdp", "expert", "tensor"),
        axis_types=(AxisType.Auto,) * 4,
    )
    ct = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)

    def value_and_grads(impl, **kw):
        kernel = functools.partial(sparse_attention, window=CASES["packed"].window, impl=impl, **kw)

        def f(q, kv, entries, sink):
            return attention.per_shard(kernel, (q, kv, entries, topk, sink, seg), attention.SPARSE_ARG_AXES,
                                       attention.Q_AXES, q.shape)

        @jax.jit
        def run(*diff):
            out, vjp = jax.vjp(f, *diff)
            return out, vjp(ct)

        return run

    want = value_and_grads("reference")(q, kv, entries, sink)
    with jax.set_mesh(mesh):
        sharded = value_and_grads("pallas_gpu", block_sizes=BLOCKS["pallas_gpu"], interpret=interpret("pallas_gpu"))
        assert "shard_map" in str(jax.make_jaxpr(sharded)(q, kv, entries, sink))
        got = sharded(q, kv, entries, sink)
    tol = TOLERANCES["kernel_f32"]
    compare("sparse pallas_gpu on a 2x2 mesh, value", got[0], want[0], tol)
    for label, g, w in zip(("q", "kv", "entries", "sink"), got[1], want[1], strict=True):
        compare(f"sparse pallas_gpu on a 2x2 mesh, d{label}", g, w, tol, scale_by_max=True)


def test_default_impl_on_cpu_is_the_reference():
    _, args = problem("short")
    default = functools.partial(sparse_attention, window=CASES["short"].window)
    assert str(jax.make_jaxpr(default)(*args)) == str(jax.make_jaxpr(attention_fn("short", "reference"))(*args))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="asserts the CPU dispatch rule (impl='pallas' without "
                    "interpret raises); on a GPU/TPU it names the native kernel")
def test_bad_requests_raise_value_error():
    _, args = problem("short")
    q, kv, entries, topk, sink, seg = args
    with pytest.raises(ValueError, match="interpret"):
        sparse_attention(*args, impl="pallas")
    with pytest.raises(ValueError, match="impl must be"):
        sparse_attention(*args, impl="cuda")
    with pytest.raises(ValueError, match="ambiguous"):
        sparse_attention(*args, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="block_sizes"):
        sparse_attention(*args, impl="pallas_gpu", interpret=True, block_sizes=BLOCKS["pallas_tpu"])
    with pytest.raises(ValueError, match="kv must be"):
        sparse_attention(q, kv[:, :-1], entries, topk, sink, seg)
    with pytest.raises(ValueError, match="topk_idx"):
        sparse_attention(q, kv, entries, topk.astype(jnp.float32), sink, seg)
    with pytest.raises(ValueError, match="power-of-two"):
        sparse_attention(*args, impl="pallas_gpu", interpret=True, block_sizes=pallas_gpu.BlockSizes(block_kv=24))


@pytest.mark.parametrize("platform,module", [("cuda", pallas_gpu), ("tpu", pallas_tpu)])
def test_kernels_lower_for_their_backend(platform, module):
    """Forward and backward lower to Triton (CUDA) / Mosaic (TPU) at real tile sizes in bfloat16
    (catches ops and block shapes the backend rejects; nothing is compiled or run)."""
    B, T, N, H, C, K = 1, 256, 16, 128, 64, 128
    sd = jax.ShapeDtypeStruct
    shapes = (
        sd((B, T, N, H), jnp.bfloat16),
        sd((B, T, H), jnp.bfloat16),
        sd((B, C, H), jnp.bfloat16),
        sd((B, T, K), jnp.int32),
        sd((N,), jnp.float32),
        sd((B, T), jnp.int32),
    )

    def fwd_bwd(q, kv, entries, topk, sink, seg):
        out, vjp = jax.vjp(lambda *d: module.sparse_attention(d[0], d[1], d[2], topk, d[3], seg), q, kv, entries, sink)
        return out, vjp(out)

    text = jax.jit(fwd_bwd).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert "sparse_fwd" in text and "sparse_dq" in text and "window_dkv" in text
