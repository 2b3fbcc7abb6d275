"""Masking rules and helpers shared by the dense attention, sparse attention and lightning-indexer kernels.

* Reference helpers: the sliding-window key blocks and the softmax with an attention sink.
* Kernel helpers: token padding, the "rows" layout (query t, head n) -> row t * N + n, online-softmax
  steps and masks written with plain `jnp` so that the Mosaic-TPU and the Triton kernels share them;
  `WindowGeometry`, the static block ranges of the sliding window.

Masking rules (docs/kernels.md; packed rows are masked per document, docs/packing.md):
* window: key j is visible to query t iff t - window < j <= t and segment[j] == segment[t];
* compressed entry c is admissible for query t iff entry_end[c] <= t and entry_segment[c] == segment[t]:
  entry_end[c] is the row of the last token the entry pools (default (c + 1) * m - 1, windows aligned to
  the row), entry_segment[c] its document (-1 = an empty slot, never visible). Contract: entry_end[c] >=
  c * m, so entry blocks past t // m are skipped without looking at them.
Window positions are local (t and j index the arrays the kernel is given); entry admissibility compares
entry_end with the query's absolute position t + query_offset (`query_offset`, default 0: a caller that passes
a chunk of a longer sequence, e.g. under context parallelism, gives the position of its first row, and entry_end
in the same absolute frame).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")
# entry_end of padded entry slots: after every query.
NEVER = 2**30
# Segment id given to padded tokens: never equal to a real segment (real ids are >= 0).
PAD_SEGMENT = -2


# ----------------------------------------------------------------------------------------------
# Reference helpers.


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pads `x` along `axis` at the end up to `size` (no-op if already that long)."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def reference_query_block(window: int) -> int:
    """Query block of the references: at least the window, so a block's keys are its own block
    plus the previous one."""
    return max(window, 64)


def window_keys(kv: jax.Array, segment_ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per query block, the keys of the previous and the current block.

    Args:
      kv: [B, Tp, H] with Tp a multiple of `block`.
      segment_ids: [B, Tp] int32 (padded tokens carry PAD_SEGMENT).
      block: query block size (>= window - 1).

    Returns:
      keys [nb, B, 2*block, H], key positions [nb, 2*block] (negative = before the sequence),
      key segments [nb, B, 2*block].

    Shapes:
      nb = Tp // block.
    """
    B, Tp, H = kv.shape
    nb = Tp // block
    cur = kv.reshape(B, nb, block, H)
    prev = jnp.concatenate([jnp.zeros_like(cur[:, :1]), cur[:, :-1]], axis=1)
    keys = jnp.concatenate([prev, cur], axis=2).swapaxes(0, 1)
    seg = segment_ids.reshape(B, nb, block)
    seg_prev = jnp.concatenate([jnp.full_like(seg[:, :1], PAD_SEGMENT), seg[:, :-1]], axis=1)
    key_seg = jnp.concatenate([seg_prev, seg], axis=2).swapaxes(0, 1)
    key_pos = (jnp.arange(nb)[:, None] - 1) * block + jnp.arange(2 * block)[None, :]
    return keys, key_pos, key_seg


def window_mask(q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array, k_seg: jax.Array, window: int) -> jax.Array:
    """Window visibility: t - window < j <= t, j >= 0, same segment.

    Shapes:
      q_pos [Q], q_seg [B, Q], k_pos [S], k_seg [B, S] -> [B, Q, S].
    """
    pos_ok = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window) & (k_pos[None, :] >= 0)
    return pos_ok[None] & (q_seg[:, :, None] == k_seg[:, None, :])


def admissible_mask(q_pos: jax.Array, q_seg: jax.Array, entry_segment: jax.Array, entry_end: jax.Array) -> jax.Array:
    """Compressed-entry admissibility: entry_end[c] <= t and entry_segment[c] == segment[t].

    Shapes:
      q_pos [Q], q_seg [B, Q], entry_segment [B, C], entry_end [B, C] -> [B, Q, C].
    """
    pos_ok = entry_end[:, None, :] <= q_pos[None, :, None]
    return pos_ok & (q_seg[:, :, None] == entry_segment[:, None, :])


