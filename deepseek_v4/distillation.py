"""On-policy distillation: the student samples, each teacher scores the student's tokens, and the loss is the
weighted full-vocabulary reverse KL on the sampled tokens (docs/training.md, "On-policy distillation").

    teachers = [Teacher("a", model_a), Teacher("b", model_b)]
    rollouts = RolloutIterator(lambda: student, TaskPrompts(("arithmetic", "string"), ("non-think",)), teachers,
                               rows=8, seq_len=256, max_new_tokens=32, seed=0,
                               teacher_tasks=("arithmetic", "string"))   # optional: each row to its task's teacher
    step = make_distill_step(graphdef, cfg, tx, s, phase="sparse", teacher_heads=[t.head for t in teachers],
                             weights=(0.5, 0.5))
    state, metrics = step(state, next(rollouts))        # metrics["kl_teacher_0"], metrics["kl_teacher_1"]

One step, per rollout batch:
  1. the student (the train state's current weights) samples one completion per prompt with the inference engine
     (`inference.generate`, the compressed KV cache), seeded by (seed, step, process);
  2. each row of the batch is prompt + completion; `loss_weights` is 1 on the targets the student sampled;
     `teacher_mask` [B, T, n_teachers] is 1 where teacher i scores the row: every teacher scores every row, or,
     routed by task (`teacher_tasks`), only the teacher of the row's task does;
  3. each teacher runs its training forward over the rows and keeps only its last hidden states [B, T, D_i]
     (never its logits), which travel in the batch as `teacher_hidden_<i>`;
  4. inside the shared train step (`train.train_step` with `distill_loss` as its `LossFn`), the student's forward
     gives its last hidden states, and `post_training_losses.chunked_reverse_kl` rebuilds both logits one
     vocabulary chunk at a time, one teacher after another: no [T, V] tensor exists, for any teacher.

The teachers run outside the train step (steps 1-3 are the data source): their weights are not part of the train
state (never checkpointed, never differentiated), a teacher may have another width or depth than the student
(only the vocabulary must match), and each teacher's forward is compiled once, apart from the student's step.
The price is one [B, T, D_i] float32 array per teacher in the batch, small next to the [B, T, V] logits it
replaces. The teachers' heads [D_i, V] are arguments of the jitted step (not constants baked into it).

The loss is sum over the batch's sampled tokens of sum_i w_i * mask_i * KL(p_student || p_i), divided by the
number of sampled tokens of the whole batch (mask_i: `teacher_mask`; all ones without routing, where it is
sum_i w_i * mean KL_i); there is no MTP term; the balance and indexer terms are pretraining's.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import chat, inference, sft_data, train, verifiable_tasks
from deepseek_v4 import post_training_losses as ptl
from deepseek_v4.iterator_state import SettingsCheckedState
from sharding import context as cp

DEFAULT_VOCAB_CHUNK = 8192


def teacher_hidden_key(i: int) -> str:
    """The batch field holding teacher i's last hidden states [B, T, D_i]."""
    return f"teacher_hidden_{i}"


TEACHER_MASK = "teacher_mask"  # batch field [B, T, n_teachers]: 1 where teacher i scores the token's row


def kl_metric(i: int) -> str:
    """The step metric of teacher i's KL: its mean over the tokens teacher i scores (its weight not applied)."""
    return f"kl_teacher_{i}"


# ---- checks ----------------------------------------------------------------------------------------------------


def check_weights(weights: Sequence[float], n_teachers: int) -> tuple[float, ...]:
    """The teachers' weights as a tuple; one-line ValueError for a count mismatch, a negative or non-finite weight,
    or weights that sum to 0."""
    weights = tuple(float(w) for w in weights)
    if len(weights) != n_teachers:
        raise ValueError(f"--weights has {len(weights)} value(s) for {n_teachers} teacher(s); give one per teacher")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"--weights must be finite and >= 0, got {','.join(str(w) for w in weights)}")
    if sum(weights) == 0:
        raise ValueError("--weights sum to 0: at least one teacher needs a positive weight")
    return weights


