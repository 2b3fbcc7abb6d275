"""Dense attention: reference (and its entry-mass helper) vs a brute-force full-mask anchor, and both
Pallas styles (interpret mode) vs the reference, in values and gradients w.r.t. q, kv, entries and sink."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.dense_attention import (
    dense_attention,
    dense_attention_and_entry_mass,
    pallas_gpu,
    pallas_tpu,
    reference,
)
from tests.conftest import TOLERANCES
from tests.pallas_kernels.attention_cases import (
    Case,
    attention_inputs,
    compare,
    brute_force_attention,
    dense_mask,
    matches_reference,
)

CASES = {
    # CSA's dense phase: ratio 4, C = 11 entries over two 8-entry blocks; T = 44 is not a multiple of the
    # 16-token blocks; row 0 packs three documents (entries straddling two get segment -1) and padding.
    "packed": Case(T=44, window=16, ratio=4, topk=0, layouts=((10, 21, 9), (44,))),
    # Shorter than the window and than one compressed window: C = 0, so this is pure sliding-window attention.
    "short": Case(T=12, window=16, ratio=16, topk=0, layouts=((5, 7),)),
}
# Reference-only anchor cases (cheap to compile): another ratio, and a window longer than the documents.
ANCHOR_ONLY = {
    "ratio8": Case(T=40, window=24, ratio=8, topk=0, layouts=((17, 23), (30,))),
}
BLOCKS = {
    "pallas_tpu": pallas_tpu.BlockSizes(block_q=16, block_kv=16, block_e=8, block_q_dkv=16, block_kv_dkv=16),
    "pallas_gpu": pallas_gpu.BlockSizes(block_kv=16, block_e=8, block_kv_dkv=16),
}
DIFF_ARGS = (0, 1, 2, 4)  # q, kv, entries, sink


@functools.cache
def problem(name: str):
    case = {**CASES, **ANCHOR_ONLY}[name]
    x, _ = attention_inputs(case, seed=1)
    return case, (x["q"], x["kv"], x["entries"], x["entry_segment"], x["sink"], x["segment_ids"])


@functools.cache
def attention_fn(name: str, impl: str, interpret: bool = False):
    case = {**CASES, **ANCHOR_ONLY}[name]
    if impl == "reference":
        return functools.partial(reference.dense_attention, ratio=case.ratio, window=case.window)
    return functools.partial(
        dense_attention, ratio=case.ratio, window=case.window, impl=impl, block_sizes=BLOCKS[impl], interpret=interpret
    )


@pytest.mark.parametrize("name", sorted({**CASES, **ANCHOR_ONLY}))
def test_reference_matches_brute_force(name):
    """The anchor: full masked attention under a [T, T + C] mask built by loops straight from the rules."""
    case, args = problem(name)
    mask = dense_mask(np.asarray(args[5]), np.asarray(args[3]), case.ratio, case.window)

    def brute_force(q, kv, entries, entry_segment, sink, seg):
        return brute_force_attention(q, kv, entries, sink, mask)[0]

    matches_reference(
        attention_fn(name, "reference"),
        brute_force,
        args,
        TOLERANCES["kernel_f32"],
        argnums=DIFF_ARGS,
        name=f"dense reference vs brute force {name}",
    )


def test_entry_mass_matches_brute_force():
    case, args = problem("packed")
    q, kv, entries, entry_segment, sink, seg = args
    mask = dense_mask(np.asarray(seg), np.asarray(entry_segment), case.ratio, case.window)
    out, mass = jax.jit(functools.partial(dense_attention_and_entry_mass, ratio=case.ratio, window=case.window))(*args)
    want_out, p = brute_force_attention(q, kv, entries, sink, mask)
    tol = TOLERANCES["kernel_f32"]
    compare("dense output next to the mass", out, want_out, tol)
    compare("entry mass", mass, p[..., case.T :].sum(axis=2), tol)
    assert mass.shape == (case.B, case.T, case.C)
    assert np.all(np.asarray(mass)[~mask[..., case.T :]] == 0.0), "non-admissible entries must get zero mass"


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
        name=f"dense {impl} {name}",
    )


def test_bad_requests_raise_value_error():
    case, args = problem("short")
    q, kv, entries, entry_segment, sink, seg = args
    with pytest.raises(ValueError, match="interpret"):
        dense_attention(*args, ratio=case.ratio, impl="pallas_tpu")
    with pytest.raises(ValueError, match="entry_segment"):
        dense_attention(q, kv, entries, entry_segment[:, None], sink, seg, ratio=case.ratio)
    with pytest.raises(ValueError, match="ratio"):
        dense_attention(*args, ratio=0)
    with pytest.raises(ValueError, match="sink"):
        dense_attention(q, kv, entries, entry_segment, sink[:1], seg, ratio=case.ratio)


@pytest.mark.parametrize("platform,module", [("cuda", pallas_gpu), ("tpu", pallas_tpu)])
def test_kernels_lower_for_their_backend(platform, module):
    """Forward and backward lower to Triton (CUDA) / Mosaic (TPU) at real tile sizes in bfloat16, for the
    dense-phase ratio 4 (nothing is compiled or run)."""
    B, T, N, H, ratio = 1, 512, 16, 128, 4
    C = T // ratio
    sd = jax.ShapeDtypeStruct
    shapes = (
        sd((B, T, N, H), jnp.bfloat16),
        sd((B, T, H), jnp.bfloat16),
        sd((B, C, H), jnp.bfloat16),
        sd((B, C), jnp.int32),
        sd((N,), jnp.float32),
        sd((B, T), jnp.int32),
    )

    def fwd_bwd(q, kv, entries, entry_segment, sink, seg):
        def f(q, kv, entries, sink):
            return module.dense_attention(q, kv, entries, entry_segment, sink, seg, ratio=ratio)

        out, vjp = jax.vjp(f, q, kv, entries, sink)
        return out, vjp(out)

    text = jax.jit(fwd_bwd).trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert "dense_fwd" in text and "dense_dq" in text and "dense_dentries" in text and "window_dkv" in text
