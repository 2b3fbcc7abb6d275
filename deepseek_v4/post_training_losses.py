"""The math of GRPO and on-policy distillation on plain arrays (the rollout loops build their batches with these).

GRPO with V3.2's stabilisers (docs/training.md, "Post-training"), per prompt a group of G sampled completions:

  advantages      `group_advantages`: A_i = R_i - mean(R) over the valid samples of the group (V3.2 drops the
                  division by std(R); `scale_by_std=True` gives the original GRPO). A group with no valid sample
                  or with equal rewards has no signal: its advantages are 0 and it is reported as such.
  length penalty  `length_penalized_rewards`: R_i - coef[mode] * min(len_i / max_len[mode], 1), one coefficient
                  and length budget per reasoning mode (the report gives each mode its own penalty, not values).
  policy term     `clipped_policy_objective`: min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = pi/pi_old.
  KL              `unbiased_kl`: (pi/pi_old) * (pi_ref/pi - log(pi_ref/pi) - 1), the k3 estimate importance-weighted
                  because the tokens were sampled from pi_old; its gradient is unbiased for KL(pi || pi_ref).
  OPSM            `off_policy_sequence_mask`: 0 for a sequence whose advantage is negative and whose mean
                  log(pi_old / pi) exceeds delta, else 1; it multiplies the policy term only.
  loss            `grpo_token_loss` + `aggregate` (per-sequence mean then mean, or the token-level mean); in the
                  shared train step: `make_grpo_loss` (a `train.LossFn` over packed rollouts, token mean).

On-policy distillation: `chunked_reverse_kl` = sum_i w_i KL(p_student || p_teacher_i) per position over the full
vocabulary, from the last hidden states and the heads; the logits are rebuilt one vocabulary chunk at a time
(never [T, V]), one teacher after another. `reference_reverse_kl` is the dense spec it is tested against.

Rewards: `deepseek_v4.verifiable_tasks` (exact answers; a reward function that raises is a counted skip).

Shapes: per-sequence arrays [S] (or [G] for one group), per-token arrays [S, L] with a float mask [S, L] (1 on the
completion's tokens), hidden [N, D] (any leading shape), heads [D, V].
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from deepseek_v4 import train
from sharding import context as cp

# ---- advantages and rewards ------------------------------------------------------------------------------------


def group_advantages(rewards: jax.Array, valid: jax.Array, *, scale_by_std: bool = False,
                     eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Group-relative advantages.

    Args:
      rewards: [P, G] rewards of G samples for each of P prompts (any value where invalid).
      valid: [P, G] bool; False for a sample without a reward (its function raised) or a padding slot.
      scale_by_std: divide by the group's standard deviation (original GRPO); V3.2 does not.

    Returns:
      (advantages [P, G] float32, 0 where invalid or where the group has no signal; has_signal [P] bool: the group
      has a valid sample and its valid rewards are not all equal).
    """
    r = jnp.asarray(rewards, jnp.float32)
    v = jnp.asarray(valid, bool)
    n = jnp.sum(v, axis=-1, keepdims=True)
    mean = jnp.sum(jnp.where(v, r, 0.0), axis=-1, keepdims=True) / jnp.maximum(n, 1)
    centred = jnp.where(v, r - mean, 0.0)
    var = jnp.sum(centred**2, axis=-1, keepdims=True) / jnp.maximum(n, 1)
    std = jnp.sqrt(var)
    has_signal = (n[..., 0] > 0) & (std[..., 0] > eps)
    adv = centred / (std + eps) if scale_by_std else centred
    return jnp.where(has_signal[..., None] & v, adv, 0.0), has_signal


