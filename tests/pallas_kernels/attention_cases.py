"""Shared cases and brute-force anchors for the sparse / dense attention and lightning-indexer tests.

The anchors build the full [T, T + C] visibility mask with Python loops straight from the rules
(window, admissibility, top-k membership) and run full masked attention on it: slow, obvious,
and independent of the block logic of the references and kernels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: shapes plus the document layout of each batch row."""

    T: int
    window: int
    ratio: int
    topk: int
    layouts: tuple[tuple[int, ...], ...]  # per batch row: lengths of segments 1, 2, ...; the rest is padding (0)
    N: int = 2
    H: int = 32
    NI: int = 2
    HI: int = 16

    @property
    def B(self) -> int:
        return len(self.layouts)

    @property
    def C(self) -> int:
        return self.T // self.ratio


def segments(case: Case) -> np.ndarray:
    seg = np.zeros((case.B, case.T), np.int32)
    for b, lengths in enumerate(case.layouts):
        start = 0
        for doc, length in enumerate(lengths, start=1):
            seg[b, start : start + length] = doc
            start += length
    return seg


def entry_segments(seg: np.ndarray, ratio: int) -> np.ndarray:
    """Segment of each compressed entry if its window lies in one segment, else -1."""
    B, T = seg.shape
    C = T // ratio
    out = np.full((B, C), -1, np.int32)
    for b in range(B):
        for c in range(C):
            w = seg[b, c * ratio : (c + 1) * ratio]
            if np.all(w == w[0]):
                out[b, c] = w[0]
    return out


def admissible(seg, eseg, ratio, b, t) -> list[int]:
    return [c for c in range(eseg.shape[1]) if (c + 1) * ratio - 1 <= t and eseg[b, c] == seg[b, t]]


def random_topk(seg, eseg, ratio, K, rng) -> np.ndarray:
    """Random distinct admissible entries per query in random order, padded with -1."""
    B, T = seg.shape
    out = np.full((B, T, K), -1, np.int32)
    for b in range(B):
        for t in range(T):
            adm = admissible(seg, eseg, ratio, b, t)
            pick = rng.permutation(adm)[: min(K, len(adm))]
            slots = rng.permutation(K)[: len(pick)]
            out[b, t, slots] = pick
    return out


def window_visible(seg, window, b, t, j) -> bool:
    return t - window < j <= t and seg[b, j] == seg[b, t]


def sparse_mask(seg, topk_idx, window, C) -> np.ndarray:
    """[B, T, T + C] visibility from the rules: window plus the selected entries."""
    B, T = seg.shape
    mask = np.zeros((B, T, T + C), bool)
    for b in range(B):
        for t in range(T):
            for j in range(T):
                mask[b, t, j] = window_visible(seg, window, b, t, j)
            for c in topk_idx[b, t]:
                if c >= 0:
                    mask[b, t, T + c] = True
    return mask


def dense_mask(seg, eseg, ratio, window) -> np.ndarray:
    """[B, T, T + C] visibility from the rules: window plus every admissible entry."""
    B, T = seg.shape
    C = eseg.shape[1]
    mask = np.zeros((B, T, T + C), bool)
    for b in range(B):
        for t in range(T):
            for j in range(T):
                mask[b, t, j] = window_visible(seg, window, b, t, j)
            for c in admissible(seg, eseg, ratio, b, t):
                mask[b, t, T + c] = True
    return mask


def brute_force_attention(q, kv, entries, sink, mask):
    """Plain softmax-with-sink attention over keys concat(kv, entries) under a [B, T, T + C] mask."""
    keys = jnp.concatenate([kv, entries], axis=1).astype(jnp.float32)
    z = jnp.einsum("btnh,bsh->btns", q.astype(jnp.float32), keys) * q.shape[-1] ** -0.5
    z = jnp.where(jnp.asarray(mask)[:, :, None, :], z, -jnp.inf)
    s = sink.astype(jnp.float32)[:, None]
    m = jax.lax.stop_gradient(jnp.maximum(z.max(-1, keepdims=True), s))
    e = jnp.exp(z - m)
    p = e / (e.sum(-1, keepdims=True) + jnp.exp(s - m))
    return jnp.einsum("btns,bsh->btnh", p, keys).astype(q.dtype), p


