"""The optimizer: DeepSeek-V4's Muon / AdamW split over the model's parameters, and learning-rate schedules.

One table (`ROUTING`) sends every parameter path to a route (V4 report section 2.4):

- **muon**: every hidden matrix and expert matrix, orthogonalised per logical matrix (`MatrixSpec`);
- **adamw**: the embedding, the output head, every RMSNorm weight, the mHC static biases (`base`) and
  gates (`scale`), plus the open cases below (beta 0.9 / 0.95, eps 1e-20, weight decay 0.1);
- **frozen**: the non-trainable variables (`RouterBias`, `HashTable`). They are not `nnx.Param`, so an
  optimizer built over `nnx.state(model, nnx.Param)` never sees them; meeting one is an error.

Decisions on the cases the report leaves open (TRAINING.md section 10, question 1):

- `attn.attn_sink` [N] -> AdamW. One logit per head, a vector: Muon is defined for matrices only, and
  a vector update orthogonalised is just its sign pattern rescaled.
- `compressor.ape` [m, c*H] -> AdamW. An additive positional bias (one row per position in the
  compression window), not a linear map of activations: the spectral-norm geometry Muon relies on
  does not apply. It is a bias like the mHC static biases, which the report sends to AdamW.
- `attn.wo_a` [G, N*H/G, O] -> Muon, G matrices [N*H/G, O]. The grouped output projection is the
  block-diagonal map diag(W_1, ..., W_G) from [N*H] to [G*O]; the orthogonal polar factor of a
  block-diagonal matrix is block-diagonal with the blocks' own polar factors, so orthogonalising the
  groups one by one is exactly Muon on the whole map, and each group gets the RMS 0.18 scaling of its shape.
- `attn.wq_b` [Q, N, H] (and the indexer's) -> one matrix [Q, N*H], as in V4 (V4.1's head-wise split
  would be `MatrixSpec(0, 1)` on a transposed layout; not done).
- mHC `fn` [R*D, (2+R)*R] -> Muon as one matrix (pre, post and residual rows together): the report's
  "everything else" wording; whether V4 splits the three blocks is unknown. `hc_head.fn` [R*D, R]
  likewise, and the router `ffn.gate` [D, E].

Weight decay 0.1 applies to every parameter of both routes, as the V4 report states it.

Learning rate: one schedule feeds both routes (the RMS matching makes AdamW's values carry over).
V4 used linear warm-up over 2000 steps, a constant peak and a cosine decay to peak/10 near the end,
`warmup_stable_decay` below.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Literal

import jax
import optax
from jax.sharding import PartitionSpec as P

from deepseek_v4 import muon as muon_lib
from deepseek_v4.muon import MatrixSpec

MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the routing table: parameters whose dotted path fully matches `pattern`.

    `ndim` is the rank of one layer's parameter; under the scanned `stack` there is one more leading
    ("layers") axis, which becomes one more batch axis of the matrix spec.
    """

    pattern: str
    route: str
    ndim: int
    matrix: MatrixSpec | None = None
    note: str = ""


_ANY = r"(?:.*\.)?"  # any enclosing modules: prefix.{i}., stack.blocks.{j}., mtp.{i}.block., ...

