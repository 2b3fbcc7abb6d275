"""Expert parallelism: MoE dispatch and combine with `jax.shard_map` + `jax.lax.all_to_all` over "expert".

Layouts (scaling-book notation, mesh axes from `rules.RULES`):
  x[T_(data,fsdp,expert), D]   idx, weight[T_(data,fsdp,expert), K]
  W1, W3[E_expert, D, F_tensor]   W2[E_expert, F_tensor, D]   (D is all-gathered over fsdp at the boundary)

Per device, with Tl local tokens, P = size of "expert", El = E / P local experts and C slots per
(source device, expert):
  1. group: each (token, k) assignment gets a slot `expert * C + rank` in a send buffer [E * C, D] = [P, El*C, D],
     where `rank` counts earlier assignments of the same expert on this device (first choices of all tokens
     before second choices, so drops, if any, hit the lowest-ranked choices);
  2. dispatch: all_to_all over "expert" -> [P (source), El, C, D] -> [El, P*C, D];
  3. local grouped matmul: clamped SwiGLU per local expert, a batched einsum "EMD,EDF->EMF" (the low-precision
     `pallas_kernels.expert_matmul` replaces it later), partial over F if "tensor" splits F;
  4. combine: all_to_all back -> [E * C, D], gather each assignment's row, weight, sum over k, psum over
     "tensor".
Collectives per MoE layer: two all_to_alls of E*C*D elements per device over "expert" (forward; the same two
in the backward pass), one all-reduce of [Tl, D] over "tensor" when F is split.

Buffer size (static shapes):
  - dropless (default, `capacity_factor=None`): C = Tl, the worst case, since the K experts of one token are
    distinct (top-k and hash routing guarantee it), so no expert can receive more than Tl assignments from one
    device. Nothing is dropped, whatever the routing. The price: buffers and expert FLOPs are E/K times those of
    a perfectly balanced exchange (4x for tiny, about 43x for V4-Flash), so at scale use a capacity factor.
  - capacity (`capacity_factor=c`): C = ceil(c * Tl * K / E), at most Tl. Assignments beyond C are dropped
    (they contribute zero) and counted.
`dropped` is the exact global number of dropped (token, k) assignments, summed over all devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding import rules


def capacity(tokens_per_device: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Slots per (source device, expert): Tl when dropless, else ceil(c * Tl * K / E) clipped to [1, Tl]."""
    if capacity_factor is None:
        return tokens_per_device
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
    c = math.ceil(capacity_factor * tokens_per_device * top_k / num_experts)
    return max(1, min(tokens_per_device, c))


def expert_ffn(xe: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, limit: float) -> jax.Array:
    """Clamped SwiGLU of each local expert on its buffer: silu(min(x w1, l)) * clip(x w3, -l, l) @ w2.

    Shapes: xe [E, M, D], w1/w3 [E, D, F], w2 [E, F, D] -> [E, M, D].
    """
    gate = jnp.minimum(jnp.einsum("emd,edf->emf", xe, w1), limit)  # [E, M, F]
    up = jnp.clip(jnp.einsum("emd,edf->emf", xe, w3), -limit, limit)
    return jnp.einsum("emf,efd->emd", jax.nn.silu(gate) * up, w2)  # [E, M, D]


