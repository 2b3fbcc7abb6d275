"""THE table from logical axis names to mesh axes, for parameters and for activations; sharded model creation.

Model code names every dimension logically (`nnx.Param(..., logical_axes=("experts", "embed", "expert_mlp"))`,
`rules.constrain(x, ("batch", "seq", "embed"))`); this module alone turns names into `PartitionSpec`s.

Each row of `RULES` gives a logical name's placement twice, as in Levanter's two mappings: where a parameter
of that dimension is *stored* and where an activation of it *lives during compute*. In scaling-book notation the
defaults give, for example:
  embed     E[V_tensor, D_fsdp]            head   W[D_fsdp, V_tensor]
  experts   W1[E_expert, D_fsdp, F_tensor]  W2[E_expert, F_tensor, D_fsdp]
  attention Wq_b[Q_fsdp, N_tensor, H]       Wo_b[(G*O)_tensor, D_fsdp]
  activations x[B_(data,fsdp,expert), T_context, D]  logits[B_(data,fsdp,expert), T_context, V_tensor]
FSDP weights are all-gathered over `fsdp` for each use (and their gradients reduce-scattered), expert weights stay
put while tokens travel by all-to-all (`expert_parallel.py`), tensor-split weights need an all-reduce of the
partial output.

Two rules turn a row into a spec for one array (`spec()`), and both are visible in the startup summary:
  1. A mesh axis is used at most once per array. The first dimension (left to right) that claims an axis keeps
     it; a later dimension that names it again drops it. So `wq_a[D, Q]` ("embed", "q_lora") is `[D_fsdp, Q]`
     while `wq_b[Q, N, H]` is `[Q_fsdp, N_tensor, H]`: every large weight gets an fsdp dimension from one row each.
  2. With a shape and a mesh, a dimension keeps the longest prefix of its mesh axes whose size product divides it
     (mesh axes of size 1 are left out first). So a dimension that does not divide falls back towards replicated
     (`batch=4` on data=2,fsdp=2,expert=2 is split over data,fsdp only; `heads=3` on tensor=2 is replicated).
Unknown logical names raise a ValueError naming the array, so a new parameter must get a row here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sharding.paths import path_str

Kind = Literal["param", "activation"]
MeshAxes = str | tuple[str, ...] | None

_BATCH = ("data", "fsdp", "expert")

# logical name -> (parameter placement, activation placement). Keep rows sorted by role.
RULES: dict[str, tuple[MeshAxes, MeshAxes]] = {
    # Batch and sequence (activations only).
    "batch": (None, _BATCH),
    "seq": (None, "context"),  # context parallelism: the load-balanced layout (sharding/context.py)
    "kv_seq": (None, None),
    "hc": (None, None),  # the R mHC residual streams
    # Model width and vocabulary.
    "embed": ("fsdp", None),
    "embed_out": (None, None),
    "vocab": ("tensor", "tensor"),
    "hc_in": (None, None),  # [R*D] input of the small mHC projections: replicated (24 columns, cheap)
    # Attention.
    "q_lora": ("fsdp", None),
    "heads": ("tensor", "tensor"),
    "head_dim": (None, None),
    "o_groups": ("tensor", "tensor"),
    "o_group_in": ("fsdp", None),
    "o_lora": (None, None),
    "o_proj": ("tensor", None),
    "compress_dim": (None, None),
    "compress_window": (None, None),
    "index_heads": ("tensor", "tensor"),
    "index_head_dim": (None, None),
    # Feed-forward and experts.
    "mlp": ("tensor", "tensor"),
    "experts": ("expert", "expert"),
    "expert_mlp": ("tensor", "tensor"),
    # Scanned layer stacks.
    "layers": (None, None),
}


def axes_of(entry: MeshAxes) -> tuple[str, ...]:
    """A spec entry (None, an axis name or a tuple of them) as a tuple of mesh axis names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_axes(logical: str, kind: Kind) -> tuple[str, ...]:
    """The mesh axes a logical name maps to in the table (before collision and divisibility rules)."""
    if logical not in RULES:
        raise ValueError(f"logical axis {logical!r} has no row in sharding/rules.py RULES")
    return axes_of(RULES[logical][0 if kind == "param" else 1])