def length_penalized_rewards(rewards: jax.Array, lengths: jax.Array, mode_index: jax.Array, coef: Sequence[float],
                             max_len: Sequence[int]) -> jax.Array:
    """R - coef[mode] * min(length / max_len[mode], 1). [S] each; `mode_index` indexes `coef` / `max_len` (e.g. the
    position of the sample's mode in `chat.MODES`)."""
    if len(coef) != len(max_len) or any(m <= 0 for m in max_len) or any(c < 0 for c in coef):
        raise ValueError(f"need one coefficient >= 0 and one length > 0 per mode, got {list(coef)} and {list(max_len)}")
    c = jnp.asarray(coef, jnp.float32)[mode_index]
    m = jnp.asarray(max_len, jnp.float32)[mode_index]
    return jnp.asarray(rewards, jnp.float32) - c * jnp.minimum(jnp.asarray(lengths, jnp.float32) / m, 1.0)


def mode_length_settings(by_mode: Mapping[str, tuple[float, int]], modes: Sequence[str]) -> tuple[list, list]:
    """(coef, max_len) lists in the order of `modes` from {mode: (coef, max_len)}; one-line ValueError if one is
    missing."""
    missing = [m for m in modes if m not in by_mode]
    if missing:
        raise ValueError(f"no length penalty for mode(s) {', '.join(missing)}")
    return [float(by_mode[m][0]) for m in modes], [int(by_mode[m][1]) for m in modes]


# ---- per-token terms -------------------------------------------------------------------------------------------


def clipped_policy_objective(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, *,
                             eps_low: float = 0.2, eps_high: float = 0.2) -> jax.Array:
    """Per-token min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = exp(log_probs - old_log_probs) (to maximise).

    Shapes: log_probs, old_log_probs [S, L]; advantages [S] or [S, L] -> [S, L].
    """
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == log_probs.ndim - 1:
        adv = adv[..., None]
    ratio = jnp.exp(log_probs - old_log_probs)
    return jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)


def unbiased_kl(log_probs: jax.Array, old_log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """Per-token (pi/pi_old) * (pi_ref/pi - log(pi_ref/pi) - 1) for tokens sampled from pi_old.

    Its expectation over pi_old is KL(pi || pi_ref), and so is the expectation of its gradient (the ratio is
    differentiated too). Every argument is the log-probability of the sampled token. [S, L] -> [S, L].
    """
    log_ratio_ref = ref_log_probs - log_probs
    return jnp.exp(log_probs - old_log_probs) * (jnp.exp(log_ratio_ref) - log_ratio_ref - 1.0)


def off_policy_sequence_mask(advantages: jax.Array, log_probs: jax.Array, old_log_probs: jax.Array,
                             token_mask: jax.Array, delta: float) -> jax.Array:
    """1.0, or 0.0 for a sequence with A < 0 whose mean over its tokens of log(pi_old / pi) exceeds `delta`.

    `old_log_probs` are the sampling engine's; the statistic is computed over the whole sequence and carries no
    gradient. Shapes: advantages [S]; log_probs, old_log_probs, token_mask [S, L] -> [S] float32.
    """
    m = jnp.asarray(token_mask, jnp.float32)
    drift = jax.lax.stop_gradient(old_log_probs - log_probs)
    mean_drift = jnp.sum(drift * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jnp.where((jnp.asarray(advantages) < 0) & (mean_drift > delta), 0.0, 1.0)


def grpo_token_loss(log_probs: jax.Array, old_log_probs: jax.Array, ref_log_probs: jax.Array,
                    advantages: jax.Array, token_mask: jax.Array, *, kl_weight: float, eps_low: float = 0.2,
                    eps_high: float = 0.2, opsm_delta: float | None = None) -> jax.Array:
    """Per-token loss to minimise: -(policy term * OPSM mask) + kl_weight * unbiased KL, 0 off the mask.

    `opsm_delta=None` turns the off-policy sequence mask off. Shapes: [S, L] (advantages [S]) -> [S, L].
    """
    m = jnp.asarray(token_mask, jnp.float32)
    policy = clipped_policy_objective(log_probs, old_log_probs, advantages, eps_low=eps_low, eps_high=eps_high)
    if opsm_delta is not None:
        policy = policy * off_policy_sequence_mask(advantages, log_probs, old_log_probs, m, opsm_delta)[..., None]
    kl = unbiased_kl(log_probs, old_log_probs, ref_log_probs) if kl_weight else 0.0
    return (-policy + kl_weight * kl) * m


def aggregate(per_token: jax.Array, token_mask: jax.Array, how: str = "sequence_mean") -> jax.Array:
    """A scalar from per-token losses [S, L]: "sequence_mean" = mean over sequences of each sequence's token mean
    (GRPO's 1/G sum_i 1/|o_i| sum_t; sequences without tokens are left out), "token_mean" = mean over all tokens."""
    m = jnp.asarray(token_mask, jnp.float32)
    if how == "token_mean":
        return jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)
    if how == "sequence_mean":
        n = jnp.sum(m, axis=-1)
        per_seq = jnp.sum(per_token * m, axis=-1) / jnp.maximum(n, 1.0)
        has = (n > 0).astype(jnp.float32)
        return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)
    raise ValueError(f"unknown aggregation {how!r}; choose sequence_mean or token_mean")


