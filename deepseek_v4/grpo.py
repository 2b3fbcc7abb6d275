"""The GRPO loop's data side: prompts -> grouped rollouts -> rewards -> a training batch (docs/training.md).

Each step (`RolloutSource.__next__`): draw the step's prompts from the task (a generator seeded by (seed, step)),
sample `group_size` completions per prompt with the current policy (`deepseek_v4.rollout`, one key per
(seed, step, prompt, sample)), score them (`verifiable_tasks.score_group`: a reward function that raises is a
counted skip), subtract the per-mode length penalty, take group-relative advantages and lay the rollouts out one
sequence per row in the batch format `post_training_losses.grpo_loss` reads:

  tokens / targets / segment_ids / positions   prompt + completion, shifted by one; 0 past the sequence
  loss_weights    1 on the completion's tokens of a sample that has a reward in a group that was not skipped
  advantages      the sample's advantage on each of its tokens
  old_log_probs   the sampler's log-probabilities (rollout.py)
  ref_log_probs   the reference model's (a frozen copy of the initial weights, `reference_fn`)
  kept_ids, kept_valid [B, T, K]   the sampling mask (when the sampler cut anything and keep_sampling_mask)
  expert_ids [B, T, L, K]          the rollout's routing (keep_routing)

A group is skipped (its rows carry no loss, counted in `skipped_groups`) when its prompt does not fit --seq_len
with --max_new_tokens or when none of its samples got a reward; a sample whose reward function raised is counted
in `skipped_samples`. The iterator's state is only the step: rollouts are not saved, they are regenerated from
(seed, step) and the restored weights on resume, which gives the same batch as the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from deepseek_v4 import chat, post_training_losses, rollout, verifiable_tasks
from deepseek_v4.tokenizer import get_tokenizer
from deepseek_v4.config import setting

# A reward function: (problem, completion text after the generation prompt (EOS included), mode) -> float.
RewardFn = Callable[[verifiable_tasks.Problem, str, str], float]


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """What GRPO adds to pretraining's flags (one flag per field, experiments/grpo.py)."""

    init: str | None = setting(None, "Run directory (pretrain / SFT / GRPO) to start from (its newest checkpoint).")
    hf_dir: str | None = setting(None, "Exported safetensors directory to start from (instead of --init).")
    task: str = setting("arithmetic", "Verifiable task of the prompts.", choices=verifiable_tasks.TASKS)
    mode: str = setting("non-think", "Chat mode of the prompts (reasoning effort).", choices=chat.MODES)
    prompts_per_step: int = setting(8, "Prompts per step (each one a group).")
    group_size: int = setting(4, "Completions sampled per prompt.")
    max_new_tokens: int = setting(32, "Completion budget in tokens.")
    temperature: float = setting(1.0, "Sampling temperature (the loss uses the same).")
    top_p: float = setting(1.0, "Nucleus sampling mass (1: off).")
    top_k: int = setting(0, "Top-k sampling (0: off); bounds the stored sampling mask.")
    kl_weight: float = setting(0.01, "Weight of the unbiased KL to the reference model.")
    eps_low: float = setting(0.2, "Clip range below 1 of the policy ratio.")
    eps_high: float = setting(0.2, "Clip range above 1 of the policy ratio.")
    opsm_delta: float | None = setting(None, "Off-policy sequence masking threshold on mean log(pi_old / pi) "
                                       "(unset: off).")
    scale_by_std: bool = setting(False, "Divide advantages by the group's reward std (original GRPO).")
    keep_routing: bool = setting(True, "Train with the rollout's expert routing.")
    keep_sampling_mask: bool = setting(True, "Train on the sampler's top-k / top-p set (renormalised).")
    length_penalty: tuple[float, ...] = setting((0.0, 0.0, 0.0), "Length penalty coefficient per mode "
                                                "(non-think, think-high, think-max).")
    length_budget: tuple[int, ...] | None = setting(None, "Length (tokens) at which each mode's penalty is full "
                                                    "(unset: --max_new_tokens for every mode).")

    def __post_init__(self):
        if self.init and self.hf_dir:
            raise ValueError("give --init or --hf_dir, not both")
        for name in ("prompts_per_step", "group_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError(f"need --temperature > 0, 0 < --top_p <= 1, --top_k >= 0; got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")
        if self.kl_weight < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("--kl_weight, --eps_low and --eps_high must be >= 0")
        if self.task not in verifiable_tasks.TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(verifiable_tasks.TASKS)}")
        if self.mode not in chat.MODES:
            raise ValueError(f"unknown chat mode {self.mode!r}; choose one of {', '.join(chat.MODES)}")
        post_training_losses.length_penalized_rewards(np.zeros(1), np.zeros(1), np.zeros(1, np.int32),
                                                      self.length_penalty, self.budgets)  # validates

    @property
    def budgets(self) -> tuple[int, ...]:
        return self.length_budget or (self.max_new_tokens,) * len(chat.MODES)

    def loss_fn(self):
        """The `train.LossFn` of these settings."""
        return post_training_losses.make_grpo_loss(self.kl_weight, eps_low=self.eps_low, eps_high=self.eps_high,
                                                   opsm_delta=self.opsm_delta, temperature=self.temperature)


