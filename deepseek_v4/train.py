"""The train state and one training step: forward, chunked losses, gradients, clipped update, router-bias update.

One step, for a global batch [B, T] split into `grad_accum` microbatches [B/A, T]:

  1. per microbatch: `model.forward_train` -> final hidden [b, T, D], MTP hidden, expert counts, balance and
     indexer losses; next-token cross entropy from hidden and the head weight, chunked over tokens
     (`loss.chunked_cross_entropy`, never [b, T, V] at once); MTP cross entropy on shifted targets;
     gradients by `jax.value_and_grad`, summed over microbatches (each loss is normalised by the token
     count of the *whole* batch, so the sum is the full-batch gradient);
  2. global-norm clipping, then the optimizer update (optax);
  3. the aux-loss-free balancing bias: sign rule on the expert loads of the whole batch, outside the optimizer;
  4. if the loss, the gradient norm or the update is not finite, or the loss exceeds the caller's `loss_limit`
     (a loss spike), the step changes nothing (params, optimizer state and biases keep their old values) and is
     counted in `skipped`.

Loss = CE + w_mtp * CE_mtp + w_bal * balance + w_idx * indexer_KL, with w_mtp = 0.3, dropping to 0.1 once
the learning rate starts to decay (docs/training.md), w_bal = 1e-4, indexer KL gradients reaching only
the indexer (the model applies the stop-gradients).

The microbatch loss is pluggable (`LossFn`, default `next_token_loss`): SFT uses the default with per-token
`loss_weights` (assistant tokens only); an RL objective passes its own and shares everything else.

The CSA phase of a step (`csa_phase`: dense, indexer warm-up, sparse; the table is in deepseek_v4/csa_phases.py)
is static: one compiled step per phase. A warm-up step differentiates with respect to the indexer parameters
only, updates them with their own optimizer (`TrainState.indexer_opt_state`) and skips step 3, so the other
parameters, the main optimizer state and the biases stay bit for bit.

`nnx.split` happens once, when the state is built; the step works on the split pytrees and merges the model
inside the jitted function. The state argument is donated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepseek_v4 import loss as loss_lib
from deepseek_v4 import optim
from deepseek_v4.config import Config, setting
from sharding import context as cp
from deepseek_v4.csa_phases import (DENSE, INDEXER_PARAMS, PHASES, SPARSE, WARMUP,  # noqa: F401  (re-exported)
                                    check_settings_for_config, csa_phase, main_optimizer_count,
                                    make_indexer_warmup_optimizer, split_indexer, validate_indexer_warmup,
                                    with_indexer_warmup_state)
from sharding import rules


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of the training loop (not of the model); saved with every checkpoint.

    The defaults are those of the CPU `nano` run (`python -m experiments.pretrain` with no flags).
    """

    steps: int = setting(40, "Total optimizer steps of the run (a resumed run continues up to it).")
    learning_rate: float = setting(3e-3, "Peak learning rate.")
    schedule: str = setting("wsd", "LR schedule: wsd = warmup, constant, cosine decay over the last "
                            "decay_fraction of the run; cosine = warmup then cosine decay; constant = warmup then "
                            "constant.", choices=("wsd", "cosine", "constant"))
    warmup_steps: int | None = setting(None, "Linear warmup steps (unset / None: 10% of steps).")
    decay_fraction: float = setting(0.2, "wsd: fraction of steps spent decaying.")
    final_lr_fraction: float = setting(0.1, "The LR decays to learning_rate * final_lr_fraction.")
    optimizer: str = setting("muon", "muon: Muon for hidden and expert matrices, AdamW for embedding, head, norms, "
                             "mHC biases (V4); adamw: AdamW everywhere.", choices=("muon", "adamw"))
    weight_decay: float = setting(0.1, "Decoupled weight decay, applied to every trainable parameter.")
    adam_b1: float = setting(0.9, "AdamW beta1.")
    adam_b2: float = setting(0.95, "AdamW beta2.")
    adam_eps: float = setting(1e-20, "AdamW epsilon.")
    clip_norm: float = setting(1.0, "Global gradient-norm clip (0 disables).")
    grad_accum: int = setting(1, "Microbatches per step (the batch size must be divisible by it).")
    mtp_weight: float = setting(0.3, "MTP loss weight until the LR starts to decay.")
    mtp_weight_after_decay: float = setting(0.1, "MTP loss weight from the start of the LR decay.")
    balance_weight: float = setting(1e-4, "Sequence-wise balance loss weight.")
    indexer_weight: float = setting(1.0, "Weight of the lightning indexer's KL loss (0: no indexer training).")
    bias_speed: float = setting(1e-3, "Aux-loss-free balancing bias update speed (sign rule).")
    sparse_attention_after: int = setting(0, "First step of top-k sparse attention in CSA layers. Before it CSA "
                                          "attends to every admissible compressed entry: dense training (everything "
                                          "trains, the indexer on the dense KL), whose last indexer_warmup_steps "
                                          "steps are the indexer warm-up (see csa_phase).")
    indexer_warmup_steps: int = setting(0, "Steps of the indexer warm-up, the last ones before "
                                        "sparse_attention_after: dense CSA attention, only the lightning indexers "
                                        "train (dense KL, their own AdamW at indexer_warmup_lr); the other "
                                        "parameters, their optimizer state and the router biases stay unchanged.")
    indexer_warmup_lr: float = setting(1e-3, "Constant learning rate of the indexer warm-up's AdamW "
                                       "(DeepSeek-V3.2: 1e-3).")
    loss_chunk: int = setting(loss_lib.DEFAULT_CHUNK, "Tokens per chunk of head logits in the cross entropy.")
    loss_impl: str = setting("remat", "Cross entropy gradients: fused = computed in the forward pass (3 head "
                             "matmuls per chunk, holds a head-sized gradient); remat = recomputed in the backward "
                             "(4 matmuls, less memory).", choices=loss_lib.IMPLS)

    def __post_init__(self):
        if self.warmup_steps is None:  # the one place the default warmup is resolved
            object.__setattr__(self, "warmup_steps", max(1, self.steps // 10) if self.steps > 1 else 0)
        validate_settings(self)

    @property
    def optimizer_steps(self) -> int:
        """Steps the main optimizer takes (the run minus the indexer warm-up): the length of its LR schedule."""
        return self.steps - self.indexer_warmup_steps

    @property
    def decay_start(self) -> int:
        """First main-optimizer step of the LR decay (where the MTP weight drops)."""
        if self.schedule == "wsd":
            return self.optimizer_steps - decay_steps(self)
        if self.schedule == "cosine":
            return self.warmup_steps
        return self.optimizer_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate_settings(s: TrainSettings) -> None:
    """Raise a one-line ValueError for settings that cannot work."""
    def fail(msg):
        raise ValueError(msg)

    if s.steps <= 0:
        fail(f"steps must be positive, got {s.steps}")
    if not (s.learning_rate > 0 and math.isfinite(s.learning_rate)):
        fail(f"learning_rate must be a positive number, got {s.learning_rate}")
    if s.schedule not in ("wsd", "cosine", "constant"):
        fail(f"schedule must be 'wsd', 'cosine' or 'constant', got {s.schedule!r}")
    if s.optimizer not in ("muon", "adamw"):
        fail(f"optimizer must be 'muon' or 'adamw', got {s.optimizer!r}")
    validate_indexer_warmup(s)
    main = f"steps - indexer_warmup_steps ({s.optimizer_steps})" if s.indexer_warmup_steps else f"steps ({s.steps})"
    if s.schedule == "wsd" and s.warmup_steps + decay_steps(s) > s.optimizer_steps:
        fail(f"warmup_steps ({s.warmup_steps}) + decay steps ({decay_steps(s)}) exceed {main}")
    if s.schedule == "cosine" and s.warmup_steps >= s.optimizer_steps:
        fail(f"warmup_steps ({s.warmup_steps}) must be smaller than {main}")
    if s.warmup_steps < 0:
        fail(f"warmup_steps must be >= 0, got {s.warmup_steps}")
    if not 0 <= s.decay_fraction <= 1:
        fail(f"decay_fraction must be in [0, 1], got {s.decay_fraction}")
    if not 0 <= s.final_lr_fraction <= 1:
        fail(f"final_lr_fraction must be in [0, 1], got {s.final_lr_fraction}")
    if s.grad_accum < 1:
        fail(f"grad_accum must be >= 1, got {s.grad_accum}")
    if s.clip_norm < 0:
        fail(f"clip_norm must be >= 0, got {s.clip_norm}")
    if s.loss_chunk < 1:
        fail(f"loss_chunk must be >= 1, got {s.loss_chunk}")
    if s.loss_impl not in loss_lib.IMPLS:
        fail(f"loss_impl must be one of {', '.join(loss_lib.IMPLS)}, got {s.loss_impl!r}")
    for name in ("mtp_weight", "mtp_weight_after_decay", "balance_weight", "indexer_weight", "bias_speed",
                 "weight_decay"):
        if getattr(s, name) < 0:
            fail(f"{name} must be >= 0, got {getattr(s, name)}")


# ---- schedule and optimizer ---------------------------------------------------------------------------


def decay_steps(s: TrainSettings) -> int:
    """wsd: the length of the final decay (at least 1 step) of the main optimizer's `optimizer_steps`."""
    return max(1, int(round(s.decay_fraction * s.optimizer_steps)))


def learning_rate_schedule(s: TrainSettings) -> optax.Schedule:
    """The LR schedule named by `s.schedule` (see `optim.make_schedule`) over the main optimizer's
    `optimizer_steps`, ending at lr * final_lr_fraction."""
    return optim.make_schedule(s.schedule, s.learning_rate, s.optimizer_steps, warmup_steps=s.warmup_steps,
                               decay_steps=decay_steps(s) if s.schedule == "wsd" else None,
                               end_value=s.learning_rate * s.final_lr_fraction)


def make_optimizer(s: TrainSettings, *, mesh: jax.sharding.Mesh | None = None,
                   partition_specs: Any = None) -> optax.GradientTransformation:
    """`optim.make_optimizer` on the schedule; gradient clipping is left to the step (it logs the norm)."""
    return optim.make_optimizer(s.optimizer, learning_rate_schedule(s), weight_decay=s.weight_decay,
                                clip_norm=None, b1=s.adam_b1, b2=s.adam_b2, eps=s.adam_eps, mesh=mesh,
                                partition_specs=partition_specs)


# ---- train state --------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a step reads and writes. `params` are the trainable `nnx.Param`s, `extras` the other model
    variables (router balancing biases, hash-routing tables). `indexer_opt_state` is the indexer warm-up's
    optimizer state (`make_indexer_warmup_optimizer`), None in a run without a warm-up (nothing is saved then)."""

    step: jax.Array  # [] int32: steps taken (skipped ones included)
    params: Any
    extras: Any
    opt_state: Any
    rng: jax.Array  # [2] uint32 key data, the run's base key (per-step keys: fold_in(rng, step))
    skipped: jax.Array  # [] int32: steps whose update was skipped (non-finite loss or gradients)
    indexer_opt_state: Any = None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, extras) of a model: the one place the model is split."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
               indexer_tx: optax.GradientTransformation | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """A fresh train state from a built model (`indexer_tx`: the warm-up's optimizer, if the run has one)."""
    graphdef, params, extras = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        extras=extras,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
        indexer_opt_state=None if indexer_tx is None else indexer_tx.init(split_indexer(params)[0]),
    )
    return graphdef, state


def abstract_model(build_model: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, extras) of the model `build_model` makes, as shapes and dtypes (nothing allocated)."""
    return split_model(nnx.eval_shape(build_model))


def abstract_state_of(params: Any, extras: Any, tx: optax.GradientTransformation,
                      indexer_tx: optax.GradientTransformation | None = None) -> TrainState:
    """The train state's shapes and dtypes for abstract `params` / `extras` (from `abstract_model`)."""
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    indexer_opt = None if indexer_tx is None else jax.eval_shape(indexer_tx.init, split_indexer(params)[0])
    return TrainState(step=scalar, params=params, extras=extras, opt_state=jax.eval_shape(tx.init, params),
                      rng=jax.ShapeDtypeStruct((2,), jnp.uint32), skipped=scalar, indexer_opt_state=indexer_opt)


def abstract_state(build_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, seed: int,
                   indexer_tx: optax.GradientTransformation | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """The graphdef and the train state's shapes and dtypes, without allocating anything."""
    del seed  # the key's shape does not depend on it
    graphdef, params, extras = abstract_model(build_model)
    return graphdef, abstract_state_of(params, extras, tx, indexer_tx)


def state_shardings(abstract: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Shardings of a train state. Parameters and extras follow the logical-axis table (`sharding.rules`); each
    optimizer buffer laid out like a parameter (same path inside its `nnx.State`, same shape) gets that
    parameter's sharding; everything else (step, counters, RNG) is replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    table = {}
    for tree in (abstract.params, abstract.extras):
        shapes = dict(jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0])
        for path, var in jax.tree_util.tree_flatten_with_path(rules.param_shardings(tree, mesh), is_leaf=is_var)[0]:
            table[path] = (tuple(shapes[path].shape), var.value)

    def shard_state(st: nnx.State) -> Any:
        def one(path, x):
            if is_var(x):
                if not hasattr(x.value, "shape"):  # optax.MaskedNode: no array here
                    return x
                shape, sharding = table.get(path, (None, None))
                return x.replace(sharding if shape == tuple(x.value.shape) else replicated)
            return replicated

        return jax.tree_util.tree_map_with_path(one, st, is_leaf=is_var)

    return jax.tree.map(lambda x: shard_state(x) if isinstance(x, nnx.State) else replicated, abstract,
                        is_leaf=lambda x: isinstance(x, nnx.State))


def create_state(build_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, seed: int,
                 shardings: Any = None, *, graphdef: nnx.GraphDef | None = None,
                 indexer_tx: optax.GradientTransformation | None = None) -> tuple[nnx.GraphDef, TrainState]:
    """Build the model and optimizer state inside jit (each array is created where `shardings` puts it).

    Pass `graphdef` (from `abstract_model`) to skip tracing the constructor a second time.
    """
    if graphdef is None:
        graphdef = abstract_model(build_model)[0]
    state = jax.jit(lambda: init_state(build_model(), tx, seed, indexer_tx)[1], out_shardings=shardings)()
    return graphdef, state


@dataclasses.dataclass
class StatePlan:
    """Everything needed to create or restore a train state on a mesh (see `plan_state`)."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    indexer_tx: optax.GradientTransformation | None  # the indexer warm-up's optimizer (None without a warm-up)
    abstract: TrainState  # shapes and dtypes
    shardings: TrainState  # a NamedSharding per array
    target: TrainState  # ShapeDtypeStructs with shardings: the restore target
    # The restore target of the warm-up's optimizer state wherever a checkpoint holds one (None: no indexer).
    indexer_opt_target: Any = None


def plan_state(build_model: Callable[[], nnx.Module], s: TrainSettings, mesh: jax.sharding.Mesh) -> StatePlan:
    """Trace the model once, build the optimizer for its parameters' layout, and lay the train state out.

    Call under `jax.set_mesh(mesh)`.
    """
    graphdef, params, extras = abstract_model(build_model)
    specs = jax.tree.map(lambda x: x.spec, rules.param_shardings(params, mesh))
    tx = make_optimizer(s, mesh=mesh, partition_specs=specs)
    indexer_tx = make_indexer_warmup_optimizer(s)
    # Laid out whenever the model has indexers: a checkpoint of a run with a warm-up holds this state, and a run
    # resumed from it keeps it (it counts the warm-up updates the main schedule leaves out).
    has_indexer = bool(jax.tree.leaves(split_indexer(params)[0]))
    layout_tx = indexer_tx or (optax.adamw(1.0) if has_indexer else None)  # same state layout at any settings
    full = abstract_state_of(params, extras, tx, layout_tx)
    full_shardings = state_shardings(full, mesh)
    full_target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), full,
                               full_shardings)
    without = {} if indexer_tx is not None else {"indexer_opt_state": None}
    return StatePlan(graphdef=graphdef, tx=tx, indexer_tx=indexer_tx, abstract=dataclasses.replace(full, **without),
                     shardings=dataclasses.replace(full_shardings, **without),
                     target=dataclasses.replace(full_target, **without),
                     indexer_opt_target=full_target.indexer_opt_state)


# ---- the step -----------------------------------------------------------------------------------------


def token_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """Per-token weight of the main cross entropy: `loss_weights` where the batch has it, else 1, and 0 on padding.

    Shapes:
      batch [B, T] entries -> [B, T] float32.
    """
    mask = loss_lib.token_mask(batch["segment_ids"])
    if "loss_weights" not in batch:
        return mask
    return jnp.where(mask > 0, batch["loss_weights"].astype(jnp.float32), 0.0)


def mtp_token_weights(batch: dict[str, jax.Array], depth: int) -> tuple[jax.Array, jax.Array]:
    """Targets and per-token weights of the MTP module at `depth`: the prediction at t is of targets[t + depth],
    so it takes that target's loss weight (`loss_lib.mtp_targets` gives the targets and the document mask).

    Shapes:
      batch [B, T] entries -> (targets [B, T] int32, weights [B, T] float32).
    """
    shifted, valid = loss_lib.mtp_targets(batch["targets"], batch["segment_ids"], depth)
    if "loss_weights" not in batch:
        return shifted, valid
    w = batch["loss_weights"].astype(jnp.float32)
    k = min(depth, w.shape[1])
    w = jnp.concatenate([w[:, k:], jnp.zeros((w.shape[0], k), w.dtype)], axis=1)
    return shifted, jnp.where(valid > 0, w, 0.0)


def _batch_counts(batch: dict[str, jax.Array], mtp_depth: int) -> dict[str, jax.Array]:
    """Tokens that carry a loss (nonzero weight) in the whole batch, main and per MTP depth, at least 1."""
    def count(weights):
        return jnp.maximum(jnp.sum((weights != 0).astype(jnp.float32)), 1.0)

    main = count(token_weights(batch))
    mtp = [count(mtp_token_weights(batch, k)[1]) for k in range(1, mtp_depth + 1)]
    return {"tokens": main, "mtp": mtp}


# A microbatch loss: (model, microbatch, counts, *, s, sparse, mtp_weight) -> (total, aux). `counts` are the
# whole batch's loss-carrying token counts (`_batch_counts`), so summing microbatch losses gives the batch loss.
# `aux` must hold the keys `next_token_loss` returns (the step and the loop read them); every further key is
# summed over microbatches and reported in the step's metrics.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
AUX_KEYS = ("loss", "mtp_loss", "balance_loss", "indexer_loss", "indexer_recall", "expert_counts",
            "hash_expert_counts", "dropped_tokens")


def next_token_loss(model: nnx.Module, micro: dict[str, jax.Array], counts: dict[str, Any], *, s: TrainSettings,
                    sparse: bool, mtp_weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The pretraining (and SFT) loss of one microbatch: weighted next-token and MTP cross entropy, balance loss
    and indexer KL (see the module docstring). The default `LossFn`."""
    tokens, seg, pos, targets = micro["tokens"], micro["segment_ids"], micro["positions"], micro["targets"]
    out = model.forward_train(tokens, seg, pos, sparse_attention=sparse, indexer_loss=s.indexer_weight > 0)
    head = model.head[...]
    size = model.context_size(tokens.shape[1])  # hidden states come in the context layout: targets follow them
    ce = loss_lib.chunked_cross_entropy(out.hidden, head, cp.to_layout(targets, size),
                                        cp.to_layout(token_weights(micro), size), chunk_size=s.loss_chunk,
                                        impl=s.loss_impl) / counts["tokens"]
    mtp = jnp.zeros((), jnp.float32)
    for k, hidden in enumerate(out.mtp_hidden, start=1):
        t_k, w_k = (cp.to_layout(a, size) for a in mtp_token_weights(micro, k))
        mtp += loss_lib.chunked_cross_entropy(hidden, head, t_k, w_k, chunk_size=s.loss_chunk,
                                              impl=s.loss_impl) / counts["mtp"][k - 1]
    mtp = mtp / max(len(out.mtp_hidden), 1)
    a = s.grad_accum
    total = ce + mtp_weight * mtp + (s.balance_weight * out.balance_loss + s.indexer_weight * out.indexer_loss) / a
    return total, {"loss": ce, "mtp_loss": mtp, **model_aux(out, a)}


def model_aux(out: Any, grad_accum: int) -> dict[str, jax.Array]:
    """The `AUX_KEYS` every `LossFn` takes from the model's training outputs (all but "loss" and "mtp_loss"):
    the balance and indexer terms per microbatch share, expert loads and dropped tokens."""
    return {
        "balance_loss": out.balance_loss / grad_accum,
        "indexer_loss": out.indexer_loss / grad_accum,
        "indexer_recall": out.indexer_recall / grad_accum,
        "expert_counts": out.expert_counts,
        "hash_expert_counts": out.hash_expert_counts,
        "dropped_tokens": out.dropped_tokens,
    }


def _microbatch_loss(params, extras, micro, counts, *, graphdef, loss_fn: LossFn, s: TrainSettings, phase: str,
                     mtp_weight):
    model = nnx.merge(graphdef, params, extras)
    return loss_fn(model, micro, counts, s=s, sparse=phase == SPARSE, mtp_weight=mtp_weight)


def _load_ratio(counts: jax.Array) -> jax.Array:
    """Per layer, the busiest expert's load over the mean load. [L, E] -> [L]."""
    return jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _value_and_grads(loss_fn, trained, batch, a: int):
    """`jax.value_and_grad(loss_fn, has_aux=True)(trained, micro)` summed over the `a` microbatches of `batch`."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if a == 1:
        return grad_fn(trained, batch)
    micro = jax.tree.map(lambda x: x.reshape(a, x.shape[0] // a, *x.shape[1:]), batch)  # [B, T] -> [A, B/A, T]

    def body(carry, mb):
        (t, aux), g = grad_fn(trained, mb)
        acc_t, acc_aux, acc_g = carry
        return (acc_t + t, jax.tree.map(jnp.add, acc_aux, aux), jax.tree.map(jnp.add, acc_g, g)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (t0, aux0), g0 = grad_fn(trained, first)
    rest = jax.tree.map(lambda x: x[1:], micro)
    (total, aux, grads), _ = jax.lax.scan(body, (t0, aux0, g0), rest)
    return (total, aux), grads


def _clip(grads, s: TrainSettings):
    """(grads scaled to global norm <= clip_norm, their norm before clipping)."""
    grad_norm = optax.global_norm(grads)
    if s.clip_norm > 0:
        scale = jnp.minimum(1.0, s.clip_norm / (grad_norm + 1e-6))
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    return grads, grad_norm


def train_step(state: TrainState, batch: dict[str, jax.Array], loss_limit: jax.Array | None = None, *,
               graphdef: nnx.GraphDef, cfg: Config, tx: optax.GradientTransformation, s: TrainSettings,
               phase: str, loss_fn: LossFn = next_token_loss) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch (see the module docstring).

    Args:
      state: the train state (donated by `make_train_step`).
      batch: `tokens`, `targets`, `segment_ids`, `positions`, each [B, T] int32; B divisible by grad_accum.
        Optional `loss_weights` [B, T] float32 scales each token's cross entropy (main and MTP; 0 leaves a token
        out, e.g. a prompt); each loss is a mean over the tokens of nonzero weight. A non-finite weight makes the
        loss non-finite, and the step is skipped.
      loss_limit: optional [] float32; a step whose cross entropy exceeds it is a loss spike: skipped like a
        non-finite step (nothing changes but the counters) and flagged in the metric `loss_spike`.
      phase: the CSA phase of this step, one of `PHASES` (`csa_phase`): "dense" / "sparse" update everything
        with `tx`; "warmup" updates only the indexer parameters, with the warm-up's own optimizer.
      loss_fn: the microbatch loss (`LossFn`).

    Returns:
      The new state and a dict of scalar / small metrics (on device).

    Shapes:
      batch [B, T] -> microbatches [A, B/A, T]; expert_counts [n_learned_moe_layers, E].
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    count = main_optimizer_count(state)
    mtp_weight = jnp.where(count >= s.decay_start, s.mtp_weight_after_decay, s.mtp_weight)
    counts = _batch_counts(batch, cfg.num_nextn_predict_layers)
    micro_loss = functools.partial(_microbatch_loss, graphdef=graphdef, loss_fn=loss_fn, s=s, phase=phase,
                                   mtp_weight=mtp_weight)
    if phase == WARMUP:
        return _indexer_warmup_step(state, batch, counts, micro_loss, s, mtp_weight, loss_limit)
    (total, aux), grads = _value_and_grads(lambda p, mb: micro_loss(p, state.extras, mb, counts), state.params,
                                           batch, s.grad_accum)
    grads, grad_norm = _clip(grads, s)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # merge() reuses the Variable objects it is given and the bias update mutates them: hand it copies, so that
    # `state.extras` keeps the old values for a skipped step.
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, state.extras))
    if s.bias_speed > 0:
        model.update_router_bias(aux["expert_counts"], s.bias_speed)
    _, _, extras = split_model(model)

    ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & _all_finite(updates) & _all_finite(extras)
    ok, spike = _below_limit(ok, aux, loss_limit)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    new_state = dataclasses.replace(
        state,
        step=state.step + 1,
        params=keep(params, state.params),
        extras=keep(extras, state.extras),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32),
    )
    return new_state, _step_metrics(aux, total, grad_norm, learning_rate_schedule(s)(count), mtp_weight, counts, ok,
                                    new_state, spike)


def _below_limit(ok: jax.Array, aux: dict[str, jax.Array], loss_limit: jax.Array | None):
    """(ok and not a loss spike, the spike flag or None when there is no limit)."""
    if loss_limit is None:
        return ok, None
    spike = aux["loss"] > loss_limit
    return ok & ~spike, spike


def _indexer_warmup_step(state: TrainState, batch, counts, loss_fn, s: TrainSettings, mtp_weight, loss_limit):
    """A warm-up step: gradients of the same losses with respect to the indexer parameters only (only the dense
    KL reaches them), clipped, and the warm-up's AdamW. Everything else, the main optimizer state and the router
    biases included, is passed through untouched."""
    if state.indexer_opt_state is None:
        raise ValueError("an indexer warm-up step needs the state built with the warm-up's optimizer "
                         "(indexer_warmup_steps > 0)")
    indexer, rest = split_indexer(state.params)
    indexer_tx = make_indexer_warmup_optimizer(s)

    def indexer_loss_fn(trained, mb):
        return loss_fn(nnx.merge_state(trained, rest), state.extras, mb, counts)

    (total, aux), grads = _value_and_grads(indexer_loss_fn, indexer, batch, s.grad_accum)
    grads, grad_norm = _clip(grads, s)
    updates, indexer_opt = indexer_tx.update(grads, state.indexer_opt_state, indexer)
    new_indexer = optax.apply_updates(indexer, updates)
    ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & _all_finite(updates)
    ok, spike = _below_limit(ok, aux, loss_limit)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
    new_state = dataclasses.replace(
        state,
        step=state.step + 1,
        params=nnx.merge_state(keep(new_indexer, indexer), rest),
        indexer_opt_state=keep(indexer_opt, state.indexer_opt_state),
        skipped=state.skipped + jnp.where(ok, 0, 1).astype(jnp.int32),
    )
    return new_state, _step_metrics(aux, total, grad_norm, jnp.float32(s.indexer_warmup_lr), mtp_weight, counts, ok,
                                    new_state, spike)


def _step_metrics(aux, total, grad_norm, lr, mtp_weight, counts, ok, new_state, spike) -> dict[str, jax.Array]:
    metrics = {
        "loss": aux["loss"],
        "mtp_loss": aux["mtp_loss"],
        "total_loss": total,
        "balance_loss": aux["balance_loss"],
        "indexer_loss": aux["indexer_loss"],
        "indexer_recall": aux["indexer_recall"],
        "grad_norm": grad_norm,  # of the parameters this step trains (warm-up: the indexers')
        "lr": lr,  # the learning rate this step applied (warm-up: indexer_warmup_lr)
        "mtp_weight": mtp_weight,
        "tokens": counts["tokens"],
        "update_ok": ok,
        "skipped": new_state.skipped,
        "expert_load_max_over_mean": _load_ratio(aux["expert_counts"]),
        "hash_expert_load_max_over_mean": _load_ratio(aux["hash_expert_counts"]),
        "dropped_tokens": aux["dropped_tokens"],  # (token, expert) pairs over capacity, all MoE layers
        **{k: v for k, v in aux.items() if k not in AUX_KEYS},  # the loss's own metrics
    }
    if spike is not None:
        metrics["loss_spike"] = spike
    return metrics


def make_train_step(graphdef: nnx.GraphDef, cfg: Config, tx: optax.GradientTransformation, s: TrainSettings,
                    *, phase: str,
                    loss_fn: LossFn = next_token_loss) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step` jitted with the state donated: `step(state, batch[, loss_limit]) -> (state, metrics)`.

    `phase` is one of `PHASES` (one compiled step per phase). `loss_fn` is the microbatch loss (`LossFn`); every
    kind of training (pretraining, SFT, RL) shares the rest of the step: accumulation, clipping, the optimizer, the
    router-bias update and the non-finite guard.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    check_settings_for_config(s, cfg)
    fn = functools.partial(train_step, graphdef=graphdef, cfg=cfg, tx=tx, s=s, phase=phase, loss_fn=loss_fn)
    return jax.jit(fn, donate_argnums=(0,))


def sparse_at(s: TrainSettings, step: int) -> bool:
    """Whether CSA layers attend sparsely (top-k) at `step` (`csa_phase` is "sparse")."""
    return csa_phase(s, step) == SPARSE