def check_teacher_tasks(teacher_tasks: Sequence[str], n_teachers: int, tasks: Sequence[str]) -> tuple[str, ...]:
    """The teachers' tasks (one per teacher, in the teachers' order) as a tuple; one-line ValueError for a count
    mismatch, an unknown task or a task the prompts are not drawn from."""
    teacher_tasks = tuple(teacher_tasks)
    if len(teacher_tasks) != n_teachers:
        raise ValueError(f"--teacher_tasks has {len(teacher_tasks)} task(s) for {n_teachers} teacher(s); give one "
                         "per teacher")
    for t in teacher_tasks:
        if t not in verifiable_tasks.TASKS:
            raise ValueError(f"unknown task {t!r} in --teacher_tasks; choose from {', '.join(verifiable_tasks.TASKS)}")
        if t not in tasks:
            raise ValueError(f"--teacher_tasks names {t!r}, which is not in --tasks={','.join(tasks)}")
    return teacher_tasks


def teacher_mask(row_tasks: Sequence[str], teacher_tasks: Sequence[str] | None, n_teachers: int,
                 seq_len: int) -> np.ndarray:
    """The `teacher_mask` field [rows, seq_len, n_teachers] float32: without routing (`teacher_tasks` None) all
    ones; routed, 1 for teacher i on the rows whose task is teacher i's task."""
    if teacher_tasks is None:
        rows = np.ones((len(row_tasks), n_teachers), np.float32)
    else:
        rows = np.asarray([[float(task == t) for t in teacher_tasks] for task in row_tasks], np.float32)
    return np.repeat(rows[:, None, :], seq_len, axis=1).reshape(len(row_tasks), seq_len, n_teachers)


def teacher_token_counts(batch: dict[str, jax.Array]) -> jax.Array:
    """Per teacher, the loss-carrying tokens of `batch` it scores, at least 1 [n_teachers] (the denominators of
    the `kl_teacher_<i>` metrics)."""
    scored = (train.token_weights(batch) != 0)[..., None] & (batch[TEACHER_MASK] > 0)
    return jnp.maximum(jnp.sum(scored.astype(jnp.float32), axis=(0, 1)), 1.0)


def check_vocabularies(student_vocab: int, teacher_vocabs: dict[str, int]) -> None:
    """One-line ValueError if a teacher's vocabulary is not the student's (the KL is over the same tokens)."""
    for name, vocab in teacher_vocabs.items():
        if vocab != student_vocab:
            raise ValueError(f"teacher {name} has a vocabulary of {vocab} tokens, the student {student_vocab}: "
                             "a teacher must have the student's vocabulary")


# ---- the loss inside the shared train step ------------------------------------------------------------------------