ROUTING: tuple[Rule, ...] = (
    Rule(r"embed", ADAMW, 2, note="token embedding [V, D]"),
    Rule(r"head", ADAMW, 2, note="output head [D, V]"),
    Rule(_ANY + r"(?:norm|attn_norm|ffn_norm|q_norm|kv_norm|enorm|hnorm)\.scale", ADAMW, 1, note="RMSNorm weight"),
    Rule(_ANY + r"hc_(?:attn|ffn|head)\.(?:base|scale)", ADAMW, 1, note="mHC static bias S / gate alpha"),
    Rule(_ANY + r"attn\.attn_sink", ADAMW, 1, note="attention sink logits [N] (open case: a vector)"),
    Rule(_ANY + r"compressor\.ape", ADAMW, 2, note="compressor position bias [m, c*H] (open case: a bias)"),
    Rule(_ANY + r"hc_(?:attn|ffn|head)\.fn", MUON, 2, MatrixSpec(0, 1), "mHC dynamic projection, one matrix"),
    Rule(_ANY + r"attn\.(?:wq_a|wkv|wo_b)", MUON, 2, MatrixSpec(0, 1), "attention projection"),
    Rule(_ANY + r"attn\.(?:indexer\.)?wq_b", MUON, 3, MatrixSpec(0, 1), "[Q, N, H] as one matrix [Q, N*H]"),
    Rule(_ANY + r"attn\.wo_a", MUON, 3, MatrixSpec(1, 1), "G group matrices [N*H/G, O] (block-diagonal map)"),
    Rule(_ANY + r"compressor\.(?:wkv|wgate)", MUON, 2, MatrixSpec(0, 1), "compressor projection"),
    Rule(_ANY + r"indexer\.weights_proj", MUON, 2, MatrixSpec(0, 1), "indexer head weights"),
    Rule(_ANY + r"ffn\.gate", MUON, 2, MatrixSpec(0, 1), "router weight [D, E]"),
    Rule(_ANY + r"ffn\.experts\.w[123]", MUON, 3, MatrixSpec(1, 1), "routed experts, one matrix per expert"),
    Rule(_ANY + r"ffn\.shared\.w[123]", MUON, 2, MatrixSpec(0, 1), "shared expert"),
    Rule(_ANY + r"[eh]_proj", MUON, 2, MatrixSpec(0, 1), "MTP input projections"),
    Rule(_ANY + r"ffn\.router_bias", FROZEN, 1, note="balancing bias (RouterBias; sign update, no gradient)"),
    Rule(_ANY + r"ffn\.tid2eid", FROZEN, 2, note="hash-routing table (HashTable; fixed)"),
)

_COMPILED = tuple(re.compile(r.pattern) for r in ROUTING)


@dataclasses.dataclass(frozen=True)
class Route:
    """Where one parameter goes: the table row, the route, and (Muon) the matrix spec for its full shape."""

    rule: Rule
    route: str
    matrix: MatrixSpec | None


def _is_stacked(path: str) -> bool:
    return path == "stack" or path.startswith("stack.")


def route_of(path: str, shape: Sequence[int]) -> Route:
    """The route of the parameter at dotted `path` with `shape`.

    Raises:
      ValueError: no row or several rows match, or the rank disagrees with the table.
    """
    hits = [r for r, c in zip(ROUTING, _COMPILED) if c.fullmatch(path)]
    if not hits:
        raise ValueError(f"parameter {path!r} {tuple(shape)} matches no row of deepseek_v4.optim.ROUTING")
    if len(hits) > 1:
        raise ValueError(f"parameter {path!r} matches several routing rows: {[r.pattern for r in hits]}")
    rule = hits[0]
    stacked = _is_stacked(path)
    if len(shape) != rule.ndim + stacked:
        raise ValueError(
            f"parameter {path!r} has shape {tuple(shape)}; the routing table expects rank {rule.ndim}"
            + (" plus the leading layers axis" if stacked else "")
        )
    matrix = rule.matrix
    if matrix is not None and stacked:
        matrix = MatrixSpec(matrix.batch_dims + 1, matrix.row_dims)
    return Route(rule, rule.route, matrix)


def matrix_spec(path: str, shape: Sequence[int]) -> MatrixSpec:
    """The Muon matrix spec of a parameter (ValueError if the table does not route it to Muon)."""
    r = route_of(path, shape)
    if r.route != MUON:
        raise ValueError(f"parameter {path!r} is routed to {r.route}, not Muon")
    return r.matrix


def param_labels(params, name: str = MUON):
    """Tree of route labels ("muon" / "adamw") for `optax.multi_transform`; `name="adamw"` labels all AdamW."""

    def label(path, leaf):
        p = muon_lib.path_str(path)
        r = route_of(p, leaf.shape)
        if r.route == FROZEN:
            raise ValueError(
                f"{p!r} is a non-trainable variable; build the optimizer over nnx.state(model, nnx.Param) only"
            )
        return r.route if name == MUON else ADAMW

    return jax.tree_util.tree_map_with_path(label, params)


def _path_dict(tree) -> dict[str, P]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, P) or v is None)[0]
    return {muon_lib.path_str(k): v for k, v in leaves if v is not None}


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
            p = muon_lib.path_str(path)
            r = route_of(p, leaf.shape)
            mats = r.matrix.split(leaf.shape) if r.matrix is not None else None
            rows.append(PlanRow(p, tuple(leaf.shape), math.prod(leaf.shape), r.route, mats, r.rule.note))
    return rows