def row_aligned_entry_end(entry_segment: jax.Array, ratio: int) -> jax.Array:
    """entry_end of windows aligned to the row: entry c pools rows c*m .. c*m + m - 1. [B, C] -> [B, C] int32."""
    c = jnp.arange(entry_segment.shape[1], dtype=jnp.int32)
    return jnp.broadcast_to((c + 1) * ratio - 1, entry_segment.shape)


def entry_keys(entry_segment: jax.Array, entry_end: jax.Array | None, ratio: int) -> jax.Array:
    """The kernels' per-entry mask keys: [B, 2, C] int32, row 0 = entry_segment, row 1 = entry_end."""
    if entry_end is None:
        entry_end = row_aligned_entry_end(entry_segment, ratio)
    return jnp.stack([entry_segment.astype(jnp.int32), entry_end.astype(jnp.int32)], axis=1)


def pad_entry_keys(keys: jax.Array, length: int) -> jax.Array:
    """Pads [B, 2, C] entry keys to `length` slots that nothing sees (segment -1, end NEVER)."""
    seg = pad_axis(keys[:, 0], 1, length, -1)
    end = pad_axis(keys[:, 1], 1, length, NEVER)
    return jnp.stack([seg, end], axis=1)


def query_offset_array(query_offset) -> jax.Array:
    """`query_offset` (a Python int or an integer scalar array, traced or not) as an int32 scalar; else ValueError."""
    off = jnp.asarray(query_offset)
    if off.ndim != 0 or not jnp.issubdtype(off.dtype, jnp.integer):
        raise ValueError(f"query_offset must be an integer scalar, got {off.dtype}{off.shape}")
    return off.astype(jnp.int32)


def check_entry_end(entry_end, entry_segment) -> None:
    if entry_end is not None and (
        entry_end.shape != entry_segment.shape or not jnp.issubdtype(entry_end.dtype, jnp.integer)
    ):
        raise ValueError(
            f"entry_end must be integer [B, C] = {entry_segment.shape}, got {entry_end.dtype}{entry_end.shape}"
        )


def tie_to(layout, *floats):
    """`layout` (integer arrays: positions, segments, entry keys) tied to the block's float inputs by
    `lax.optimization_barrier`, so that under `jax.checkpoint` the masks built from it are recomputed in the
    backward pass like the rest of the block instead of being saved per block (a stack of [Q, C] masks over the
    query blocks would be a [T, C] tensor)."""
    return lax.optimization_barrier((layout, floats))[0]


def sink_softmax(logits: jax.Array, mask: jax.Array, sink: jax.Array) -> jax.Array:
    """Softmax whose denominator also holds exp(sink[n]) (a key with a logit and no value).

    p_j = exp(z_j) / (sum_k exp(z_k) + exp(sink_n)) over the unmasked keys; masked keys get 0.

    Shapes:
      logits [..., N, S] float32, mask broadcastable to it, sink [N] -> p [..., N, S].
    """
    z = jnp.where(mask, logits, NEG_INF)
    s = sink.astype(jnp.float32)[:, None]
    m = lax.stop_gradient(jnp.maximum(jnp.max(z, axis=-1, keepdims=True), s))
    e = jnp.exp(z - m)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(s - m))


# ----------------------------------------------------------------------------------------------
# Kernel helpers (wrapper side).


def to_rows(x: jax.Array, length: int, value=0) -> jax.Array:
    """[B, T, N, H] -> [B, length * N, H]: pads tokens, then row t * N + n holds (t, n)."""
    B, _, N, H = x.shape
    return pad_axis(x, 1, length, value).reshape(B, length * N, H)


def row_segments(segment_ids: jax.Array, n_heads: int, length: int) -> jax.Array:
    """[B, T] -> [B, length * N, 1] int32: the segment of each (token, head) row."""
    seg = pad_axis(segment_ids.astype(jnp.int32), 1, length, PAD_SEGMENT)
    return jnp.repeat(seg, n_heads, axis=1)[..., None]