def kept_token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, kept_ids: jax.Array,
                         kept_valid: jax.Array) -> jax.Array:
    """"Keep sampling mask": log pi(target) renormalised over the tokens the sampler kept (top-k / top-p) there.

    Only the K kept columns of the head are used ([N, K] logits, never [N, V]). The target must be one of the kept
    ids (it was sampled from them). Shapes: hidden [N, D], head [D, V], targets [N], kept_ids / kept_valid [N, K]
    -> [N] float32.
    """
    cols = jnp.take(head.astype(jnp.float32), kept_ids, axis=1)  # [D, N, K]
    logits = jnp.einsum("nd,dnk->nk", hidden.astype(jnp.float32), cols)
    logits = jnp.where(kept_valid, logits, -jnp.inf)
    hit = (kept_ids == targets[:, None]) & kept_valid
    return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1) - jax.nn.logsumexp(logits, axis=-1)


# ---- on-policy distillation: full-vocabulary reverse KL, chunked -------------------------------------------------


def _vocab_chunks(head: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """head [D, V] -> ([V/C, D, C] columns, [V/C, C] validity), V padded up to a multiple of C."""
    d, v = head.shape
    c = max(1, min(chunk, v))
    pad = (-v) % c
    cols = jnp.pad(head, ((0, 0), (0, pad))).reshape(d, -1, c).transpose(1, 0, 2)
    valid = (jnp.arange(v + pad) < v).reshape(-1, c)
    return cols, valid


def _one_teacher_kl(student_hidden, student_head, teacher_hidden, teacher_head, chunk):
    """KL(p_s || p_t) per token [N], one vocabulary chunk of both logits at a time (online softmax)."""
    s_cols, valid = _vocab_chunks(student_head, chunk)
    t_cols, _ = _vocab_chunks(teacher_head, chunk)
    h_s = student_hidden.astype(jnp.float32)
    h_t = jax.lax.stop_gradient(teacher_hidden.astype(jnp.float32))
    n = h_s.shape[0]

    @jax.checkpoint  # the backward recomputes a chunk's logits instead of storing them
    def body(carry, xs):
        m_s, l_s, a, m_t, l_t = carry
        sc, tc, ok = xs
        s = jnp.where(ok, h_s @ sc.astype(jnp.float32), -jnp.inf)  # [N, C]
        t = jnp.where(ok, h_t @ jax.lax.stop_gradient(tc.astype(jnp.float32)), -jnp.inf)
        new_m_s = jnp.maximum(m_s, jnp.max(s, axis=-1))
        scale = jnp.exp(m_s - new_m_s)
        e = jnp.exp(s - new_m_s[:, None])
        diff = jnp.where(ok, s - t, 0.0)
        new_m_t = jnp.maximum(m_t, jnp.max(t, axis=-1))
        l_t = l_t * jnp.exp(m_t - new_m_t) + jnp.sum(jnp.exp(t - new_m_t[:, None]), axis=-1)
        return (new_m_s, l_s * scale + jnp.sum(e, axis=-1), a * scale + jnp.sum(e * diff, axis=-1), new_m_t, l_t), None

    neg = jnp.full((n,), -jnp.inf, jnp.float32)
    zero = jnp.zeros((n,), jnp.float32)
    (m_s, l_s, a, m_t, l_t), _ = jax.lax.scan(body, (neg, zero, zero, neg, zero), (s_cols, t_cols, valid))
    # sum_v p_s (s - t) - lse_s + lse_t
    return a / l_s - (m_s + jnp.log(l_s)) + (m_t + jnp.log(l_t))


def chunked_reverse_kl(student_hidden: jax.Array, student_head: jax.Array, teachers: Sequence[tuple[jax.Array,
                       jax.Array]], weights: Sequence[float], token_mask: jax.Array, *,
                       vocab_chunk: int = 8192) -> jax.Array:
    """sum_i w_i * mean over masked tokens of KL(p_student || p_teacher_i), over the full vocabulary.

    Args:
      student_hidden: the student's final normed hidden states [..., D].
      student_head: the student's output head [D, V].
      teachers: (hidden [..., D_i], head [D_i, V]) per teacher: each teacher's last hidden states on the student's
        tokens (kept instead of its logits) and its head. No gradient reaches them.
      weights: one weight per teacher.
      token_mask: [...] 1 where a position is scored (the student's sampled tokens), 0 elsewhere.
      vocab_chunk: columns of logits per chunk; each teacher is done in turn, the student's chunk logits rebuilt
        for each (one more head matmul per teacher, no [N, V] tensor).

    Returns:
      A float32 scalar; gradients flow to the student's hidden states and head only.
    """
    if len(teachers) != len(weights) or not teachers:
        raise ValueError(f"need one weight per teacher, got {len(weights)} weights for {len(teachers)} teachers")
    d = student_hidden.shape[-1]
    h = student_hidden.reshape(-1, d)
    m = jnp.asarray(token_mask, jnp.float32).reshape(-1)
    count = jnp.maximum(jnp.sum(m), 1.0)
    total = jnp.zeros((), jnp.float32)
    for (t_hidden, t_head), w in zip(teachers, weights):
        if t_head.shape[1] != student_head.shape[1]:
            raise ValueError(f"teacher vocabulary {t_head.shape[1]} != student vocabulary {student_head.shape[1]}")
        kl = _one_teacher_kl(h, student_head, t_hidden.reshape(-1, t_hidden.shape[-1]), t_head, vocab_chunk)
        total = total + w * jnp.sum(kl * m) / count
    return total


def reference_reverse_kl(student_hidden: jax.Array, student_head: jax.Array, teachers: Sequence[tuple[jax.Array,
                         jax.Array]], weights: Sequence[float], token_mask: jax.Array) -> jax.Array:
    """`chunked_reverse_kl` computed with every [N, V] logit at once (the spec)."""
    d = student_hidden.shape[-1]
    logp_s = jax.nn.log_softmax(student_hidden.reshape(-1, d).astype(jnp.float32) @ student_head.astype(jnp.float32))
    m = jnp.asarray(token_mask, jnp.float32).reshape(-1)
    total = jnp.zeros((), jnp.float32)
    for (t_hidden, t_head), w in zip(teachers, weights):
        t_logits = t_hidden.reshape(-1, t_hidden.shape[-1]).astype(jnp.float32) @ t_head.astype(jnp.float32)
        logp_t = jax.lax.stop_gradient(jax.nn.log_softmax(t_logits))
        kl = jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
        total = total + w * jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)
    return total



