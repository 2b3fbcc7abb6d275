"""Expert parallelism: MoE dispatch and combine with `jax.shard_map` + `jax.lax.all_to_all` over "expert".

Layouts (scaling-book notation, mesh axes from `rules.RULES`):
  x[T_(data,fsdp,expert), D]   idx, weight[T_(data,fsdp,expert), K]
  W1, W3[E_expert, D, F_tensor]   W2[E_expert, F_tensor, D]   (D is all-gathered over fsdp at the boundary)

Per device, with Tl local tokens, P = size of "expert", El = E / P local experts and C slots per
(source device, expert):
  1. group: each (token, k) assignment gets a rank among this device's assignments to the same expert (first
     choices of all tokens before second choices) and a slot `expert * C + rank` in a send buffer
     [E * C, D] = [P, El*C, D];
  2. dispatch: all_to_all over "expert" -> [P (source), El, C, D] -> [El, P*C, D];
  3. local expert FFN (`expert_ffn`), partial over F if "tensor" splits F, one of two `local_ffn` layouts:
     "padded": clamped SwiGLU per local expert on the whole buffer, a batched einsum "EMD,EDF->EMF";
     "grouped": the per-(expert, source) counts travel with the rows (a second all_to_all of [E] int32), the
     filled rows are compacted to the front ([El*P*C, D], expert-major, empty slots last) and the grouped
     expert matmul (`pallas_kernels.expert_matmul`: Pallas on GPU/TPU, ragged_dot on CPU) runs on the ragged
     groups only, so empty slots cost no FLOPs where the kernel skips rows beyond sum(group_sizes);
  4. combine: all_to_all back -> [E * C, D], gather each assignment's row, weight, sum over k; psum over
     "tensor" at the end.
Collectives per pass: two all_to_alls of E*C*D elements per device over "expert" (and two more in the backward
pass), one all-reduce of [Tl, D] over "tensor" when F is split.

Modes (static shapes in both):
  - dropless (default, `capacity_factor=None`): C = ceil(Tl * K / E), the balanced load, and the exchange runs
    in rounds: round 0 carries the assignments of rank [0, C), each later (overflow) round the next
    Cs = ceil(C / 4) ranks. The number of rounds follows the busiest (device, expert) pair's load, agreed on by
    all devices (a pmax), so nothing is ever dropped, buffers stay at E*C*D = Tl*K*D elements whatever the
    routing, and the work grows only with the actual imbalance, in steps of a quarter of the balanced load (a
    random router's busiest expert at ~1.2x the mean costs one quarter-size round, not a second full one; every
    token on the same experts costs 4 (E/K - 1) overflow rounds). The backward pass (a custom VJP) replays the
    overflow rounds, recomputing their expert activations instead of storing them; round 0's are kept.
  - capacity (`capacity_factor=c`): one round with C = ceil(c * Tl * K / E) (at most Tl); assignments of rank
    >= C are dropped (they contribute zero) and counted.
`dropped` is the exact global number of dropped (token, k) assignments, summed over all devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.expert_matmul.stored import expert_matmul_stored
from sharding import rules


def capacity(tokens_per_device: int, num_experts: int, top_k: int, capacity_factor: float | None) -> int:
    """Slots per (source device, expert) and round: ceil(c * Tl * K / E) clipped to [1, Tl]; c = 1 when dropless."""
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
    c = math.ceil((capacity_factor or 1.0) * tokens_per_device * top_k / num_experts)
    return max(1, min(tokens_per_device, c))


def expert_parallelism(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> int:
    """How many ways the routed experts are split on `mesh` (default: the active mesh); 1 without one."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return 1
    sizes = dict(mesh.shape)
    return math.prod(sizes.get(a, 1) for a in rules.mesh_axes("experts", "param"))