def _mesh_sizes(mesh: Any) -> dict[str, int] | None:
    return None if mesh is None else dict(mesh.shape)


def spec(logical_axes: Sequence[str | None], kind: Kind = "param", *, shape: Sequence[int] | None = None,
         mesh: Mesh | jax.sharding.AbstractMesh | None = None) -> P:
    """The `PartitionSpec` for one array from its logical axis names.

    Args:
      logical_axes: one name (or None) per dimension.
      kind: "param" (storage placement) or "activation" (compute placement).
      shape: the array shape; with `mesh`, dimensions fall back towards replicated where sizes do not divide.
      mesh: the mesh (concrete or abstract); with it, size-1 mesh axes are left out of the spec.

    Returns:
      A `PartitionSpec` with one entry per dimension; a mesh axis appears at most once (rule 1 above).

    Raises:
      ValueError: on an unknown logical name or a shape whose rank differs from `logical_axes`.
    """
    if kind not in ("param", "activation"):
        raise ValueError(f"kind must be 'param' or 'activation', got {kind!r}")
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    sizes = _mesh_sizes(mesh)
    col = 0 if kind == "param" else 1
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in RULES:
            raise ValueError(f"logical axis {name!r} has no row in sharding/rules.py RULES "
                             f"(axes {tuple(logical_axes)})")
        axes = [a for a in axes_of(RULES[name][col]) if a not in used]
        if sizes is not None:
            axes = [a for a in axes if a in sizes and sizes[a] > 1]
            if shape is not None:
                while axes and shape[dim] % math.prod(sizes[a] for a in axes):
                    axes.pop()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def named_sharding(logical_axes: Sequence[str | None], mesh: Mesh, kind: Kind = "activation",
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """`NamedSharding(mesh, spec(...))`, e.g. for the data loader's `("batch", "seq")` global arrays."""
    return NamedSharding(mesh, spec(logical_axes, kind, shape=shape, mesh=mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout to the table (`with_sharding_constraint`); a no-op without an active mesh.

    The active mesh is the one entered with `jax.set_mesh(mesh)`. Only Auto mesh axes are used, so inside a
    `shard_map` (Manual axes) this is a no-op as well.

    Shapes: x [...] with one logical name per dimension -> same shape.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    auto = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Auto}
    if not auto:
        return x
    s = spec(logical_axes, "activation", shape=x.shape, mesh=mesh)
    kept = []
    for entry in s:
        axes = tuple(a for a in axes_of(entry) if a in auto)
        kept.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*kept)))


def is_variable(x: Any) -> bool:
    """`is_leaf` for tree functions that should stop at NNX variables."""
    return isinstance(x, nnx.Variable)


def _variable_spec(path: tuple, var: nnx.Variable, mesh: Mesh) -> P:
    value = var.get_value() if hasattr(var, "get_value") else var.value
    shape = tuple(getattr(value, "shape", ()))
    axes = getattr(var, "logical_axes", None)
    if axes is None:
        if isinstance(var, nnx.Param) and shape:
            raise ValueError(f"parameter {path_str(path)} {shape} has no logical_axes metadata")
        return P()
    axes = tuple(axes)
    if len(axes) != len(shape):
        # Optimizer states of a different rank than their parameter (e.g. factored moments): replicate.
        return P()
    try:
        return spec(axes, "param", shape=shape, mesh=mesh)
    except ValueError as e:
        raise ValueError(f"{path_str(path)}: {e}") from None


def _state_of(tree: Any) -> Any:
    return nnx.state(tree) if isinstance(tree, nnx.Module) else tree


