"""Muon as DeepSeek-V4 uses it: Nesterov momentum, hybrid Newton-Schulz, update RMS matched to AdamW.

V4 report section 2.4 (Algorithm 1), for every logically independent matrix W in R^{n x m}:

    M_t = mu * M_{t-1} + G_t                       # sum-form momentum, mu = 0.95
    O'  = HybridNS(mu * M_t + G_t)                 # Nesterov input
    O   = O' * sqrt(max(n, m)) * gamma             # gamma = 0.18: update RMS ~ 0.18, as AdamW's
    W_t = W_{t-1} * (1 - lr * wd) - lr * O         # decoupled weight decay, wd = 0.1

HybridNS normalises by the Frobenius norm, then runs 8 quintic Newton-Schulz steps with
(3.4445, -4.7750, 2.0315), which pull every singular value >= ~1e-4 into about [0.68, 1.2], and 2 with
(2, -1.5, 0.5), whose map f(s) = 2s - 1.5s^3 + 0.5s^5 has f(1) = 1 and f'(1) = 0, so they pin the band at 1.
The matmuls run in bfloat16 with float32 accumulation.

Which axes of a parameter form the matrix is given per parameter by a `MatrixSpec` (leading batch axes,
then row axes, then column axes); `deepseek_v4.params` holds it for the model's parameters. Batch
axes (scanned layers, experts, output groups) are orthogonalised one matrix at a time.

Sharding (docs/training.md): Newton-Schulz needs whole matrices, and running it on FSDP-sharded
matrices under automatic partitioning would put collectives inside every step. `orthogonalize` instead
runs in one `shard_map`: an all-to-all per mesh axis that shards a matrix dimension turns row/column
shards into whole matrices spread over that axis; on mesh axes a parameter is replicated on, each device
keeps its own share of the matrices (no traffic); each device then iterates on its K/devices whole
matrices with no communication, and the same moves run backwards (all-gathers over the replicated axes,
all-to-alls back), so every update keeps its parameter's sharding. Expert stacks already split over the
expert axis stay where they are. This is DeepSeek's "whole matrices per rank" layout with the collectives
visible to XLA.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from deepseek_v4.params import MatrixSpec, path_str

Coefficients = tuple[float, float, float]

#: Fast coefficients of the quintic iteration (maximal slope at 0; Keller Jordan's Muon).
FAST_COEFFICIENTS: Coefficients = (3.4445, -4.7750, 2.0315)
#: Converging coefficients: f(1) = 1, f'(1) = 0.
PIN_COEFFICIENTS: Coefficients = (2.0, -1.5, 0.5)
#: DeepSeek-V4's hybrid schedule: 8 fast steps, then 2 converging steps.
V4_COEFFICIENTS: tuple[Coefficients, ...] = (FAST_COEFFICIENTS,) * 8 + (PIN_COEFFICIENTS,) * 2


def resolve_coefficients(
    coefficients: Coefficients | Sequence[Coefficients], steps: int | None = None
) -> tuple[Coefficients, ...]:
    """One (a, b, c) triple per Newton-Schulz step.

    Args:
      coefficients: a single triple (repeated `steps` times) or a sequence of triples, one per step.
      steps: number of steps; required for a single triple, and must equal the length of a sequence.

    Returns:
      A tuple of float triples, one per step.
    """
    try:
        flat = [float(v) for v in coefficients]  # a single triple
        single = True
    except TypeError:
        single = False
    if single:
        if len(flat) != 3:
            raise ValueError(f"Newton-Schulz coefficients must be (a, b, c) triples, got {tuple(coefficients)}")
        if steps is None or steps < 1:
            raise ValueError(f"a single coefficient triple needs steps >= 1, got steps={steps}")
        return (tuple(flat),) * steps
    triples = tuple(tuple(float(v) for v in t) for t in coefficients)
    if not triples or any(len(t) != 3 for t in triples):
        raise ValueError(f"Newton-Schulz coefficients must be a non-empty sequence of (a, b, c) triples, got {triples}")
    if steps is not None and steps != len(triples):
        raise ValueError(f"steps={steps} disagrees with the {len(triples)} coefficient triples given")
    return triples


def _ns_step(x: jax.Array, a, b, c) -> jax.Array:
    """X <- aX + (bA + cA^2)X with A = X X^T; products accumulate in float32, X stays in its dtype."""
    f32 = jnp.float32
    gram = jnp.einsum("...ij,...kj->...ik", x, x, preferred_element_type=f32)  # [.., m, n] -> [.., m, m]
    g = gram.astype(x.dtype)
    poly = b * gram + c * jnp.einsum("...ij,...jk->...ik", g, g, preferred_element_type=f32)
    y = a * x.astype(f32) + jnp.einsum("...ij,...jk->...ik", poly.astype(x.dtype), x, preferred_element_type=f32)
    return y.astype(x.dtype)


def newton_schulz(
    x: jax.Array,
    coefficients: Coefficients | Sequence[Coefficients] = V4_COEFFICIENTS,
    steps: int | None = None,
    *,
    eps: float = 1e-7,
    compute_dtype: jnp.dtype = jnp.bfloat16,
) -> jax.Array:
    """Approximate the orthogonal polar factor U V^T of every matrix in `x` (its last two axes).

    Each matrix is divided by its Frobenius norm (so every singular value is <= 1), then each step maps
    every singular value s to a*s + b*s^3 + c*s^5. Wide orientation is used internally (the Gram matrix
    is the small one). Leading axes are independent batch axes.

    Args:
      x: [..., m, n] matrices, any float dtype.
      coefficients: one (a, b, c) triple (then `steps` is required) or one triple per step; defaults to
        V4's hybrid 8 + 2 schedule.
      steps: number of steps (see `resolve_coefficients`).
      eps: added to the Frobenius norm, so an all-zero matrix maps to zero.
      compute_dtype: dtype of the iterate and of the matmul inputs (products accumulate in float32).

    Returns:
      [..., m, n] in x.dtype.

    Shapes:
      [..., m, n] -> (transpose if m > n) [..., min, max] -> 10 x ([min, min] Gram) -> [..., m, n]
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs at least a matrix, got shape {x.shape}")
    triples = resolve_coefficients(coefficients, steps)
    tall = x.shape[-2] > x.shape[-1]
    y = jnp.swapaxes(x, -1, -2) if tall else x
    y = y.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=(-2, -1), keepdims=True))
    y = (y / (norm + eps)).astype(compute_dtype)
    # One compiled loop body for the whole schedule: the coefficients are scanned over, not unrolled.
    y, _ = jax.lax.scan(lambda z, abc: (_ns_step(z, *abc), None), y, jnp.asarray(triples, jnp.float32))
    y = jnp.swapaxes(y, -1, -2) if tall else y
    return y.astype(x.dtype)


