"""The `jax.custom_vjp` plumbing shared by every differentiable kernel (attention families, expert matmul).

A kernel's autodiff is a pair of functions: a forward that runs the forward kernels and keeps what the backward
needs (the residuals), and a backward that runs the backward kernels on those residuals and the output's
cotangent. `differentiable` joins such a pair into one function that JAX differentiates through the backward.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax


def differentiable(
    forward: Callable, backward: Callable, *, n_static: int, grad_argnums: tuple[int, ...] | None = None
) -> Callable:
    """The function `forward(...)[0]` with `backward` as its vector-Jacobian product.

    Args:
      forward: `forward(*arrays, *static) -> (out, residuals)`. Its last `n_static` parameters are static
        (hashable Python values: block sizes, window, formats, interpret), never differentiated.
      backward: `backward(*static, residuals, d_out)` -> the cotangents of the arrays at `grad_argnums`, in
        that order.
      n_static: how many trailing parameters of `forward` are static.
      grad_argnums: positions of the arrays that get a cotangent; the others (integer ids, keys, indices, which
        have none) get `None`. None: every array, `backward` returning one cotangent per array.

    Returns:
      A function with `forward`'s signature returning `out`, differentiable through `backward`.
    """
    n_params = len(inspect.signature(forward).parameters)
    n_arrays = n_params - n_static
    if not 0 <= n_static <= n_params:
        raise ValueError(f"n_static must be in [0, {n_params}] (forward's parameter count), got {n_static}")
    if grad_argnums is not None and not all(0 <= i < n_arrays for i in grad_argnums):
        raise ValueError(f"grad_argnums must be positions of forward's {n_arrays} arrays, got {grad_argnums}")

    @functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(n_arrays, n_params)))
    @functools.wraps(forward)
    def core(*args):
        return forward(*args)[0]

    def cotangents(*static_residuals_and_d_out):
        grads = backward(*static_residuals_and_d_out)
        if grad_argnums is None:
            return tuple(grads)
        by_position = dict(zip(grad_argnums, grads, strict=True))
        return tuple(by_position.get(i) for i in range(n_arrays))

    core.defvjp(forward, cotangents)
    return core