def param_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Storage shardings for every `nnx.Variable` of a state, from its `logical_axes` metadata.

    Works on model states and on `nnx.Optimizer` states (their moments inherit the parameter metadata).
    Variables without `logical_axes` (router bias, hash table, step counters, RNG state) are replicated;
    an `nnx.Param` of rank >= 1 without them is an error.

    Args:
      abstract_state: an `nnx.State` (or module) from `nnx.eval_shape`/`nnx.split`; real arrays work too.
      mesh: the training mesh.

    Returns:
      The same tree structure with each Variable's value replaced by its `NamedSharding`, usable as jit
      `in_shardings`/`out_shardings` for the state and, leaf by leaf, for orbax restore targets.
    """
    state = _state_of(abstract_state)

    def one(path, var):
        return var.replace(NamedSharding(mesh, _variable_spec(path, var, mesh)))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=is_variable)


def shard_model(model_ctor: Callable[[], Any], mesh: Mesh) -> Any:
    """Create an NNX model (or any NNX graph node) directly in its sharded layout.

    The constructor is traced once abstractly (`nnx.eval_shape`) to get shapes and `logical_axes`, then run
    under `jax.jit` with `out_shardings` from the table, so each device only ever materialises its own shards.

    Args:
      model_ctor: builds the model, e.g. `lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0))`.
      mesh: the training mesh; it is entered with `jax.set_mesh` while the constructor runs.

    Returns:
      The constructed model with every variable sharded per `param_shardings`.
    """
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(model_ctor)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = param_shardings(abstract_state, mesh)
        state = jax.jit(lambda: nnx.split(model_ctor())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def _value(var: nnx.Variable) -> Any:
    return var.get_value() if hasattr(var, "get_value") else var.value


def _spec_str(s: P, rank: int) -> str:
    entries = list(s) + [None] * (rank - len(s))
    return "[" + ", ".join("-" if not axes_of(e) else "+".join(axes_of(e)) for e in entries) + "]"


def summary_rows(abstract_state: Any, mesh: Mesh) -> list[tuple[str, str, tuple[int, ...], str, str, int]]:
    """(path, logical axes, shape, dtype, spec, bytes per device) for every variable, in state order."""
    state = _state_of(abstract_state)
    rows = []
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]:
        value = _value(var)
        shape = tuple(getattr(value, "shape", ()))
        dtype = np.dtype(getattr(value, "dtype", np.float32))
        s = _variable_spec(path, var, mesh)
        shard = NamedSharding(mesh, s).shard_shape(shape)
        axes = getattr(var, "logical_axes", None)
        logical = "-" if axes is None else "(" + ", ".join("-" if a is None else a for a in axes) + ")"
        nbytes = math.prod(shard) * dtype.itemsize
        rows.append((path_str(path), logical, shape, dtype.name, _spec_str(s, len(shape)), nbytes))
    return rows


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def summary(abstract_state: Any, mesh: Mesh) -> str:
    """The startup sharding table: parameter, logical axes, shape, dtype, spec, bytes per device, and totals.

    Spec entries are the mesh axes splitting each dimension (`-` = not split), in scaling-book order.
    """
    rows = summary_rows(abstract_state, mesh)
    head = ("parameter", "logical axes", "shape", "dtype", "spec", "bytes/device")
    table = [head] + [(p, lg, "[" + ", ".join(map(str, sh)) + "]", dt, sp, f"{b:,}") for p, lg, sh, dt, sp, b in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [f"sharding summary, mesh {','.join(f'{k}={v}' for k, v in mesh.shape.items())}"]
    for i, r in enumerate(table):
        cells = [c.rjust(w) if j == 5 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    total = sum(math.prod(sh) for _, _, sh, _, _, _ in rows)
    per_dev = sum(b for *_, b in rows)
    lines.append(f"total: {len(rows)} arrays, {total:,} elements, {per_dev:,} bytes per device ({_human(per_dev)})")
    return "\n".join(lines)


def print_summary(abstract_state: Any, mesh: Mesh) -> None:
    """Print `summary(abstract_state, mesh)` (process 0 only in multi-process runs)."""
    if jax.process_index() == 0:
        print(summary(abstract_state, mesh), flush=True)
