"""The optimizer: DeepSeek-V4's Muon / AdamW split over the model's parameters, and learning-rate schedules.

Every parameter's route comes from its row of `deepseek_v4.params.PARAMS` (V4 report section 2.4; the decisions
on the cases the report leaves open are written next to their rows there, see also docs/training.md):

- **muon**: every hidden matrix and expert matrix, orthogonalised per logical matrix (`MatrixSpec`);
- **adamw**: the embedding, the output head, every RMSNorm weight, the mHC static biases (`base`) and
  gates (`scale`), plus the open cases `attn_sink` and `compressor.ape` (beta 0.9 / 0.95, eps 1e-20,
  weight decay 0.1);
- **frozen**: the non-trainable variables (`RouterBias`, `HashTable`). They are not `nnx.Param`, so an
  optimizer built over `nnx.state(model, nnx.Param)` never sees them; meeting one is an error.

Weight decay 0.1 applies to every parameter of both routes, as the V4 report states it.

Learning rate: one schedule feeds both routes (the RMS matching makes AdamW's values carry over).
V4 used linear warm-up over 2000 steps, a constant peak and a cosine decay to peak/10 near the end,
`warmup_stable_decay` below.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

import jax
import optax
from jax.sharding import PartitionSpec as P

from deepseek_v4 import muon as muon_lib
from deepseek_v4 import params as params_lib
from deepseek_v4.params import ADAMW, FROZEN, MUON, MatrixSpec, ParamKind, path_str


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one parameter goes: its table row, the route, and (Muon) the matrix spec for its full shape."""

    param: ParamKind
    route: str
    matrix: MatrixSpec | None


def _is_stacked(path: str) -> bool:
    return path == "stack" or path.startswith("stack.")


def route_of(path: str, shape: Sequence[int]) -> Route:
    """The route of the parameter at dotted `path` with `shape` (its row: `deepseek_v4.params.kind_of`).

    Under the scanned `stack` there is one more leading ("layers") axis than the row's rank, which becomes one
    more batch axis of the matrix spec.

    Raises:
      ValueError: no row matches, or the rank disagrees with the table.
    """
    kind = params_lib.kind_of(path)
    stacked = _is_stacked(path)
    if len(shape) != kind.ndim + stacked:
        raise ValueError(
            f"parameter {path!r} has shape {tuple(shape)}; the parameter table expects rank {kind.ndim}"
            + (" plus the leading layers axis" if stacked else "")
        )
    matrix = kind.matrix
    if matrix is not None and stacked:
        matrix = MatrixSpec(matrix.batch_dims + 1, matrix.row_dims)
    return Route(kind, kind.route, matrix)


def matrix_spec(path: str, shape: Sequence[int]) -> MatrixSpec:
    """The Muon matrix spec of a parameter (ValueError if the table does not route it to Muon)."""
    r = route_of(path, shape)
    if r.route != MUON:
        raise ValueError(f"parameter {path!r} is routed to {r.route}, not Muon")
    return r.matrix


def param_labels(params, name: str = MUON):
    """Tree of route labels ("muon" / "adamw") for `optax.multi_transform`; `name="adamw"` labels all AdamW."""

    def label(path, leaf):
        p = path_str(path)
        r = route_of(p, leaf.shape)
        if r.route == FROZEN:
            raise ValueError(
                f"{p!r} is a non-trainable variable; build the optimizer over nnx.state(model, nnx.Param) only"
            )
        return r.route if name == MUON else ADAMW

    return jax.tree_util.tree_map_with_path(label, params)


def _path_dict(tree) -> dict[str, P]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, P) or v is None)[0]
    return {path_str(k): v for k, v in leaves if v is not None}


def make_optimizer(
    name: Literal["muon", "adamw"] = "muon",
    learning_rate: optax.ScalarOrSchedule = 2.7e-4,
    *,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-20,
    momentum: float = 0.95,
    rms_scale: float = 0.18,
    coefficients: Sequence[muon_lib.Coefficients] = muon_lib.V4_COEFFICIENTS,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    partition_specs=None,
) -> optax.GradientTransformation:
    """The full optimizer over the model's `nnx.Param` state.

    `"muon"`: global-norm clipping, then Muon (table route "muon") and AdamW (route "adamw") with the same
    learning rate and weight decay. `"adamw"`: clipping then AdamW on every parameter (the baseline).

    Args:
      name: "muon" or "adamw".
      learning_rate: float or schedule (see `make_schedule`), shared by both routes.
      weight_decay: decoupled weight decay of both routes (V4: 0.1).
      clip_norm: global gradient-norm clip, None for none (V4 does not say; V3 used 1.0).
      b1, b2, eps: AdamW moments (V4: 0.9, 0.95, 1e-20).
      momentum, rms_scale, coefficients: Muon (V4: 0.95, 0.18, the hybrid 8 + 2 Newton-Schulz schedule).
      mesh: devices sharing the Newton-Schulz work; None = the mesh set by `jax.set_mesh`, if any.
      partition_specs: the parameters' PartitionSpecs (any pytree or mapping keyed like the parameter
        paths, e.g. `nnx.get_partition_spec(nnx.state(model, nnx.Param))`). Needed with Auto mesh axes;
        with Explicit axes the arrays' types carry them.

    Returns:
      An `optax.GradientTransformation`; `update(grads, state, params)` needs `params` (weight decay).
      Use it as `nnx.Optimizer(model, tx, wrt=nnx.Param)` or on `nnx.state(model, nnx.Param)` directly.
    """
    if name not in (MUON, ADAMW):
        raise ValueError(f"unknown optimizer {name!r}; choose 'muon' or 'adamw'")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    branches = {ADAMW: adamw}
    if name == MUON:
        spec_table = _path_dict(partition_specs) if partition_specs is not None else None
        branches[MUON] = muon_lib.muon(
            learning_rate, momentum=momentum, coefficients=coefficients, rms_scale=rms_scale,
            weight_decay=weight_decay, spec_fn=matrix_spec, mesh=mesh,
            partition_spec_fn=(lambda path: spec_table.get(path)) if spec_table is not None else None,
        )
    tx = optax.multi_transform(branches, lambda params: param_labels(params, name))
    if clip_norm is None:
        return tx
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx)