def expert_ffn(xe: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array, limit: float,
               act_quant: Callable[[jax.Array], jax.Array] | None = None,
               group_sizes: jax.Array | None = None, weight_format: str = "float",
               activation_format: str = "float") -> jax.Array:
    """Clamped SwiGLU of each expert on its rows: silu(min(x w1, l)) * clip(x w3, -l, l) @ w2.

    The one expert FFN of every routed-expert path (padded, grouped, dense, expert-parallel). Two layouts:
      - padded buffers (`group_sizes` None): xe [E, M, D], one batched matmul per weight -> [E, M, D];
      - sorted rows (`group_sizes` [E] int32): xe [M, D] holds tokens sorted by expert, expert e owning the next
        group_sizes[e] rows; the grouped expert matmul (`pallas_kernels.expert_matmul`: Pallas on GPU/TPU,
        ragged_dot elsewhere) -> [M, D], rows beyond sum(group_sizes) zero.
    `act_quant` (e.g. FP8 fake quantisation for QAT) is applied to the hidden activation before w2; it must act
    per row. Weights: w1/w3 [E, D, F], w2 [E, F, D].
    `weight_format` (sorted rows only): "float" multiplies the weights as given; "fp8" / "fp4" take float
    master weights and hand them to the kernel in that stored format (`expert_matmul_stored`, straight-through
    gradient); the padded layout takes weights already fake-quantised by the caller. `activation_format` "fp8"
    (with "fp8" weights) hands the kernel the rows as E4M3 1x128 tiles too, with DeepSeek's FP8 backward.
    """
    if group_sizes is None:
        if weight_format != "float":
            raise ValueError(f"weight_format={weight_format!r} needs the grouped layout (group_sizes); the padded "
                             "layout takes fake-quantised float weights")
        matmul = lambda a, w: jnp.einsum("emd,edf->emf", a, w)  # noqa: E731
    else:
        matmul = lambda a, w: expert_matmul_stored(a, w, group_sizes, weight_format,  # noqa: E731
                                                   activation_format=activation_format)
    gate = jnp.minimum(matmul(xe, w1), limit)
    up = jnp.clip(matmul(xe, w3), -limit, limit)
    h = jax.nn.silu(gate) * up
    if act_quant is not None:
        h = act_quant(h)
    return matmul(h, w2)