def default_reward(problem: verifiable_tasks.Problem, completion: str, mode: str) -> float:
    """The task's exact-answer reward (`verifiable_tasks.answer_reward`)."""
    return verifiable_tasks.answer_reward(problem.answer, completion, mode)


def step_problems(task: str, count: int, seed: int, step: int) -> list[verifiable_tasks.Problem]:
    """The `count` problems of `step`: a function of (task, seed, step) only."""
    rng = np.random.default_rng([seed, step])
    return [verifiable_tasks.make_problem(task, rng) for _ in range(count)]


@dataclasses.dataclass
class StepStats:
    """Host-side statistics of one step's rollouts, kept as sums and counts so that the shares of several
    processes add up exactly (`totals` / `from_totals`); the metrics record averages the steps' `record()`."""

    reward_sum: float  # the task reward (before the length penalty) over samples that have one
    reward_sq_sum: float
    rewarded: int  # samples with a reward
    length_sum: float  # completion tokens over the samples of groups whose prompt fits
    sampled: int  # samples of groups whose prompt fits
    kept: int  # samples that carry a loss: rewarded, in a group that was not skipped
    rows: int  # samples (rows of the batch)
    signal: int  # groups whose rewards differ (nonzero advantages), not skipped
    groups: int
    skipped_groups: int
    skipped_samples: int
    errors: list[str]

    _SUMS = ("reward_sum", "reward_sq_sum", "rewarded", "length_sum", "sampled", "kept", "rows", "signal", "groups",
             "skipped_groups", "skipped_samples")

    def totals(self) -> np.ndarray:
        """The sums and counts as one float64 vector (what processes add up)."""
        return np.asarray([getattr(self, k) for k in self._SUMS], np.float64)

    @classmethod
    def from_totals(cls, totals: np.ndarray) -> StepStats:
        return cls(**{k: float(v) for k, v in zip(cls._SUMS, totals)}, errors=[])

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rewarded if self.rewarded else 0.0

    @property
    def reward_std(self) -> float:
        if not self.rewarded:
            return 0.0
        return float(np.sqrt(max(self.reward_sq_sum / self.rewarded - self.mean_reward ** 2, 0.0)))

    @property
    def mean_length(self) -> float:
        return self.length_sum / self.sampled if self.sampled else 0.0

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.rows if self.rows else 0.0

    @property
    def signal_groups(self) -> float:  # fraction of groups whose rewards differ
        return self.signal / self.groups if self.groups else 0.0

    def record(self) -> dict[str, float]:
        return {"mean_reward": self.mean_reward, "reward_std": self.reward_std, "completion_length": self.mean_length,
                "kept_fraction": self.kept_fraction, "signal_groups": self.signal_groups,
                "skipped_groups": float(self.skipped_groups), "skipped_samples": float(self.skipped_samples)}


def record_over_processes(stats: list[StepStats]) -> dict[str, float]:
    """The metrics record of the logged steps `stats` over every process: each process holds the rollouts of its own
    prompts, so their sums and counts are gathered and added before the ratios are formed (a collective: every
    process calls it at the same steps). The record is the mean of the steps' records."""
    totals = np.stack([s.totals() for s in stats])
    if jax.process_count() > 1:
        totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
    recs = [StepStats.from_totals(t).record() for t in totals]
    return {k: float(np.mean([r[k] for r in recs])) for k in recs[0]}