def _slots(expert_idx: jax.Array, num_experts: int, cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Buffer slot of each assignment, k-major: first choices of all tokens rank before second choices.

    Shapes: expert_idx [T, K] (-1 = no assignment) -> slot [K*T] (num_experts*cap = dropped), keep [K*T] bool,
    valid [K*T] bool.
    """
    e = expert_idx.T.reshape(-1)  # [K*T], k-major
    valid = e >= 0
    key = jnp.where(valid, e, num_experts)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    rank_sorted = jnp.arange(key.shape[0]) - jnp.searchsorted(sorted_key, sorted_key, side="left")
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)
    keep = valid & (rank < cap)
    slot = jnp.where(keep, key * cap + rank, num_experts * cap)
    return slot, keep, valid


def _local(x, expert_idx, expert_weight, w1, w3, w2, *, limit, cap, num_experts, ep_axis, ep_size, tensor_axis,
           token_axes):
    """The per-device body: group, dispatch, expert FFN, combine. Shapes: x [Tl, D] ... -> [Tl, D], []."""
    tl, d = x.shape
    k = expert_idx.shape[1]
    slot, keep, valid = _slots(expert_idx, num_experts, cap)
    tok = jnp.tile(jnp.arange(tl), k)  # [K*Tl], k-major
    with jax.named_scope("moe/dispatch"):
        buf = jnp.zeros((num_experts * cap, d), x.dtype).at[slot].add(x[tok], mode="drop")  # [E*C, D]
        buf = buf.reshape(ep_size, (num_experts // ep_size) * cap, d)  # [P, El*C, D]
        if ep_axis is not None:
            buf = jax.lax.all_to_all(buf, ep_axis, 0, 0, tiled=True)  # [P (source), El*C, D]
        el = num_experts // ep_size
        xe = buf.reshape(ep_size, el, cap, d).transpose(1, 0, 2, 3).reshape(el, ep_size * cap, d)  # [El, P*C, D]
    with jax.named_scope("moe/expert_matmul"):
        ye = expert_ffn(xe, w1, w3, w2, limit)  # [El, P*C, D]
    with jax.named_scope("moe/combine"):
        ye = ye.reshape(el, ep_size, cap, d).transpose(1, 0, 2, 3).reshape(ep_size, el * cap, d)  # [P, El*C, D]
        if ep_axis is not None:
            ye = jax.lax.all_to_all(ye, ep_axis, 0, 0, tiled=True)  # [P (destination), El*C, D]
        rows = jnp.take(ye.reshape(num_experts * cap, d), slot, axis=0, mode="fill", fill_value=0)  # [K*Tl, D]
        gate = jnp.where(keep, expert_weight.T.reshape(-1), 0.0).astype(jnp.float32)  # [K*Tl]
        y = jnp.sum((rows.astype(jnp.float32) * gate[:, None]).reshape(k, tl, d), axis=0)  # [Tl, D]
        if tensor_axis is not None:
            y = jax.lax.psum(y, tensor_axis)
    dropped = jnp.sum(valid & ~keep).astype(jnp.int32)
    if token_axes:
        dropped = jax.lax.psum(dropped, token_axes)
    return y.astype(x.dtype), dropped


def routed_experts(x: jax.Array, expert_idx: jax.Array, expert_weight: jax.Array, w1: jax.Array, w3: jax.Array,
                   w2: jax.Array, *, swiglu_limit: float, capacity_factor: float | None = None,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> tuple[jax.Array, jax.Array]:
    """y[t] = sum_k expert_weight[t, k] * expert_{expert_idx[t, k]}(x[t]), expert-parallel over the mesh.

    One expert is the clamped SwiGLU `silu(min(x w1, l)) * clip(x w3, -l, l) @ w2` (DeepSeek-V4 MoE, section 4
    of ARCHITECTURE.md). The mesh is `mesh`, else the one entered with `jax.set_mesh`; without either, the same
    grouped computation runs on one device. Experts are split over "expert" when E divides by its size (else the
    expert axis acts as plain data parallelism here), F over "tensor" when it divides.

    Args:
      x: token activations (flattened batch).
      expert_idx: the K distinct experts of each token, int32; -1 marks "no assignment".
      expert_weight: gating weights, float32.
      w1, w3, w2: stacked expert weights.
      swiglu_limit: the SwiGLU clamp `l`.
      capacity_factor: None = dropless (default); c > 0 = capacity ceil(c * Tl * K / E) per (device, expert).
      mesh: optional mesh; see above.

    Returns:
      (y, dropped): y in x's dtype; dropped = global count of dropped (token, k) assignments (0 when dropless).

    Shapes:
      x [T, D], expert_idx [T, K] int32, expert_weight [T, K] f32, w1/w3 [E, D, F], w2 [E, F, D]
      -> y [T, D], dropped [] int32.
    """
    t, d = x.shape
    num_experts, _, f = w1.shape
    k = expert_idx.shape[1]
    if expert_idx.shape != (t, k) or expert_weight.shape != (t, k):
        raise ValueError(f"expert_idx {expert_idx.shape} and expert_weight {expert_weight.shape} must be [T={t}, K]")
    if w3.shape != w1.shape or w2.shape != (num_experts, f, d) or w1.shape[1] != d:
        raise ValueError(f"expert weights must be w1/w3 [E, D, F], w2 [E, F, D]; got {w1.shape}, {w3.shape}, "
                         f"{w2.shape} for D={d}")
    expert_idx = expert_idx.astype(jnp.int32)
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            mesh = None
    if mesh is None:
        cap = capacity(t, num_experts, k, capacity_factor)
        return _local(x, expert_idx, expert_weight, w1, w3, w2, limit=swiglu_limit, cap=cap, num_experts=num_experts,
                      ep_axis=None, ep_size=1, tensor_axis=None, token_axes=())

    w_spec = rules.spec(("experts", None, "expert_mlp"), "param", shape=w1.shape, mesh=mesh)
    w2_spec = P(w_spec[0], w_spec[2], None)
    ep_axis, tensor_axis = w_spec[0], w_spec[2]
    sizes = dict(mesh.shape)
    ep_size = math.prod(sizes[a] for a in rules.axes_of(ep_axis))
    token_axes = tuple(a for a in rules.mesh_axes("batch", "activation") if sizes.get(a, 1) > 1)
    shards = math.prod(sizes[a] for a in token_axes)
    pad = -t % shards
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        expert_idx = jnp.pad(expert_idx, ((0, pad), (0, 0)), constant_values=-1)
        expert_weight = jnp.pad(expert_weight, ((0, pad), (0, 0)))
    tl = (t + pad) // shards
    cap = capacity(tl, num_experts, k, capacity_factor)
    tok_spec = P(token_axes if token_axes else None, None)

    def body(x, expert_idx, expert_weight, w1, w3, w2):
        return _local(x, expert_idx, expert_weight, w1, w3, w2, limit=swiglu_limit, cap=cap, num_experts=num_experts,
                      ep_axis=ep_axis, ep_size=ep_size, tensor_axis=tensor_axis, token_axes=token_axes)

    y, dropped = jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, w2_spec),
                               out_specs=(tok_spec, P()))(x, expert_idx, expert_weight, w1, w3, w2)
    return y[:t], dropped