# ---- learning-rate schedules ----------------------------------------------------------------------------


def warmup_stable_decay(
    peak_value: float,
    total_steps: int,
    *,
    warmup_steps: int = 2000,
    decay_steps: int | None = None,
    end_value: float | None = None,
    decay_shape: Literal["cosine", "linear"] = "cosine",
) -> optax.Schedule:
    """Linear warm-up from 0, constant `peak_value`, then a decay over the last `decay_steps` to `end_value`.

    V4-Flash: 2000 warm-up steps, peak 2.7e-4, cosine decay near the end to 2.7e-5. The decay starts at
    step `total_steps - decay_steps` (the MTP loss weight switches there in V4).

    Args:
      peak_value: the plateau learning rate.
      total_steps: schedule length; the value stays at `end_value` after it.
      warmup_steps: linear warm-up length (0 for none).
      decay_steps: decay length; default a tenth of `total_steps`.
      end_value: final value; default `peak_value / 10`.
      decay_shape: "cosine" (half cosine) or "linear".
    """
    decay_steps = max(1, total_steps // 10) if decay_steps is None else decay_steps
    end_value = peak_value / 10 if end_value is None else end_value
    _check_schedule(peak_value, total_steps, warmup_steps, decay_steps, end_value)
    if decay_shape not in ("cosine", "linear"):
        raise ValueError(f"decay_shape must be 'cosine' or 'linear', got {decay_shape!r}")
    stable = total_steps - warmup_steps - decay_steps
    if stable < 0:
        raise ValueError(
            f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) exceed total_steps={total_steps}"
        )
    if decay_shape == "cosine":
        alpha = end_value / peak_value if peak_value else 0.0
        decay = optax.cosine_decay_schedule(peak_value, decay_steps, alpha=alpha)
    else:
        decay = optax.linear_schedule(peak_value, end_value, decay_steps)
    parts = [optax.linear_schedule(0.0, peak_value, warmup_steps)] if warmup_steps else []
    parts += [optax.constant_schedule(peak_value), decay]
    bounds = ([warmup_steps] if warmup_steps else []) + [warmup_steps + stable]
    return optax.join_schedules(parts, bounds)


def warmup_cosine(
    peak_value: float, total_steps: int, *, warmup_steps: int = 2000, end_value: float | None = None
) -> optax.Schedule:
    """Linear warm-up from 0 to `peak_value`, then a cosine decay to `end_value` (default peak/10) at `total_steps`."""
    end_value = peak_value / 10 if end_value is None else end_value
    _check_schedule(peak_value, total_steps, warmup_steps, max(1, total_steps - warmup_steps), end_value)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})")
    return optax.warmup_cosine_decay_schedule(0.0, peak_value, warmup_steps, total_steps, end_value)


def make_schedule(
    kind: Literal["wsd", "cosine", "constant"],
    peak_value: float,
    total_steps: int,
    *,
    warmup_steps: int = 2000,
    decay_steps: int | None = None,
    end_value: float | None = None,
) -> optax.Schedule:
    """A learning-rate schedule by name: "wsd" (warm-up, stable, cosine decay; V4), "cosine", or "constant"
    (linear warm-up then constant)."""
    if kind == "wsd":
        return warmup_stable_decay(
            peak_value, total_steps, warmup_steps=warmup_steps, decay_steps=decay_steps, end_value=end_value
        )
    if kind == "cosine":
        return warmup_cosine(peak_value, total_steps, warmup_steps=warmup_steps, end_value=end_value)
    if kind == "constant":
        _check_schedule(peak_value, total_steps, warmup_steps, 1, peak_value)
        if not warmup_steps:
            return optax.constant_schedule(peak_value)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_value, warmup_steps), optax.constant_schedule(peak_value)], [warmup_steps]
        )
    raise ValueError(f"unknown schedule {kind!r}; choose 'wsd', 'cosine' or 'constant'")


def _check_schedule(peak, total, warmup, decay, end):
    if not (peak >= 0 and math.isfinite(peak)):
        raise ValueError(f"peak learning rate must be finite and >= 0, got {peak}")
    if total < 1 or warmup < 0 or decay < 1:
        raise ValueError(f"need total_steps >= 1, warmup_steps >= 0, decay_steps >= 1; got {total}, {warmup}, {decay}")
    if not (0 <= end <= peak or peak == 0):
        raise ValueError(f"end learning rate must lie in [0, peak={peak}], got {end}")


# ---- the plan, for users and tests ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One parameter: path, shape, element count, route, and (Muon) matrices as (count, rows, columns)."""

    path: str
    shape: tuple[int, ...]
    size: int
    route: str
    matrices: tuple[int, int, int] | None
    note: str


def plan(params, frozen=None) -> list[PlanRow]:
    """The route of every leaf of `params` (and of the non-trainable `frozen` variables, if given)."""
    rows = []
    for tree in (params, frozen):
        if tree is None:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            p = path_str(path)
            r = route_of(p, leaf.shape)
            mats = r.matrix.split(leaf.shape) if r.matrix is not None else None
            rows.append(PlanRow(p, tuple(leaf.shape), math.prod(leaf.shape), r.route, mats, r.param.note))
    return rows