def build_batch(g: GRPOSettings, seq_len: int, problems: list[verifiable_tasks.Problem], prompts: list[list[int]],
                rollouts: rollout.Rollouts | None, fits: np.ndarray, reward_fn: RewardFn
                ) -> tuple[dict[str, np.ndarray], StepStats]:
    """Scores the rollouts and lays them out (see the module docstring). `prompts` / `rollouts` hold the groups
    whose prompt fits (`fits` [P] bool), G consecutive sequences each; rows of the other groups are padding."""
    n_groups, size = len(problems), g.group_size
    rows = n_groups * size
    tok = get_tokenizer()
    rewards = np.zeros((n_groups, size), np.float32)
    valid = np.zeros((n_groups, size), bool)
    lengths = np.zeros((n_groups, size), np.int32)
    errors: list[str] = []
    at = 0
    for p in np.nonzero(fits)[0]:
        texts = [tok.decode(c) for c in rollouts.completions[at: at + size]]
        lengths[p] = [len(c) for c in rollouts.completions[at: at + size]]
        scored = verifiable_tasks.score_group(lambda text, prob=problems[p]: reward_fn(prob, text, g.mode), texts)
        rewards[p], valid[p] = scored.rewards, scored.valid
        errors += [f"prompt {p} {e}" for e in scored.errors]
        at += size
    mode_index = np.full(rows, chat.MODES.index(g.mode), np.int32)
    shaped = np.asarray(post_training_losses.length_penalized_rewards(
        rewards.reshape(-1), lengths.reshape(-1), mode_index, g.length_penalty, g.budgets)).reshape(n_groups, size)
    adv, signal = post_training_losses.group_advantages(shaped, valid, scale_by_std=g.scale_by_std)
    adv, signal = np.asarray(adv), np.asarray(signal)
    group_ok = fits & valid.any(axis=1)
    batch = {k: np.zeros((rows, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    batch |= {k: np.zeros((rows, seq_len), np.float32)
              for k in ("loss_weights", "advantages", "old_log_probs", "ref_log_probs")}
    with_mask = g.keep_sampling_mask and rollouts is not None and rollouts.kept_ids[0].shape[1] > 0
    if with_mask:
        kept = rollouts.kept_ids[0].shape[1]
        batch["kept_ids"] = np.zeros((rows, seq_len, kept), np.int32)
        batch["kept_valid"] = np.zeros((rows, seq_len, kept), np.float32)
    if g.keep_routing and rollouts is not None:
        layers, _, k = rollouts.expert_ids[0].shape
        batch["expert_ids"] = np.zeros((rows, seq_len, layers, k), np.int32)
    at = 0
    for p in np.nonzero(fits)[0]:
        for j in range(size):
            r, prompt, comp = p * size + j, prompts[at], rollouts.completions[at]
            seq = np.asarray(prompt + comp, np.int32)
            t, start = len(seq) - 1, len(prompt) - 1  # inputs; the first target that is a completion token
            batch["tokens"][r, :t], batch["targets"][r, :t] = seq[:-1], seq[1:]
            batch["segment_ids"][r, :t], batch["positions"][r, :t] = 1, np.arange(t)
            if group_ok[p] and valid[p, j]:
                batch["loss_weights"][r, start:t] = 1.0
            batch["advantages"][r, :t] = adv[p, j]
            batch["old_log_probs"][r, start:t] = rollouts.log_probs[at]
            if with_mask:
                batch["kept_ids"][r, start:t] = rollouts.kept_ids[at]
                batch["kept_valid"][r, start:t] = rollouts.kept_valid[at]
            if "expert_ids" in batch:
                batch["expert_ids"][r, :t] = np.transpose(rollouts.expert_ids[at], (1, 0, 2))
            at += 1
    has = valid & group_ok[:, None]
    stats = StepStats(
        reward_sum=float(rewards[valid].sum(dtype=np.float64)),
        reward_sq_sum=float((rewards[valid].astype(np.float64) ** 2).sum()),
        rewarded=int(valid.sum()),
        length_sum=float(lengths[fits].sum()),
        sampled=int(fits.sum()) * size,
        kept=int(has.sum()),
        rows=rows,
        signal=int(np.sum(signal & group_ok)),
        groups=n_groups,
        skipped_groups=int(np.sum(~group_ok)),
        skipped_samples=int(np.sum(~valid[fits])),
        errors=errors)
    return batch, stats


class RolloutSource:
    """The GRPO data iterator: `next()` is one step's batch, built with the current policy.

    Args:
      g: the GRPO settings. seq_len: row length. seed: the run's seed.
      policy: returns the current policy model (the trainer's latest weights).
      reference_fn: batch -> ref_log_probs [B, T] float32 (the frozen reference model).
      reward_fn: `RewardFn` (default: the task's exact answer).
      process_index / process_count: this process takes the prompts p with p % count == index.
    """

    def __init__(self, g: GRPOSettings, seq_len: int, seed: int, policy: Callable[[], Any],
                 reference_fn: Callable[[dict[str, np.ndarray]], np.ndarray], reward_fn: RewardFn = default_reward,
                 process_index: int = 0, process_count: int = 1):
        if g.prompts_per_step % process_count:
            raise ValueError(f"--prompts_per_step ({g.prompts_per_step}) must be divisible by the process count "
                             f"({process_count})")
        self.g, self.seq_len, self.seed = g, seq_len, seed
        self.policy, self.reference_fn, self.reward_fn = policy, reference_fn, reward_fn
        self.process_index, self.process_count = process_index, process_count
        self.step = 0
        self.stats: dict[int, StepStats] = {}  # by step (1-based: the step the batch is trained in)

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        g, step = self.g, self.step
        problems = step_problems(g.task, g.prompts_per_step, self.seed, step)
        mine = list(range(self.process_index, g.prompts_per_step, self.process_count))
        problems = [problems[p] for p in mine]
        encoded = [chat.token_ids(verifiable_tasks.prompt_messages(p), g.mode).tolist() for p in problems]
        fits = np.asarray([len(e) + g.max_new_tokens - 1 <= self.seq_len for e in encoded])
        prompts, keys = [], []
        for p, e in zip(np.nonzero(fits)[0], [e for e, f in zip(encoded, fits) if f]):
            for j in range(g.group_size):
                prompts.append(e)
                keys.append(rollout.sequence_key(self.seed, step, mine[p], j))
        rollouts = None
        if prompts:
            rollouts = rollout.sample_rollouts(self.policy(), prompts, np.stack(keys),
                                               max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                               top_p=g.top_p, top_k=g.top_k)
        batch, stats = build_batch(g, self.seq_len, problems, prompts, rollouts, fits, self.reward_fn)
        batch["ref_log_probs"] = np.asarray(self.reference_fn(batch), np.float32) * (batch["loss_weights"] > 0)
        self.step += 1
        self.stats[self.step] = stats
        return batch

    def pop_stats(self, up_to: int) -> list[StepStats]:
        """The stats of the steps <= `up_to` not taken yet, oldest first."""
        done = sorted(s for s in self.stats if s <= up_to)
        return [self.stats.pop(s) for s in done]


def make_reference_fn(graphdef: Any, params: Any, extras: Any, g: GRPOSettings, chunk_size: int = 1024):
    """batch -> the reference model's log-probs [B, T] of the targets (its own routing; the rollout's sampling
    mask and temperature, as the policy's). `params` / `extras` are the frozen initial weights."""

    @jax.jit
    def fn(params, extras, batch):
        model = nnx.merge(graphdef, params, extras)
        micro = {k: v for k, v in batch.items() if k != "expert_ids"}
        return post_training_losses.policy_log_probs(model, micro, sparse=True, temperature=g.temperature,
                                                     chunk_size=chunk_size)[0]

    def reference(batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(fn(params, extras, batch))

    return reference


def task_reward(model: Any, g: GRPOSettings, *, problems: int, samples: int = 1, seed: int = 0,
                reward_fn: RewardFn = default_reward) -> float:
    """Mean reward of `model` on `problems` problems of `g.task` (drawn from `seed`, not from a training step's
    generator), `samples` completions each with g's sampling settings: the before / after measure of a run."""
    rng = np.random.default_rng([seed, 1 << 30])
    drawn = [verifiable_tasks.make_problem(g.task, rng) for _ in range(problems)]
    encoded = [chat.token_ids(verifiable_tasks.prompt_messages(p), g.mode).tolist() for p in drawn]
    prompts = [e for e in encoded for _ in range(samples)]
    keys = np.stack([rollout.sequence_key(seed, 1 << 30, i, j) for i in range(problems) for j in range(samples)])
    out = rollout.sample_rollouts(model, prompts, keys, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                  top_p=g.top_p, top_k=g.top_k)
    tok = get_tokenizer()
    scores = [verifiable_tasks.score_group(lambda text, p=p: reward_fn(p, text, g.mode),
                                           [tok.decode(c) for c in out.completions[i * samples: (i + 1) * samples]])
              for i, p in enumerate(drawn)]
    return float(np.mean(np.concatenate([s.rewards for s in scores])))
