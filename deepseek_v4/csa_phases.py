"""The CSA phases of a training run (dense training, indexer warm-up, sparse training) and the warm-up's pieces.

`csa_phase` decides the phase of each step (its docstring holds the table; docs/training.md explains the
objectives). The warm-up trains only the lightning indexers' parameters (`split_indexer`) with an optimizer of
their own (`make_indexer_warmup_optimizer`), whose state lives in `TrainState.indexer_opt_state`; the step itself
is `deepseek_v4.train.train_step` with `phase="warmup"`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import optax
from flax import nnx

from deepseek_v4.config import Config

if TYPE_CHECKING:  # the train module imports this one
    from deepseek_v4.train import StatePlan, TrainSettings, TrainState

DENSE, WARMUP, SPARSE = "dense", "warmup", "sparse"
PHASES = (DENSE, WARMUP, SPARSE)


def csa_phase(s: TrainSettings, step: int) -> str:
    """The phase of the step with index `step` (0-based), from `sparse_attention_after` = S and
    `indexer_warmup_steps` = W (0 <= W <= S; docs/training.md):

    | steps      | phase    | CSA attention                   | trains                                  | indexer KL   |
    |------------|----------|---------------------------------|-----------------------------------------|--------------|
    | [0, S - W) | "dense"  | window + every admissible entry | everything (main optimizer), biases     | dense        |
    | [S - W, S) | "warmup" | window + every admissible entry | the indexers only (own AdamW, constant  | dense        |
    |            |          |                                 | indexer_warmup_lr); the rest, the main  |              |
    |            |          |                                 | optimizer state and the biases frozen   |              |
    | [S, steps) | "sparse" | window + the indexer's top-k    | everything (main optimizer), biases     | selected set |

    The phase depends on the step only, so a run resumed from a checkpoint continues in the phase it left.
    Warm-up steps do not advance the main optimizer's LR schedule (its own step count stays), which therefore
    runs over `steps - W` steps (`TrainSettings.optimizer_steps`).
    """
    if step >= s.sparse_attention_after:
        return SPARSE
    if step >= s.sparse_attention_after - s.indexer_warmup_steps:
        return WARMUP
    return DENSE


def validate_indexer_warmup(s: TrainSettings) -> None:
    """Raise a one-line ValueError for phase settings (`sparse_attention_after`, `indexer_warmup_*`) that cannot
    work: the warm-up must lie inside the run and end where sparse attention starts."""
    w, after = s.indexer_warmup_steps, s.sparse_attention_after
    if after < 0:
        raise ValueError(f"sparse_attention_after must be >= 0, got {after}")
    if w < 0:
        raise ValueError(f"indexer_warmup_steps must be >= 0, got {w}")
    if not (s.indexer_warmup_lr > 0 and math.isfinite(s.indexer_warmup_lr)):
        raise ValueError(f"indexer_warmup_lr must be a positive number, got {s.indexer_warmup_lr}")
    if w == 0:
        return
    if w >= s.steps:
        raise ValueError(f"indexer_warmup_steps ({w}) must be shorter than the run (steps={s.steps})")
    if w > after:
        raise ValueError(f"indexer_warmup_steps ({w}) exceeds sparse_attention_after ({after}): the warm-up is the "
                         f"last {w} steps before sparse attention starts")
    if after > s.steps:
        raise ValueError(f"the indexer warm-up ends at sparse_attention_after ({after}), after the run's last step "
                         f"(steps={s.steps})")
    if s.indexer_weight == 0:
        raise ValueError(f"indexer_warmup_steps ({w}) needs indexer_weight > 0 (the warm-up trains on the KL only)")


def check_settings_for_config(s: TrainSettings, cfg: Config) -> None:
    """Raise a one-line ValueError for settings the model `cfg` cannot train with (an indexer warm-up needs CSA)."""
    if s.indexer_warmup_steps and not any(cfg.layer_kind(r) == "csa" for r in cfg.layer_ratios):
        raise ValueError(f"indexer_warmup_steps ({s.indexer_warmup_steps}) needs a CSA layer (an indexer to train); "
                         f"the model has none (compress_ratios {list(cfg.compress_ratios)})")


# ---- the CSA phases -------------------------------------------------------------------------------------

def make_indexer_warmup_optimizer(s: TrainSettings) -> optax.GradientTransformation | None:
    """The indexer warm-up's own optimizer (None without a warm-up): AdamW at the constant `indexer_warmup_lr`,
    the run's betas, epsilon and weight decay, over the indexer parameters only (`split_indexer`)."""
    if not s.indexer_warmup_steps:
        return None
    return optax.adamw(s.indexer_warmup_lr, b1=s.adam_b1, b2=s.adam_b2, eps=s.adam_eps, weight_decay=s.weight_decay)


# The lightning indexers' parameters (every path through a module named `indexer`): what the warm-up trains.
INDEXER_PARAMS = nnx.PathContains("indexer")


def split_indexer(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(the indexer parameters, the others) of a parameter state; `nnx.merge_state` joins them back."""
    return nnx.split_state(params, INDEXER_PARAMS, ...)


def main_optimizer_count(state: TrainState) -> jax.Array:
    """Steps the main optimizer has taken: steps minus skipped ones minus indexer warm-up updates (the warm-up
    leaves the main optimizer state, its step count included, unchanged). Its LR schedule and the MTP weight
    switch read this count. [] int32."""
    count = state.step - state.skipped
    if state.indexer_opt_state is not None:
        count = count - optax.tree_utils.tree_get(state.indexer_opt_state, "count")
    return count


def with_indexer_warmup_state(state: TrainState, plan: StatePlan) -> TrainState:
    """A restored train state, given the warm-up optimizer state the run needs: a checkpoint written before the
    run had a warm-up holds none, so it starts fresh (`plan.indexer_tx` initialised on the restored indexer
    parameters, laid out by `plan.shardings`). A state that holds one keeps it, also in a run without a warm-up
    (it counts the warm-up updates that `main_optimizer_count` leaves out)."""
    if plan.indexer_tx is None or state.indexer_opt_state is not None:
        return state
    init = jax.jit(lambda p: plan.indexer_tx.init(split_indexer(p)[0]), out_shardings=plan.shardings.indexer_opt_state)
    return dataclasses.replace(state, indexer_opt_state=init(state.params))