def key_segments(segment_ids: jax.Array, length: int) -> jax.Array:
    """[B, T] -> [B, 1, length] int32 (lane-major, one key per lane)."""
    return pad_axis(segment_ids.astype(jnp.int32), 1, length, PAD_SEGMENT)[:, None, :]


def window_inputs(q: jax.Array, kv: jax.Array, segment_ids: jax.Array, length: int) -> dict[str, jax.Array]:
    """The sliding-window inputs of a kernel, padded to `length` tokens, in the rows layout.

    Shapes:
      q [B, T, N, H], kv [B, T, H], segment_ids [B, T] -> q_rows [B, length * N, H], qpos [length * N, 1],
      qseg [B, length * N, 1], kv_p [B, length, H], kseg [B, 1, length].
    """
    N = q.shape[2]
    return {
        "q_rows": to_rows(q, length),
        "qpos": row_positions(length, N),
        "qseg": row_segments(segment_ids, N, length),
        "kv_p": pad_axis(kv, 1, length),
        "kseg": key_segments(segment_ids, length),
    }


def sink_rows(sink: jax.Array, block_q: int) -> jax.Array:
    """[N] -> [block_q * N, 1] float32: the sink logit of each row of a query block."""
    return jnp.tile(sink.astype(jnp.float32), block_q)[:, None]