def distill_loss(model: Any, micro: dict[str, jax.Array], counts: dict[str, Any], *, s: Any, sparse: bool,
                 mtp_weight: jax.Array, teacher_heads: Sequence[jax.Array], weights: Sequence[float],
                 vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
                 teacher_counts: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The distillation objective as a `train.LossFn`: the sum over the tokens of nonzero `loss_weights` of
    sum_i w_i * teacher_mask_i * KL(p_student || p_teacher_i), divided by the whole batch's count of those tokens
    (microbatches add up), plus the balance and indexer terms.

    The microbatch carries `teacher_hidden_<i>` [b, T, D_i] per teacher and `teacher_mask` [b, T, n_teachers];
    `teacher_heads[i]` is [D_i, V]. Teacher i's mean KL over the tokens it scores is the metric `kl_teacher_<i>`;
    `teacher_counts` [n_teachers] are the whole batch's counts of those tokens (`teacher_token_counts`; default:
    this microbatch's, right without gradient accumulation).
    """
    del mtp_weight  # no MTP term in distillation
    tokens = micro["tokens"]
    out = model.forward_train(tokens, micro["segment_ids"], micro["positions"], sparse_attention=sparse,
                              indexer_loss=s.indexer_weight > 0)
    size = model.context_size(tokens.shape[1])  # hidden states come in the context layout: the rest follows
    mask = cp.to_layout(train.token_weights(micro), size)
    routed = cp.to_layout(micro[TEACHER_MASK], size)  # [b, T, n_teachers], 0 or 1
    if teacher_counts is None:
        teacher_counts = teacher_token_counts(micro)
    head = model.head[...]
    kls = {}
    loss = jnp.zeros((), jnp.float32)
    for i, (t_head, w) in enumerate(zip(teacher_heads, weights)):
        t_hidden = cp.to_layout(micro[teacher_hidden_key(i)], size)
        scored = mask * routed[..., i]
        # chunked_reverse_kl averages over the mask's weight: times that weight, the sum over the scored tokens
        kl_sum = ptl.chunked_reverse_kl(out.hidden, head, [(t_hidden, t_head)], [1.0], scored,
                                        vocab_chunk=vocab_chunk) * jnp.maximum(jnp.sum(scored), 1.0)
        kls[kl_metric(i)] = kl_sum / teacher_counts[i]
        loss = loss + w * kl_sum / counts["tokens"]
    a = s.grad_accum
    total = loss + (s.balance_weight * out.balance_loss + s.indexer_weight * out.indexer_loss) / a
    return total, {"loss": loss, "mtp_loss": jnp.zeros((), jnp.float32), **train.model_aux(out, a), **kls}


def make_distill_step(graphdef: nnx.GraphDef, cfg: Any, tx: Any, s: train.TrainSettings, *, phase: str,
                      teacher_heads: Sequence[jax.Array], weights: Sequence[float],
                      vocab_chunk: int = DEFAULT_VOCAB_CHUNK) -> Callable[..., tuple[train.TrainState, dict]]:
    """`train.make_train_step`'s step with `distill_loss` plugged in: `step(state, batch[, loss_limit])`.

    The same `train.train_step` (accumulation, clipping, optimizer, router biases, non-finite guard); the teachers'
    heads are passed to the jitted function as arguments rather than closed over (no head-sized constants in the
    compiled step). A `run_lib.StepBuilder` once the keywords are bound.
    """
    if phase not in train.PHASES:
        raise ValueError(f"phase must be one of {', '.join(train.PHASES)}, got {phase!r}")
    train.check_settings_for_config(s, cfg)
    weights = tuple(float(w) for w in weights)
    if len(weights) != len(teacher_heads):
        raise ValueError(f"need one weight per teacher, got {len(weights)} for {len(teacher_heads)}")

    def step(state, batch, heads, *loss_limit):
        loss_fn = functools.partial(distill_loss, teacher_heads=heads, weights=weights, vocab_chunk=vocab_chunk,
                                    teacher_counts=teacher_token_counts(batch))
        return train.train_step(state, batch, *loss_limit, graphdef=graphdef, cfg=cfg, tx=tx, s=s, phase=phase,
                                loss_fn=loss_fn)

    jitted = jax.jit(step, donate_argnums=(0,))
    heads = tuple(teacher_heads)
    return lambda state, batch, *loss_limit: jitted(state, batch, heads, *loss_limit)


# ---- teachers --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _hidden_fn(graphdef: nnx.GraphDef, sparse_attention: bool):
    def hidden(state, tokens, segment_ids, positions):
        model = nnx.merge(graphdef, state)
        out = model.forward_train(tokens, segment_ids, positions, sparse_attention=sparse_attention)
        return cp.from_layout(out.hidden, model.context_size(tokens.shape[1])).astype(jnp.float32)

    return jax.jit(hidden)


class Teacher:
    """A frozen teacher model: its last hidden states on a batch, and its head."""

    def __init__(self, name: str, model: Any, *, sparse_attention: bool = True):
        self.name, self.cfg = name, model.cfg
        graphdef, self._state = nnx.split(model)
        self.head = model.head[...]
        self._forward = _hidden_fn(graphdef, sparse_attention)

    def hidden(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The teacher's final normed hidden states on the batch's rows. [B, T] -> [B, T, D] float32."""
        return np.asarray(self._forward(self._state, batch["tokens"], batch["segment_ids"], batch["positions"]))


# ---- prompts ---------------------------------------------------------------------------------------------------


class TaskPrompts:
    """Prompts of the seeded verifiable tasks (`verifiable_tasks`): task and mode drawn per prompt."""

    def __init__(self, tasks: Sequence[str], modes: Sequence[str]):
        if not tasks or not modes:
            raise ValueError("need at least one task and one mode")
        for t in tasks:
            verifiable_tasks.make_problem(t, np.random.default_rng(0))  # one-line error for an unknown task
        for m in modes:
            if m not in chat.MODES:
                raise ValueError(f"unknown chat mode {m!r}; choose one of {', '.join(chat.MODES)}")
        self.tasks, self.modes = tuple(tasks), tuple(modes)
        self.fingerprint = f"tasks={','.join(self.tasks)};modes={','.join(self.modes)}"

    def draw(self, n: int, rng: np.random.Generator) -> list[list[int]]:
        return self.draw_with_tasks(n, rng)[0]

    def draw_with_tasks(self, n: int, rng: np.random.Generator) -> tuple[list[list[int]], list[str]]:
        """`n` prompts and the task of each (the same draws as `draw`)."""
        prompts, tasks = [], []
        for _ in range(n):
            task = self.tasks[int(rng.integers(len(self.tasks)))]
            problem = verifiable_tasks.make_problem(task, rng)
            mode = self.modes[int(rng.integers(len(self.modes)))]
            prompts.append(chat.token_ids(verifiable_tasks.prompt_messages(problem), mode).tolist())
            tasks.append(task)
        return prompts, tasks

    def longest(self, samples: int = 256) -> int:
        """The longest prompt among `samples` draws (a check of --seq_len before the run starts)."""
        return max(len(p) for p in self.draw(samples, np.random.default_rng(0)))


class ChatPrompts:
    """Prompts from chat examples: each conversation up to its last assistant turn, encoded with the generation
    prompt. Examples that do not encode, or are longer than `max_len` tokens, are skipped and counted."""

    def __init__(self, examples: Sequence[dict[str, Any]], max_len: int, skipped: sft_data.Skipped | None = None):
        self.skipped = skipped or sft_data.Skipped()
        self.prompts = []
        for i, ex in enumerate(examples):
            where = ex.get("_where", f"example {i}") if isinstance(ex, dict) else f"example {i}"
            try:
                messages, mode = sft_data.check_example(ex)
                last = max(k for k, m in enumerate(messages) if m.get("role") == "assistant")
                ids = chat.token_ids(messages[:last], mode)
            except ValueError as e:  # BadExample or the chat module's one-line errors
                self.skipped.add(sft_data._reason(str(e)), f"{where}: {e}")
                continue
            if len(ids) > max_len:
                self.skipped.add("prompt too long for --seq_len and --max_new_tokens", where)
                continue
            self.prompts.append(ids.tolist())
        if not self.prompts:
            raise ValueError(f"no usable prompt: {self.skipped.summary()}")
        digest = hashlib.sha256(np.concatenate([np.asarray(p + [-1], np.int64) for p in self.prompts]).tobytes())
        self.fingerprint = f"prompts={len(self.prompts)}:{digest.hexdigest()[:16]}"

    def draw(self, n: int, rng: np.random.Generator) -> list[list[int]]:
        return [self.prompts[int(i)] for i in rng.integers(len(self.prompts), size=n)]

    def longest(self, samples: int = 0) -> int:
        del samples
        return max(len(p) for p in self.prompts)


# ---- rollouts --------------------------------------------------------------------------------------------------


def rollout_batch(student: Any, prompts: Sequence[Sequence[int]], *, seq_len: int, max_new_tokens: int, seed: int,
                  temperature: float = inference.DEFAULT_TEMPERATURE, top_p: float = inference.DEFAULT_TOP_P,
                  top_k: int = 0) -> tuple[dict[str, np.ndarray], list[list[int]]]:
    """The student's sampled completions of `prompts`, one row each: (batch [len(prompts), seq_len] in the batch
    format with `loss_weights` 1 on the completion's targets, the completions' token ids)."""
    too_long = [len(p) for p in prompts if len(p) + max_new_tokens - 1 > seq_len]
    if too_long:
        raise ValueError(f"a prompt of {max(too_long)} tokens plus --max_new_tokens={max_new_tokens} does not fit "
                         f"--seq_len={seq_len}")
    new = inference.generate(student, [list(p) for p in prompts], max_new_tokens, greedy=False,
                             temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    batch = sft_data.empty_rows(len(prompts), seq_len)
    for row, (prompt, completion) in enumerate(zip(prompts, new)):
        ids = np.asarray(list(prompt) + list(completion), np.int32)
        mask = np.zeros(len(ids), np.float32)
        mask[len(prompt):] = 1.0
        sft_data.place(batch, row, 0, 1, sft_data.to_document(ids, mask))
    return batch, new


class RolloutIterator(SettingsCheckedState):
    """The distillation data source: each batch is the student's rollouts on freshly drawn prompts plus every
    teacher's hidden states on them and the `teacher_mask` of which teacher scores which row (`teacher_tasks`, one
    task per teacher, routes each task prompt to its task's teacher; None: every teacher scores every row). Prompts
    and sampling are seeded by (seed, batch index, process), so the state (JSON) is the batch index; restoring it
    continues the same sequence of prompts and sampling keys (refused under other prompts or settings:
    `iterator_state.SettingsCheckedState`)."""

    resume_error = "cannot resume the distillation rollouts under different settings ({detail})"

    def __init__(self, policy: Callable[[], Any], prompts: TaskPrompts | ChatPrompts, teachers: Sequence[Teacher], *,
                 rows: int, seq_len: int, max_new_tokens: int, seed: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, process_index: int = 0, process_count: int = 1,
                 teacher_tasks: Sequence[str] | None = None):
        if rows % process_count:
            raise ValueError(f"batch_size ({rows}) must be divisible by the process count ({process_count})")
        if teacher_tasks is not None:
            if not isinstance(prompts, TaskPrompts):
                raise ValueError("--teacher_tasks routes task prompts (--tasks), not --data prompts")
            teacher_tasks = check_teacher_tasks(teacher_tasks, len(teachers), prompts.tasks)
        self.teacher_tasks = teacher_tasks
        self.policy, self.prompts, self.teachers = policy, prompts, list(teachers)
        self.rows, self.seq_len, self.max_new_tokens = rows // process_count, seq_len, max_new_tokens
        self.seed, self.process_index = seed, process_index
        self.sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
        self.settings = {"prompts": prompts.fingerprint, "batch_size": rows, "seq_len": seq_len, "seed": seed,
                         "max_new_tokens": max_new_tokens, "process_count": process_count, **self.sampling}
        if teacher_tasks is not None:  # absent without routing: runs from before routing resume as they were
            self.settings["teacher_tasks"] = ",".join(teacher_tasks)
        self.index = 0

    def __iter__(self) -> RolloutIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index, self.process_index])
        if self.teacher_tasks is None:
            prompts, tasks = self.prompts.draw(self.rows, rng), [""] * self.rows
        else:
            prompts, tasks = self.prompts.draw_with_tasks(self.rows, rng)
        batch, _ = rollout_batch(self.policy(), prompts, seq_len=self.seq_len, max_new_tokens=self.max_new_tokens,
                                 seed=int(rng.integers(2**31)), **self.sampling)
        for i, teacher in enumerate(self.teachers):
            batch[teacher_hidden_key(i)] = teacher.hidden(batch)
        batch[TEACHER_MASK] = teacher_mask(tasks, self.teacher_tasks, len(self.teachers), self.seq_len)
        self.index += 1
        return batch

    def position(self) -> dict[str, Any]:
        return {"index": self.index}

    def restore_position(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