# ---- per-token log-probabilities and the GRPO loss inside the shared train step ---------------------------------


def token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
    """log softmax(hidden @ head)[target] per token, one chunk of [C, V] logits at a time (rematerialised in the
    backward). Shapes: hidden [..., D], head [D, V], targets [...] -> [...] float32."""
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1).astype(jnp.int32)
    n = h.shape[0]
    c = max(1, min(chunk_size, n))
    pad = (-n) % c
    h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, c, d)
    t = jnp.pad(t, (0, pad)).reshape(-1, c)

    @jax.checkpoint
    def one(hc, tc):
        logits = hc.astype(jnp.float32) @ head.astype(jnp.float32)  # [C, V]
        return jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(lambda xs: one(*xs), (h, t))
    return out.reshape(-1)[:n].reshape(targets.shape)


def _per_sequence_mean(x: jax.Array, weights: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Each token gets the weighted mean of `x` over its (row, segment). [B, T] -> [B, T]."""
    b, t = segment_ids.shape
    ids = (jnp.arange(b)[:, None] * (t + 1) + segment_ids).reshape(-1)
    sums = jax.ops.segment_sum((x * weights).reshape(-1), ids, num_segments=b * (t + 1))
    counts = jax.ops.segment_sum(weights.reshape(-1), ids, num_segments=b * (t + 1))
    return (sums / jnp.maximum(counts, 1.0))[ids].reshape(b, t)


def masked_token_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array, kept_ids: jax.Array,
                           kept_valid: jax.Array, *, chunk_size: int = 1024) -> jax.Array:
    """`kept_token_log_probs` for a kept set as wide as the vocabulary (top-p alone: K = V): the full softmax with
    the tokens outside the set masked, one chunk of [C, V] logits at a time (rematerialised in the backward), so
    that no [N, V, D] gather of head columns is built. Shapes as `kept_token_log_probs` -> [N] float32."""
    n, d = hidden.shape
    v = head.shape[1]
    c = max(1, min(chunk_size, n))
    pad = (-n) % c

    def split(a):
        return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape((-1, c) + a.shape[1:])

    @jax.checkpoint
    def one(hc, tc, ic, vc):
        logits = hc.astype(jnp.float32) @ head.astype(jnp.float32)  # [C, V]
        rows = jnp.arange(c)[:, None]
        allowed = jnp.zeros((c, v), bool).at[rows, ic].max(vc)
        logits = jnp.where(allowed, logits, -jnp.inf)
        hit = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return jnp.where(jnp.isfinite(hit), hit, 0.0) - jax.nn.logsumexp(logits, axis=-1)

    out = jax.lax.map(lambda xs: one(*xs), (split(hidden), split(targets.astype(jnp.int32)), split(kept_ids),
                                            split(kept_valid)))
    return out.reshape(-1)[:n]


def policy_log_probs(model: Any, micro: dict[str, jax.Array], *, sparse: bool, indexer_loss: bool = False,
                     temperature: float = 1.0, chunk_size: int = 1024) -> tuple[jax.Array, Any]:
    """log pi of each target under the sampling distribution of the rollouts, and the forward's outputs.

    The logits are divided by `temperature`; with `kept_ids` / `kept_valid` [B, T, K] in `micro` ("keep sampling
    mask") the softmax runs over the kept ids only (`kept_token_log_probs`; `masked_token_log_probs` when K is
    the vocabulary, top-p alone), else over the vocabulary (`token_log_probs`). With `expert_ids` [B, T, L, K]
    in `micro` ("keep routing") the main layers use those experts. Under context parallelism the hidden states
    come in the context layout: the targets and kept sets are laid out the same way (as pretraining's loss does)
    and the log-probs are put back in natural order. Shapes: micro [B, T] -> [B, T] float32 (natural order).
    """
    replay = {} if "expert_ids" not in micro else {"expert_ids": jnp.transpose(micro["expert_ids"], (2, 0, 1, 3))}
    out = model.forward_train(micro["tokens"], micro["segment_ids"], micro["positions"], sparse_attention=sparse,
                              indexer_loss=indexer_loss, **replay)
    size = model.context_size(micro["tokens"].shape[1])
    hidden = out.hidden / temperature  # the logits are linear in the hidden state
    targets = cp.to_layout(micro["targets"], size)
    head = model.head[...]
    if "kept_ids" not in micro:
        return cp.from_layout(token_log_probs(hidden, head, targets, chunk_size=chunk_size), size), out
    b, t = targets.shape
    kept_ids = cp.to_layout(micro["kept_ids"], size).reshape(b * t, -1)
    kept_valid = cp.to_layout(micro["kept_valid"], size).reshape(b * t, -1) > 0
    # positions without a kept set (the prompt, padding: no loss) keep column 0, so that every softmax is finite
    kept_valid = kept_valid | (~jnp.any(kept_valid, axis=-1, keepdims=True) & (jnp.arange(kept_valid.shape[1]) == 0))
    args = (hidden.reshape(b * t, -1), head, targets.reshape(-1), kept_ids, kept_valid)
    if kept_ids.shape[1] >= head.shape[1]:
        logp = masked_token_log_probs(*args, chunk_size=chunk_size)
    else:
        logp = kept_token_log_probs(*args)
    return cp.from_layout(logp.reshape(b, t), size), out


def grpo_loss(model: Any, micro: dict[str, jax.Array], counts: dict[str, Any], *, s: Any, sparse: bool,
              mtp_weight: jax.Array, kl_weight: float, eps_low: float = 0.2, eps_high: float = 0.2,
              opsm_delta: float | None = None, temperature: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO objective as a `train.LossFn` (bind the keywords with functools.partial): packed rollouts in the
    batch format, one sequence per segment, plus per-token float32 fields:

      loss_weights   1 on the completion's tokens (targets the policy sampled), 0 on the prompt and padding
      advantages     the sequence's advantage on each of its tokens
      old_log_probs  log pi_old of each target (the sampling engine's)
      ref_log_probs  log pi_ref of each target (the reference model's)

    and optionally the rollout's sampling mask (`kept_ids`, `kept_valid`) and routing (`expert_ids`), used as
    `policy_log_probs` says; `temperature` is the sampler's.
    The per-token loss (`grpo_token_loss`, OPSM per (row, segment)) is averaged over the completion tokens of the
    whole batch (token mean: microbatches add up); balance and indexer terms as in pretraining, no MTP term.
    """
    del mtp_weight
    logp, out = policy_log_probs(model, micro, sparse=sparse, indexer_loss=s.indexer_weight > 0,
                                 temperature=temperature, chunk_size=s.loss_chunk)
    mask = jnp.where(micro["segment_ids"] != 0, micro["loss_weights"].astype(jnp.float32), 0.0)
    # off the mask the terms are multiplied by 0: ratio 1 and KL 0 there keep them finite
    on_policy = jax.lax.stop_gradient(logp)
    old = jnp.where(mask > 0, micro["old_log_probs"], on_policy)
    ref = jnp.where(mask > 0, micro["ref_log_probs"], on_policy)
    adv = micro["advantages"]
    ratio = jnp.exp(logp - old)
    policy = clipped_policy_objective(logp, old, adv, eps_low=eps_low, eps_high=eps_high)
    if opsm_delta is not None:
        drift = _per_sequence_mean(jax.lax.stop_gradient(old - logp), mask, micro["segment_ids"])
        policy = policy * jnp.where((adv < 0) & (drift > opsm_delta), 0.0, 1.0)
    kl = unbiased_kl(logp, old, ref)
    per_token = (-policy + kl_weight * kl) * mask
    pg = jnp.sum(per_token) / counts["tokens"]
    a = s.grad_accum
    total = pg + (s.balance_weight * out.balance_loss + s.indexer_weight * out.indexer_loss) / a
    aux = {
        "loss": pg,
        "mtp_loss": jnp.zeros((), jnp.float32),
        **train.model_aux(out, a),
        "kl": jnp.sum(kl * mask) / counts["tokens"],
        "clipped_fraction": jnp.sum(((ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)) * mask) / counts["tokens"],
    }
    return total, aux


def make_grpo_loss(kl_weight: float, *, eps_low: float = 0.2, eps_high: float = 0.2,
                   opsm_delta: float | None = None, temperature: float = 1.0):
    """`grpo_loss` with its hyper-parameters bound: pass it as `train.make_train_step(..., loss_fn=...)`."""
    return functools.partial(grpo_loss, kl_weight=kl_weight, eps_low=eps_low, eps_high=eps_high,
                             opsm_delta=opsm_delta, temperature=temperature)