# ---- batched and sharded orthogonalisation of a whole parameter tree ------------------------------------


def _context_mesh(mesh):
    """The mesh to spread matrices over: the given one, else the one set by `jax.set_mesh`; None if trivial."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
        return None
    return mesh


def _spec_axes(entry) -> tuple[str, ...]:
    """Mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one group of same-shaped, same-sharded leaves moves to whole matrices per device and back."""

    matrix_shape: tuple[int, ...]  # global row dims + column dims
    rows: int  # number of row dims in matrix_shape
    moves: tuple[tuple[str, int], ...]  # (mesh axis, matrix dim it shards), minor axis of a dim first
    spread: tuple[tuple[str, int], ...]  # (mesh axis, size): axes the leaf is replicated on; each takes a share
    factor: int  # the local matrix count must be a multiple of this


def _plan(shape, spec: MatrixSpec, pspec: P, axis_sizes: dict[str, int]) -> _Plan:
    entries = tuple(pspec) + (None,) * (len(shape) - len(tuple(pspec)))
    b = spec.batch_dims
    moves = []
    for d, entry in enumerate(entries[b:]):
        moves += [(a, d) for a in reversed(_spec_axes(entry)) if axis_sizes[a] > 1]
    used = {a for e in entries for a in _spec_axes(e)}
    spread = tuple((a, n) for a, n in axis_sizes.items() if n > 1 and a not in used)
    factor = math.prod(axis_sizes[a] for a, _ in moves) * math.prod(n for _, n in spread)
    return _Plan(tuple(shape[b:]), spec.row_dims, tuple(moves), spread, factor)


def _orthogonalize_group(blocks: list[jax.Array], plan: _Plan, ns) -> list[jax.Array]:
    """Newton-Schulz on the local blocks of one group; runs per device inside shard_map (or globally).

    Shapes (per device):
      blocks [k_i, *matrix_local] -> concat [k, *matrix_local] -> pad to k_pad -> all-to-all per sharded
      matrix dim [k_pad / f1, *matrix] -> share of the replicated axes [k_own, *matrix] -> [k_own, r, c]
      -> Newton-Schulz -> the same moves backwards -> [k_i, *matrix_local]
    """
    counts = [x.shape[0] for x in blocks]
    x = jnp.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    total = x.shape[0]
    padded = -(-total // plan.factor) * plan.factor
    if padded != total:
        x = jnp.pad(x, ((0, padded - total),) + ((0, 0),) * (x.ndim - 1))  # zero matrices stay zero
    for axis, d in plan.moves:  # matrix dim d becomes whole, the matrices spread over `axis`
        x = jax.lax.all_to_all(x, axis, split_axis=0, concat_axis=1 + d, tiled=True)
    for axis, size in plan.spread:  # replicated on `axis`: each device keeps its own share, no traffic
        share = x.shape[0] // size
        x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(axis) * share, share, axis=0)
    k = x.shape[0]
    r = math.prod(plan.matrix_shape[: plan.rows])
    y = ns(x.reshape(k, r, -1)).reshape(x.shape)  # [k_own, *matrix] -> [k_own, r, c] -> [k_own, *matrix]
    for axis, _ in reversed(plan.spread):
        y = jax.lax.all_gather(y, axis, axis=0, tiled=True)
    for axis, d in reversed(plan.moves):
        y = jax.lax.all_to_all(y, axis, split_axis=1 + d, concat_axis=0, tiled=True)
    y = y[:total]
    out, start = [], 0
    for n in counts:
        out.append(y[start : start + n])
        start += n
    return out


def orthogonalize(
    tree,
    specs,
    *,
    coefficients: Coefficients | Sequence[Coefficients] = V4_COEFFICIENTS,
    steps: int | None = None,
    eps: float = 1e-7,
    compute_dtype: jnp.dtype = jnp.bfloat16,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    partition_specs=None,
):
    """Newton-Schulz on every matrix of a tree, batched by shape, each matrix computed on one device.

    With a mesh, the work runs in one `shard_map`: per group of same-shaped, same-sharded leaves, an
    all-to-all per mesh axis that shards a matrix dimension turns row/column shards into whole matrices
    (spread over that axis), and on each mesh axis the leaf is replicated on, every device keeps a
    different share of the matrices (no traffic). After Newton-Schulz the same moves run backwards (an
    all-gather over the replicated axes, all-to-alls back), so the result has the input's sharding.
    E.g. `W_up[L, E_expert, D_fsdp, F]` on a (fsdp, expert, tensor) mesh: all-to-all over fsdp, a
    share over tensor, Newton-Schulz on L*E/8 whole [D, F] matrices per device, all-gather over tensor,
    all-to-all back. Batch counts that do not divide are padded with zero matrices.

    Args:
      tree: pytree of arrays; leaves whose spec is None pass through unchanged.
      specs: pytree with the same structure holding a `MatrixSpec` (or None) per leaf.
      coefficients, steps, eps, compute_dtype: as in `newton_schulz`.
      mesh: devices that share the work; None means the mesh set by `jax.set_mesh`, if any; without one
        the same batched computation runs on a single device.
      partition_specs: pytree (same structure, None leaves allowed) of each leaf's PartitionSpec on `mesh`;
        by default the sharding in the leaf's type (meshes with Explicit axes). A leaf whose spec is
        unknown is taken as replicated, which is correct but gathers it first.

    Returns:
      The tree with each matrix leaf replaced by its orthogonalised version (same shape and dtype).

    Shapes:
      leaf [batch..., rows..., cols...] -> [K, rows..., cols...] -> groups [sum K, rows..., cols...]
      -> per device [K_own, r, c] -> Newton-Schulz -> back to the leaf's shape.
    """
    mesh = _context_mesh(mesh)
    is_none = lambda v: v is None  # noqa: E731
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_none)
    spec_leaves = treedef.flatten_up_to(specs)
    if mesh is None:
        pspecs = [P()] * len(leaves)
    elif partition_specs is None:
        pspecs = [_type_spec(x) if s is not None else P() for x, s in zip(leaves, spec_leaves)]
    else:
        pspecs = [p if p is not None else P() for p in treedef.flatten_up_to(partition_specs)]
    axis_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else {}

    groups: dict[tuple, list[int]] = {}
    plans: dict[tuple, _Plan] = {}
    for i, (leaf, spec) in enumerate(zip(leaves, spec_leaves)):
        if spec is None:
            continue
        spec.split(leaf.shape)  # validates the spec against the shape
        plan = _plan(leaf.shape, spec, pspecs[i], axis_sizes)
        key = (plan, frozenset(a for e in tuple(pspecs[i])[: spec.batch_dims] for a in _spec_axes(e)))
        groups.setdefault(key, []).append(i)
        plans[key] = plan

    def ns(x):  # [k, r, c] -> [k, r, c]
        return newton_schulz(x, coefficients, steps, eps=eps, compute_dtype=compute_dtype)

    def run(*xs):  # the matrix leaves (local blocks under shard_map) -> orthogonalised blocks
        out = list(xs)
        pos = {i: n for n, i in enumerate(matrix_ids)}
        for key, members in groups.items():
            blocks = []
            for i in members:
                x = xs[pos[i]].astype(compute_dtype)  # move bf16: half the bytes of f32
                b = spec_leaves[i].batch_dims
                blocks.append(x.reshape((math.prod(x.shape[:b]),) + x.shape[b:]))  # [batch..., *m] -> [k, *m]
            for i, y in zip(members, _orthogonalize_group(blocks, plans[key], ns)):
                out[pos[i]] = y.reshape(xs[pos[i]].shape).astype(xs[pos[i]].dtype)
        return tuple(out)

    matrix_ids = [i for i, s in enumerate(spec_leaves) if s is not None]
    args = tuple(leaves[i] for i in matrix_ids)
    if mesh is not None:
        in_specs = tuple(pspecs[i] for i in matrix_ids)
        run = jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=in_specs, check_vma=False)
    results = run(*args) if args else ()
    out = list(leaves)
    for i, y in zip(matrix_ids, results):
        out[i] = y
    return treedef.unflatten(out)


def _type_spec(x) -> P:
    """The PartitionSpec carried in an array's type (Explicit mesh axes); empty when unknown."""
    try:
        spec = jax.typeof(x).sharding.spec
    except AttributeError:
        return P()
    return P(*(e if not isinstance(e, tuple) or e else None for e in spec))