def _ranks(expert_idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Per assignment (k-major: first choices of all tokens, then second choices, ...) its expert and its rank
    among this device's assignments to that expert; -1 marks "no assignment" and gets expert E.

    Shapes: expert_idx [T, K] -> expert [K*T] int32, rank [K*T] int32.
    """
    e = expert_idx.T.reshape(-1)  # [K*T]
    key = jnp.where(e >= 0, e, num_experts)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    rank_sorted = jnp.arange(key.shape[0], dtype=jnp.int32) - jnp.searchsorted(sorted_key, sorted_key, side="left")
    rank = jnp.zeros_like(rank_sorted).at[order].set(rank_sorted.astype(jnp.int32))
    return key, rank


@dataclasses.dataclass(frozen=True)
class _Exchange:
    """Static parameters of one round of dispatch -> expert FFN -> combine."""

    limit: float
    cap: int
    num_experts: int
    ep_axis: str | tuple[str, ...] | None
    ep_size: int
    act_quant: Callable[[jax.Array], jax.Array] | None = None
    local_ffn: str = "padded"
    weight_format: str = "float"
    activation_format: str = "float"

    def __call__(self, x, gate, w1, w3, w2, key, rank, offset):
        """Assignments of rank [offset, offset + C); returns their weighted outputs summed per token (float32,
        partial over "tensor"). Shapes: x [Tl, D], gate [K*Tl] f32, key/rank [K*Tl] -> [Tl, D] f32."""
        tl, d = x.shape
        k = gate.shape[0] // tl
        cap, n_exp, p = self.cap, self.num_experts, self.ep_size
        el = n_exp // p
        local = rank - offset
        take = (key < n_exp) & (local >= 0) & (local < cap)
        slot = jnp.where(take, key * cap + local, n_exp * cap)  # out of range = not in this round
        with jax.named_scope("moe/dispatch"):
            buf = jnp.zeros((n_exp * cap, d), x.dtype).at[slot].add(jnp.tile(x, (k, 1)), mode="drop")  # [E*C, D]
            buf = buf.reshape(p, el * cap, d)  # [P, El*C, D]
            if self.ep_axis is not None:
                buf = jax.lax.all_to_all(buf, self.ep_axis, 0, 0, tiled=True)  # [P (source), El*C, D]
            xe = buf.reshape(p, el, cap, d).transpose(1, 0, 2, 3).reshape(el, p * cap, d)  # [El, P*C, D]
        with jax.named_scope("moe/expert_matmul"):
            if self.local_ffn == "grouped":
                sent = jnp.bincount(jnp.where(take, key, n_exp), length=n_exp + 1)[:n_exp].astype(jnp.int32)  # [E]
                ye = self._grouped_ffn(xe, sent, w1, w3, w2)
            else:
                ye = expert_ffn(xe, w1, w3, w2, self.limit, self.act_quant, weight_format=self.weight_format)
        with jax.named_scope("moe/combine"):
            ye = ye.reshape(el, p, cap, d).transpose(1, 0, 2, 3).reshape(p, el * cap, d)  # [P, El*C, D]
            if self.ep_axis is not None:
                ye = jax.lax.all_to_all(ye, self.ep_axis, 0, 0, tiled=True)  # [P (destination), El*C, D]
            rows = jnp.take(ye.reshape(n_exp * cap, d), slot, axis=0, mode="fill", fill_value=0)  # [K*Tl, D]
            g = jnp.where(take, gate, 0.0).astype(jnp.float32)
            return jnp.sum((rows.astype(jnp.float32) * g[:, None]).reshape(k, tl, d), axis=0)  # [Tl, D]

    def _grouped_ffn(self, xe, sent, w1, w3, w2):
        """`local_ffn="grouped"`: the filled rows of the received buffer as ragged groups of the local experts.

        `sent[e]` = rows this device put in expert e's C slots (filled from slot 0). Shapes: xe [El, P*C, D],
        sent [E] int32 -> [El, P*C, D] (empty slots 0)."""
        el, pc, d = xe.shape
        p, cap = self.ep_size, self.cap
        received = sent.reshape(p, el)  # [P (destination), El]
        if self.ep_axis is not None:
            received = jax.lax.all_to_all(received, self.ep_axis, 0, 0, tiled=True)  # [P (source), El]
        received = received.T  # [El, P]
        filled = (jnp.arange(cap, dtype=jnp.int32) < received[..., None]).reshape(-1)  # [El*P*C]
        order = jnp.argsort(~filled, stable=True)  # filled rows first, expert-major
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        group_sizes = jnp.sum(received, axis=1).astype(jnp.int32)  # [El]
        ys = expert_ffn(xe.reshape(el * pc, d)[order], w1, w3, w2, self.limit, self.act_quant,
                        group_sizes=group_sizes, weight_format=self.weight_format,
                        activation_format=self.activation_format)  # rows past the groups are 0
        return ys[inverse].reshape(el, pc, d)


OVERFLOW_ROUND_DIVISOR = 4  # overflow rounds carry C / 4 slots per (device, expert): a little imbalance costs little


def overflow_exchange(ex: _Exchange) -> _Exchange:
    """The exchange of the dropless rounds after the first: ceil(C / OVERFLOW_ROUND_DIVISOR) slots."""
    return dataclasses.replace(ex, cap=max(1, -(-ex.cap // OVERFLOW_ROUND_DIVISOR)))


def dropless_rounds(ex: _Exchange, busiest: jax.Array) -> jax.Array:
    """Rounds needed when the busiest (device, expert) pair holds `busiest` assignments: the first round's C
    slots, then overflow rounds of ceil(C / OVERFLOW_ROUND_DIVISOR)."""
    small = overflow_exchange(ex).cap
    return 1 + (jnp.maximum(busiest - ex.cap, 0) + small - 1) // small


def _rounds(ex: _Exchange, n_rounds, fn, first=None):
    """fn(ex, 0) + fn(small, C) + fn(small, C + Cs) + ... (n_rounds terms; small = `overflow_exchange(ex)` with
    Cs slots) for a pytree-valued fn; `first` replaces fn(ex, 0) when given. Round 0 always runs (it is all zeros
    when there is nothing to send) and gives the loop carry its exact type, including its varying mesh axes."""
    if first is None:
        first = fn(ex, 0)
    small = overflow_exchange(ex)
    step = lambda j, acc: jax.tree.map(jnp.add, acc, fn(small, ex.cap + (j - 1) * small.cap))  # noqa: E731
    return jax.lax.fori_loop(1, jnp.maximum(n_rounds, 1), step, first)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dropless(ex: _Exchange, x, gate, w1, w3, w2, key, rank, n_rounds):
    """Sum over rounds of `ex`. The VJP keeps the activations of round 0 (the balanced load, the bulk of the work)
    and replays the overflow rounds instead of storing theirs (their number is known only at run time)."""
    return _rounds(ex, n_rounds, lambda e, off: e(x, gate, w1, w3, w2, key, rank, off))


def _dropless_fwd(ex, x, gate, w1, w3, w2, key, rank, n_rounds):
    y0, pull0 = jax.vjp(lambda *a: ex(*a, key, rank, 0), x, gate, w1, w3, w2)
    y = _rounds(ex, n_rounds, lambda e, off: e(x, gate, w1, w3, w2, key, rank, off), first=y0)
    return y, (pull0, x, gate, w1, w3, w2, key, rank, n_rounds)


def _dropless_bwd(ex, res, dy):
    pull0, x, gate, w1, w3, w2, key, rank, n_rounds = res

    def one(e, off):
        _, pull = jax.vjp(lambda *a: e(*a, key, rank, off), x, gate, w1, w3, w2)
        return pull(dy)

    return tuple(_rounds(ex, n_rounds, one, first=tuple(pull0(dy)))) + (None, None, None)


_dropless.defvjp(_dropless_fwd, _dropless_bwd)


def _local(x, expert_idx, expert_weight, w1, w3, w2, *, ex: _Exchange, dropless: bool, tensor_axis, token_axes):
    """The per-device body. Shapes: x [Tl, D], expert_idx/expert_weight [Tl, K] ... -> y [Tl, D], dropped []."""
    key, rank = _ranks(expert_idx, ex.num_experts)
    gate = expert_weight.T.reshape(-1).astype(jnp.float32)  # [K*Tl], k-major like key and rank
    valid = key < ex.num_experts
    if dropless:
        busiest = jnp.max(jnp.where(valid, rank + 1, 0))
        if token_axes:
            busiest = jax.lax.pmax(busiest, token_axes)
        n_rounds = dropless_rounds(ex, busiest)
        y = _dropless(ex, x, gate, w1, w3, w2, key, rank, n_rounds)
        dropped = jnp.zeros((), jnp.int32)
    else:
        y = ex(x, gate, w1, w3, w2, key, rank, 0)
        dropped = jnp.sum(valid & (rank >= ex.cap)).astype(jnp.int32)
        if token_axes:
            dropped = jax.lax.psum(dropped, token_axes)
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    return y.astype(x.dtype), dropped


def routed_experts(x: jax.Array, expert_idx: jax.Array, expert_weight: jax.Array, w1: jax.Array, w3: jax.Array,
                   w2: jax.Array, *, swiglu_limit: float, capacity_factor: float | None = None,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                   act_quant: Callable[[jax.Array], jax.Array] | None = None, local_ffn: str = "padded",
                   weight_format: str = "float", activation_format: str = "float") -> tuple[jax.Array, jax.Array]:
    """y[t] = sum_k expert_weight[t, k] * expert_{expert_idx[t, k]}(x[t]), expert-parallel over the mesh.

    One expert is the clamped SwiGLU `silu(min(x w1, l)) * clip(x w3, -l, l) @ w2` (DeepSeek-V4 MoE, see
    docs/model.md). The mesh is `mesh`, else the one entered with `jax.set_mesh`; without either, the same
    padded computation runs on one device. Experts are split over "expert" when E divides by its size (else the
    expert axis acts as plain data parallelism here), F over "tensor" when it divides.

    Args:
      x: token activations (flattened batch).
      expert_idx: the K experts of each token, int32, distinct per token; -1 marks "no assignment".
      expert_weight: gating weights, float32.
      w1, w3, w2: stacked expert weights.
      swiglu_limit: the SwiGLU clamp `l`.
      capacity_factor: None = dropless (default); c > 0 = one round of capacity ceil(c * Tl * K / E) per
        (device, expert), overflow dropped.
      mesh: optional mesh; see above.
      act_quant: optional function applied to each expert's hidden activation before w2 (e.g. FP8 QAT); it
        must act per row (per token), since rows of other tokens share its buffer.
      local_ffn: "padded" (batched einsum over the whole received buffer) or "grouped" (the grouped expert
        matmul on the filled rows only); see the module docstring.
      weight_format: "float", or ("grouped" only) "fp8" / "fp4": float master weights that reach the kernel in
        that stored format (`expert_ffn`).
      activation_format: "float", or with weight_format "fp8": "fp8" activations in the kernel (`expert_ffn`).

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
    if local_ffn not in ("padded", "grouped"):
        raise ValueError(f"local_ffn must be 'padded' or 'grouped', got {local_ffn!r}")
    if weight_format != "float" and local_ffn != "grouped":
        raise ValueError(f"weight_format={weight_format!r} needs local_ffn='grouped'")
    expert_idx = expert_idx.astype(jnp.int32)
    dropless = capacity_factor is None
    opts = {"local_ffn": local_ffn, "weight_format": weight_format, "activation_format": activation_format}
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            mesh = None
    if mesh is None:
        ex = _Exchange(swiglu_limit, capacity(t, num_experts, k, capacity_factor), num_experts, None, 1, act_quant,
                       **opts)
        return _local(x, expert_idx, expert_weight, w1, w3, w2, ex=ex, dropless=dropless, tensor_axis=None,
                      token_axes=())

    w_spec = rules.spec(("experts", None, "expert_mlp"), "param", shape=w1.shape, mesh=mesh)
    w2_spec = P(w_spec[0], w_spec[2], None)
    ep_axis, tensor_axis = w_spec[0], w_spec[2]
    sizes = dict(mesh.shape)
    ep_size = math.prod(sizes[a] for a in rules.axes_of(ep_axis))
    # Tokens [B*T] are split over the batch axes and, within a row, over `context` (the sequence axis).
    token_axes = tuple(a for a in rules.mesh_axes("batch", "activation") + rules.mesh_axes("seq", "activation")
                       if sizes.get(a, 1) > 1)
    shards = math.prod(sizes[a] for a in token_axes)
    pad = -t % shards
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        expert_idx = jnp.pad(expert_idx, ((0, pad), (0, 0)), constant_values=-1)
        expert_weight = jnp.pad(expert_weight, ((0, pad), (0, 0)))
    tl = (t + pad) // shards
    ex = _Exchange(swiglu_limit, capacity(tl, num_experts, k, capacity_factor), num_experts, ep_axis, ep_size,
                   act_quant, **opts)
    tok_spec = P(token_axes if token_axes else None, None)
    body = functools.partial(_local, ex=ex, dropless=dropless, tensor_axis=tensor_axis, token_axes=token_axes)
    y, dropped = jax.shard_map(body, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, w2_spec),
                               out_specs=(tok_spec, P()),
                               # Pallas calls (the grouped kernel on GPU/TPU) need the unchecked mode.
                               check_vma=local_ffn != "grouped")(x, expert_idx, expert_weight, w1, w3, w2)
    return y[:t], dropped
