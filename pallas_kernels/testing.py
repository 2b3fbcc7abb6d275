"""Kernel-vs-reference checks shared by the kernel tests: values and VJPs, with max and mean abs error."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def _value_and_vjp(fn: Callable, argnums: tuple[int, ...]) -> Callable:
    """jit(args, cotangent) -> (fn(*args), VJP w.r.t. args[argnums]); cached so tests share compilations."""

    @jax.jit
    def run(args, cotangent):
        def partial_fn(*diff):
            full = list(args)
            for i, a in zip(argnums, diff, strict=True):
                full[i] = a
            return fn(*full)

        out, vjp = jax.vjp(partial_fn, *(args[i] for i in argnums))
        return out, vjp(cotangent)

    return run


def _errors(got, want) -> tuple[float, float, float]:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != reference shape {want.shape}")
    err = np.abs(got - want)
    scale = float(np.abs(want).max()) if want.size else 0.0
    return (float(err.max()) if err.size else 0.0), (float(err.mean()) if err.size else 0.0), scale


def assert_matches_reference(
    impl_fn: Callable,
    ref_fn: Callable,
    args: Sequence[Any],
    tol: float,
    *,
    argnums: Sequence[int] = (0,),
    seed: int = 0,
    name: str = "",
) -> dict[str, tuple[float, float]]:
    """Check that `impl_fn(*args)` and its VJP match `ref_fn(*args)` and its VJP.

    Both functions are jitted once per (function, argnums) and cached, so pass the same function objects across
    tests to share compilations. The cotangent is a fixed random normal array shaped like the output.
    An error passes when max |impl - ref| <= tol * max(1, max |ref|) (tol is relative to the reference's scale,
    since outputs and gradients differ in magnitude by orders).

    Args:
      impl_fn, ref_fn: functions of `args` returning one array.
      args: positional arguments (arrays or None).
      tol: relative tolerance, e.g. a `TOLERANCES` entry of tests/conftest.py.
      argnums: positions in `args` to differentiate.
      seed: seed of the random cotangent.
      name: label for the report.

    Returns:
      {"value": (max_abs_err, mean_abs_err), "grad[i]": (...), ...} for every compared quantity.

    Raises:
      AssertionError: with the full report when any quantity is off or non-finite.
    """
    argnums = tuple(argnums)
    args = tuple(args)
    ref_out = jax.eval_shape(ref_fn, *args)
    cotangent = jax.random.normal(jax.random.key(seed), ref_out.shape, jnp.float32).astype(ref_out.dtype)
    got, got_grads = _value_and_vjp(impl_fn, argnums)(args, cotangent)
    want, want_grads = _value_and_vjp(ref_fn, argnums)(args, cotangent)
    pairs = {"value": (got, want)}
    for i, g, w in zip(argnums, got_grads, want_grads, strict=True):
        pairs[f"grad[{i}]"] = (g, w)
    report, failed = {}, []
    for key, (g, w) in pairs.items():
        max_err, mean_err, scale = _errors(g, w)
        report[key] = (max_err, mean_err)
        if not np.isfinite(np.asarray(g, np.float64)).all() or not max_err <= tol * max(1.0, scale):
            failed.append(key)
    lines = [f"{name} {k}: max abs err {v[0]:.3g}, mean abs err {v[1]:.3g}" for k, v in report.items()]
    if failed:
        raise AssertionError(f"{name}: {', '.join(failed)} off (tol {tol:g} x scale)\n" + "\n".join(lines))
    print("\n".join(lines))
    return report