def lcm(*xs: int) -> int:
    out = 1
    for x in xs:
        out = out * x // math.gcd(out, x)
    return out


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [N, K]^T -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [K, N] -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [K, M]^T . b [K, N] -> [M, N] float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def online_softmax_step(m, l, acc, s, mask, v):
    """One flash-attention update of the running max m [R, 1], sum l [R, 1] and acc [R, H].

    s [R, S] are float32 logits, mask [R, S] (or broadcastable) their visibility, v [S, H] values.
    m starts at the sink logit and l at 1, so m is always finite and masked keys add exactly 0.
    """
    s = jnp.where(mask, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l_new = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc + dot_nn(p.astype(v.dtype), v)
    return m_new, l_new, acc_new


def softmax_grads(s, mask, lse, do_dot_v, delta):
    """Backward of one key block: p = exp(s - lse) on visible keys, ds = p * (dO.v - delta).

    All [R, S] float32 except lse, delta [R, 1]. Returns (p, ds).
    """
    p = jnp.exp(jnp.where(mask, s, NEG_INF) - lse)
    return p, p * (do_dot_v - delta)


def window_block_mask(t, k_pos, q_seg, k_seg, window: int):
    """Window visibility in a kernel: t [R, 1] or [R, S] query positions, k_pos [1, S] or [R, S]."""
    return (k_pos <= t) & (k_pos > t - window) & (q_seg == k_seg)


def entry_block_mask(t, q_seg, e_seg, e_end):
    """Admissibility in a kernel: t query positions, e_seg / e_end the entries' keys (broadcastable)."""
    return (e_end <= t) & (q_seg == e_seg)


def candidate_entries(t, ratio: int):
    """Number of entry slots that can be admissible for queries <= t (entry_end[c] >= c * ratio)."""
    return lax.div(t, ratio) + 1


def attention_cost(
    *,
    batch: int,
    tokens: int,
    heads: int,
    head_dim: int,
    keys_per_query: float,
    itemsize: int,
    key_bytes: float,
    backward: bool = False,
) -> tuple[int, int, int]:
    """(flops, transcendentals, bytes_accessed) of attention with `keys_per_query` visible keys.

    Forward: QK^T and PV, 2 flops per multiply-add each. Backward: recompute QK^T, dO.V^T, dQ, dK, dV.
    `key_bytes` are the bytes of keys/values read from memory (the caller knows the reuse).
    """
    pairs = batch * tokens * heads * keys_per_query
    matmuls = 5 if backward else 2
    flops = int(2 * matmuls * pairs * head_dim)
    rows = batch * tokens * heads * head_dim * itemsize
    bytes_accessed = int((4 if backward else 2) * rows + key_bytes)
    return flops, int(pairs), bytes_accessed


@dataclasses.dataclass(frozen=True)
class WindowGeometry:
    """Static sizes of a padded problem and the sliding-window block ranges."""

    B: int
    T: int
    N: int
    H: int
    window: int
    block_q: int
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int
    Tp: int

    @staticmethod
    def make(B, T, N, H, window, bs) -> WindowGeometry:
        Tp = round_up(max(T, 1), lcm(bs.block_q, bs.block_kv, bs.block_q_dkv, bs.block_kv_dkv))
        return WindowGeometry(B, T, N, H, window, bs.block_q, bs.block_kv, bs.block_q_dkv, bs.block_kv_dkv, Tp)

    @property
    def scale(self) -> float:
        return self.H**-0.5

    @property
    def nq(self) -> int:
        return self.Tp // self.block_q

    # Forward / dq: key blocks of query block i are first_kv(i) .. last_kv(i).
    def first_kv(self, i):
        return lax.div(jnp.maximum(i * self.block_q - self.window + 1, 0), self.block_kv)

    def last_kv(self, i):
        return lax.div((i + 1) * self.block_q - 1, self.block_kv)

    @property
    def n_window_steps(self) -> int:
        bq, bk, w = self.block_q, self.block_kv, self.window
        return max(((i + 1) * bq - 1) // bk - max(i * bq - w + 1, 0) // bk + 1 for i in range(self.nq))

    def kv_block(self, i, j):
        return jnp.minimum(self.first_kv(i) + jnp.minimum(j, self.n_window_steps - 1), self.last_kv(i))

    # Window dkv: query blocks (of block_q_dkv) that see key block kb (of block_kv_dkv).
    def first_q(self, kb):
        return lax.div(kb * self.block_kv_dkv, self.block_q_dkv)

    def last_q(self, kb):
        last_t = kb * self.block_kv_dkv + self.block_kv_dkv - 1 + self.window - 1
        return jnp.minimum(lax.div(last_t, self.block_q_dkv), self.Tp // self.block_q_dkv - 1)

    @property
    def n_dkv_steps(self) -> int:
        bq, bk, w, nqd = self.block_q_dkv, self.block_kv_dkv, self.window, self.Tp // self.block_q_dkv
        return max(min((kb * bk + bk + w - 2) // bq, nqd - 1) - kb * bk // bq + 1 for kb in range(self.Tp // bk))

    def q_block_dkv(self, kb, j):
        return jnp.minimum(self.first_q(kb) + j, self.last_q(kb))


def row_positions(length: int, n_heads: int) -> jax.Array:
    """[length * N, 1] int32: the token position of each (token, head) row."""
    return jnp.repeat(jnp.arange(length, dtype=jnp.int32), n_heads)[:, None]


def sink_grad(sink, lse, delta, n_heads):
    """d loss / d sink[n] = -sum over rows of head n of exp(sink - lse) * delta.

    Shapes:
      sink [N], lse/delta [B, Tp*N, 1] -> [N] (dtype of sink).
    """
    B = lse.shape[0]
    p_sink = jnp.exp(sink.astype(jnp.float32)[None, None, :] - lse.reshape(B, -1, n_heads))
    return (-jnp.sum(p_sink * delta.reshape(B, -1, n_heads), axis=(0, 1))).astype(sink.dtype)


def check_attention_inputs(q, kv, entries, sink, segment_ids, *, window: int, ratio: int | None = None) -> None:
    """Raises ValueError with one line naming the first inconsistent argument."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
    B, T, N, H = q.shape
    if kv.shape != (B, T, H):
        raise ValueError(f"kv must be [B, T, H] = {(B, T, H)}, got {kv.shape}")
    if entries.ndim != 3 or entries.shape[0] != B or entries.shape[2] != H:
        raise ValueError(f"entries must be [B, C, H] with B={B}, H={H}, got {entries.shape}")
    if sink.shape != (N,):
        raise ValueError(f"sink must be [N] = ({N},), got {sink.shape}")
    if segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integer [B, T] = {(B, T)}, got {segment_ids.dtype}{segment_ids.shape}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if ratio is not None and ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