# ---- the optax transformation ------------------------------------------------------------------------


class ScaleByMuonState(NamedTuple):
    """Momentum buffer (float32, one per Muon parameter; empty for others)."""

    momentum: optax.Updates


SpecFn = Callable[[str, tuple[int, ...]], "MatrixSpec | None"]


def _default_spec(path: str, shape: tuple[int, ...]) -> MatrixSpec | None:
    del path
    return MatrixSpec(batch_dims=len(shape) - 2, row_dims=1) if len(shape) >= 2 else None


def _specs_of(tree, spec_fn: SpecFn):
    """Tree of MatrixSpec (or None) per leaf, from the leaf paths and shapes."""

    def one(path, leaf):
        if not hasattr(leaf, "shape"):  # optax.MaskedNode and other placeholders
            return None
        return spec_fn(path_str(path), tuple(leaf.shape))

    return jax.tree_util.tree_map_with_path(one, tree)


def scale_by_muon(
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    coefficients: Coefficients | Sequence[Coefficients] = V4_COEFFICIENTS,
    steps: int | None = None,
    rms_scale: float = 0.18,
    eps: float = 1e-7,
    compute_dtype: jnp.dtype = jnp.bfloat16,
    spec_fn: SpecFn = _default_spec,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    partition_spec_fn: Callable[[str], P | None] | None = None,
) -> optax.GradientTransformation:
    """Muon's direction: momentum, Newton-Schulz per matrix, then scale by rms_scale * sqrt(max(rows, cols)).

    Args:
      momentum: mu of the sum-form momentum M <- mu M + G.
      nesterov: orthogonalise mu M + G (V4) instead of M.
      coefficients, steps, eps, compute_dtype: the Newton-Schulz schedule (see `newton_schulz`).
      rms_scale: target RMS of the update of a matrix whose singular values are all 1 (V4: 0.18).
      spec_fn: (dotted path, shape) -> MatrixSpec, or None for a leaf Muon must not see (an error).
      mesh: devices that share the Newton-Schulz work (see `orthogonalize`).
      partition_spec_fn: dotted path -> the parameter's PartitionSpec on `mesh` (None: unknown); needed
        with Auto mesh axes, where arrays do not carry their sharding in their type.

    Returns:
      An optax transformation; its updates still need weight decay and the learning rate (see `muon`).
    """
    resolve_coefficients(coefficients, steps)  # fail early on a bad schedule

    def specs(tree):
        out = _specs_of(tree, spec_fn)

        def check(path, leaf, spec):
            if hasattr(leaf, "shape") and spec is None:
                raise ValueError(f"Muon got {path_str(path)!r} {tuple(leaf.shape)}, which has no matrix spec")

        jax.tree_util.tree_map_with_path(check, tree, out, is_leaf=lambda v: v is None)
        return out

    def init_fn(params):
        specs(params)
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32) if hasattr(p, "shape") else p  # noqa: E731
        return ScaleByMuonState(momentum=jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        spec_tree = specs(updates)
        new_m = jax.tree.map(
            lambda g, m: momentum * m + g.astype(jnp.float32) if hasattr(g, "shape") else m, updates, state.momentum
        )
        if nesterov:
            direction = jax.tree.map(
                lambda g, m: momentum * m + g.astype(jnp.float32) if hasattr(g, "shape") else g, updates, new_m
            )
        else:
            direction = new_m
        pspecs = None
        if partition_spec_fn is not None:
            pspecs = jax.tree_util.tree_map_with_path(lambda p, _: partition_spec_fn(path_str(p)), direction)
        ortho = orthogonalize(
            direction, spec_tree, coefficients=coefficients, steps=steps, eps=eps, compute_dtype=compute_dtype,
            mesh=mesh, partition_specs=pspecs,
        )

        def scale(o, g, spec):
            if spec is None:
                return o
            _, r, c = spec.split(o.shape)
            return (o * (rms_scale * math.sqrt(max(r, c)))).astype(g.dtype)

        out = jax.tree.map(scale, ortho, updates, spec_tree, is_leaf=lambda v: v is None)
        return out, ScaleByMuonState(momentum=new_m)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    coefficients: Coefficients | Sequence[Coefficients] = V4_COEFFICIENTS,
    steps: int | None = None,
    rms_scale: float = 0.18,
    weight_decay: float = 0.1,
    eps: float = 1e-7,
    compute_dtype: jnp.dtype = jnp.bfloat16,
    spec_fn: SpecFn = _default_spec,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    partition_spec_fn: Callable[[str], P | None] | None = None,
) -> optax.GradientTransformation:
    """DeepSeek-V4 Muon: W <- W (1 - lr wd) - lr * rms_scale * sqrt(max(n, m)) * HybridNS(mu M + G).

    Every leaf the transformation sees must be a matrix or a stack of matrices; use it under
    `optax.multi_transform` (see `deepseek_v4.optim.make_optimizer`) to route other parameters elsewhere.

    Args:
      learning_rate: float or schedule, the same one AdamW would use (the RMS matching makes them comparable).
      momentum, nesterov, coefficients, steps, rms_scale, eps, compute_dtype, spec_fn, mesh,
        partition_spec_fn: see `scale_by_muon`.
      weight_decay: decoupled weight decay lambda (multiplied by the learning rate).

    Returns:
      An `optax.GradientTransformation`; `update` needs `params` when weight_decay > 0.
    """
    parts = [
        scale_by_muon(
            momentum=momentum, nesterov=nesterov, coefficients=coefficients, steps=steps, rms_scale=rms_scale,
            eps=eps, compute_dtype=compute_dtype, spec_fn=spec_fn, mesh=mesh, partition_spec_fn=partition_spec_fn,
        )
    ]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