def brute_indexer_scores(q_idx, k_idx, w, seg, eseg, ratio) -> np.ndarray:
    """float64 scores with -inf on non-admissible entries, straight from the formula."""
    q_idx, k_idx, w = (np.asarray(x, np.float64) for x in (q_idx, k_idx, w))
    B, T, NI, HI = q_idx.shape
    C = k_idx.shape[1]
    out = np.full((B, T, C), -np.inf)
    for b in range(B):
        for t in range(T):
            for c in admissible(seg, eseg, ratio, b, t):
                dots = np.maximum(q_idx[b, t] @ k_idx[b, c], 0.0)
                out[b, t, c] = np.sum(w[b, t] * NI**-0.5 * dots * HI**-0.5)
    return out


def attention_inputs(case: Case, seed: int = 0):
    """Random f32 q, kv, entries, sink, segment ids and entry segments for a case."""
    rng = np.random.default_rng(seed)
    seg = segments(case)
    eseg = entry_segments(seg, case.ratio)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return {
        "q": f(case.B, case.T, case.N, case.H),
        "kv": f(case.B, case.T, case.H),
        "entries": f(case.B, case.C, case.H),
        "sink": f(case.N),
        "segment_ids": jnp.asarray(seg),
        "entry_segment": jnp.asarray(eseg),
    }, rng


def compare(name: str, got, want, tol: float, scale_by_max: bool = False) -> tuple[float, float]:
    """Asserts max |got - want| <= tol (relative to max |want| if scale_by_max); prints max/mean."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want)
    denom = max(float(np.abs(want).max()), 1.0) if scale_by_max and want.size else 1.0
    max_err = float(err.max()) / denom if err.size else 0.0
    mean_err = float(err.mean()) / denom if err.size else 0.0
    print(
        f"{name}: max abs err {max_err:.3e}, mean abs err {mean_err:.3e}"
        + (" (relative to max)" if scale_by_max else "")
    )
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    assert max_err <= tol, f"{name}: max abs err {max_err:.3e} > {tol:.1e}"
    return max_err, mean_err


# Compile options of the checked programs: LLVM optimisation of the interpreted Pallas programs (large XLA
# programs) is about 40% of this suite's time and does not change what is computed, so it is switched off.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_COMPILED: dict = {}


def _value_and_vjp(fn, argnums: tuple[int, ...], args, cotangent):
    """(fn(*args), VJP w.r.t. args[argnums]) from a program compiled once per (fn, argnums, shapes)."""
    key = (fn, argnums, tuple((a.shape, str(a.dtype)) for a in args))
    if key not in _COMPILED:

        def run(args, cotangent):
            def partial_fn(*diff):
                full = list(args)
                for i, a in zip(argnums, diff, strict=True):
                    full[i] = a
                return fn(*full)

            out, vjp = jax.vjp(partial_fn, *(args[i] for i in argnums))
            return out, vjp(cotangent)

        _COMPILED[key] = jax.jit(run).lower(args, cotangent).compile(FAST_COMPILE)
    return _COMPILED[key](args, cotangent)


def matches_reference(impl_fn, ref_fn, args, tol: float, *, argnums, name: str) -> None:
    """The check of `pallas_kernels.testing.assert_matches_reference` (values and VJPs for a fixed random
    cotangent; max |impl - ref| <= tol * max(1, max |ref|); max and mean abs errors printed), with both
    programs compiled with FAST_COMPILE, which the shared helper cannot pass. Each (function, argnums,
    shapes) is compiled once, so the reference is shared by the anchor and the kernel tests."""
    args = tuple(args)
    argnums = tuple(argnums)
    ref_out = jax.eval_shape(ref_fn, *args)
    # numpy, not jax.random: an eager jax.random call compiles a small program per shape.
    cotangent = jnp.asarray(np.random.default_rng(0).standard_normal(ref_out.shape), ref_out.dtype)
    got, got_grads = _value_and_vjp(impl_fn, argnums, args, cotangent)
    want, want_grads = _value_and_vjp(ref_fn, argnums, args, cotangent)
    pairs = [("value", got, want)] + [(f"grad[{i}]", g, w) for i, g, w in zip(argnums, got_grads, want_grads)]
    failed = []
    for key, g, w in pairs:
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (name, key, g.shape, w.shape)
        err = np.abs(g - w)
        max_err, mean_err = (float(err.max()), float(err.mean())) if err.size else (0.0, 0.0)
        print(f"{name} {key}: max abs err {max_err:.3g}, mean abs err {mean_err:.3g}")
        scale = float(np.abs(w).max()) if w.size else 0.0
        if not np.isfinite(g).all() or max_err > tol * max(1.0, scale):
            failed.append(key)
    assert not failed, f"{name}: {', '.join(failed)} off (tol {tol:g} x scale)"
