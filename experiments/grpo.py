r"""GRPO on a verifiable task: grouped rollouts from the current policy, exact-answer rewards, the shared train step.

  python -m experiments.grpo --init=runs/nano_sft --task=arithmetic --workdir=runs/nano_grpo --steps=50
  python -m experiments.grpo --hf_dir=export/tiny --task=string --mode=think-high --group_size=8 --top_k=50

--init is a run directory (pretraining, SFT or GRPO: its newest checkpoint), --hf_dir an exported safetensors
directory; the weights are the policy's start and, frozen, the reference model of the KL term. Each step samples
--prompts_per_step problems of --task (seeded by (--seed, step)), --group_size completions each in --mode, scores
them, and takes one optimizer step of the GRPO loss (`deepseek_v4.post_training_losses.grpo_loss`) through the
shared `train.make_train_step`; the batch is built by `deepseek_v4.grpo` (one sequence per row: --batch_size is
prompts_per_step * group_size, --seq_len must hold a prompt and --max_new_tokens).

Every other flag is pretraining's (`train.TrainSettings`, `experiments.run.RunSettings`, `Config` fields):
checkpoints, resume, metrics, mesh, fault handling. Resume: re-running with the same --workdir continues from its
newest checkpoint; rollouts are not saved but regenerated from (--seed, step) with the restored weights, so the
resumed run takes the same steps as an uninterrupted one. metrics.jsonl adds per record mean_reward, reward_std,
completion_length, kept_fraction, signal_groups, skipped_groups / skipped_samples, kl, clipped_fraction; the
rollout statistics are over every process's prompts (their sums and counts are gathered at each record).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from deepseek_v4 import DeepseekV4, grpo, train
from deepseek_v4.config import Config
from experiments import flags as flag_gen
from experiments import entry, init_weights
from experiments import run as run_lib

FLAGS = flags.FLAGS
PROGRESS_KEYS = ("mean_reward", "reward_std", "completion_length", "kl")

# RunSettings' data flags are pretraining's corpus and the batch is one row per sample: GRPO sets them.
_RUN_FIELDS = [f.name for f in dataclasses.fields(run_lib.RunSettings)
               if f.name not in ("data", "data_weights", "data_cache", "data_workers", "batch_size")]
_RUN_DEFAULTS = {"seq_len": 128, "log_every": 1, "save_every": 10}
_TRAIN_DEFAULTS = {"learning_rate": 1e-4, "steps": 50, "warmup_steps": 0, "schedule": "constant",
                   "optimizer": "adamw", "bias_speed": 0.0, "mtp_weight": 0.0, "mtp_weight_after_decay": 0.0}


def define_flags() -> None:
    flag_gen.define_config_flags()
    flag_gen.define_settings_flags(train.TrainSettings, defaults=_TRAIN_DEFAULTS)
    flag_gen.define_settings_flags(run_lib.RunSettings, names=_RUN_FIELDS, defaults=_RUN_DEFAULTS)
    flag_gen.define_settings_flags(grpo.GRPOSettings)
    flags.adopt_module_key_flags(flag_gen)  # --help lists them


def attach_rollouts(run: run_lib.Run, g: grpo.GRPOSettings, source: grpo.RolloutSource,
                    reference: tuple[object, object]) -> None:
    """Point the rollout source at the run's live weights and the frozen reference; join the rollout stats to the
    metrics records and the progress line."""
    ref_params, ref_extras = reference
    source.policy = lambda: nnx.merge(run.plan.graphdef, run.state.params, run.state.extras)
    source.reference_fn = grpo.make_reference_fn(run.plan.graphdef, ref_params, ref_extras, g,
                                                 run.settings.loss_chunk)
    reported: set[str] = set()

    def record(step: int) -> dict[str, float]:
        stats = source.pop_stats(step)
        if not stats:
            return {}
        for s in stats:
            for e in s.errors:
                if e not in reported and len(reported) < 20:
                    reported.add(e)
                    print(f"reward skipped: {e}", file=sys.stderr, flush=True)
        return grpo.record_over_processes(stats)  # every process logs at the same steps: the collective is reached

    run.record_extras = record
    run.progress_keys = PROGRESS_KEYS


def reference_weights(run: run_lib.Run, loader) -> tuple[object, object]:
    """The frozen initial weights: a copy of the fresh state's (the train step donates the state), or, after a
    resume, loaded again from the source (the same values: the initial state is a function of --init / --hf_dir /
    --seed)."""
    if not run.resumed:
        return jax.tree.map(jnp.copy, run.state.params), jax.tree.map(jnp.copy, run.state.extras)
    with jax.set_mesh(run.mesh):
        if loader is not None:
            state = loader(run.plan)
        else:
            state = train.create_state(lambda: DeepseekV4(run.cfg, rngs=nnx.Rngs(run.opts.seed)), run.plan.tx,
                                       run.opts.seed, run.plan.shardings, graphdef=run.plan.graphdef)[1]
    return state.params, state.extras


def setup_run(cfg: Config, settings: train.TrainSettings, opts: run_lib.RunSettings, g: grpo.GRPOSettings, *,
              workdir: str, model_name: str = "grpo", reward_fn: grpo.RewardFn = grpo.default_reward
              ) -> tuple[run_lib.Run, Callable[[run_lib.Run], None]]:
    """`run_lib.setup` for GRPO: the rollout source as the data, the GRPO loss in the shared step, the weights of
    --init / --hf_dir. Returns the run and the `prepare` hook of `run_lib.train_and_report` (attaches the live
    policy and the reference). `opts.batch_size` must be prompts_per_step * group_size.

    Raises:
      run_lib.UserError: as `run_lib.setup`.
    """
    if opts.batch_size != g.prompts_per_step * g.group_size:
        raise run_lib.UserError(f"the batch is one row per sample: batch_size must be {g.prompts_per_step} * "
                                f"{g.group_size}, got {opts.batch_size}")
    rollouts = grpo.RolloutSource(g, opts.seq_len, opts.seed, policy=None, reference_fn=None, reward_fn=reward_fn,
                                  process_index=jax.process_index(), process_count=jax.process_count())

    def data_source(process_index: int, process_count: int, **_):
        return rollouts

    loader = init_weights.weights_loader(init=g.init, hf_dir=g.hf_dir, cfg=cfg, settings=settings, seed=opts.seed)

    def make_step(graphdef, cfg, tx, s, *, phase):
        return train.make_train_step(graphdef, cfg, tx, s, phase=phase, loss_fn=g.loss_fn())

    run = run_lib.setup(cfg, settings, opts, workdir=workdir, model_name=model_name, data_source=data_source,
                        make_step=make_step, initial_state=loader)

    def prepare(run: run_lib.Run) -> None:
        attach_rollouts(run, g, rollouts, reference_weights(run, loader))

    return run, prepare


def main(argv: list[str]) -> None:
    entry.start(argv)
    with entry.user_errors():  # the only place flags are read
        g = flag_gen.settings_from_flags(grpo.GRPOSettings)
        settings = flag_gen.settings_from_flags(train.TrainSettings)
        opts = run_lib.RunSettings(**flag_gen.settings_values(run_lib.RunSettings, names=_RUN_FIELDS),
                                   batch_size=g.prompts_per_step * g.group_size, data="rollouts")
        if opts.seq_len < g.max_new_tokens + 1:
            raise ValueError(f"--seq_len ({opts.seq_len}) must hold a prompt and --max_new_tokens "
                             f"({g.max_new_tokens})")
        cfg: Config = init_weights.init_config(init=g.init, hf_dir=g.hf_dir, preset=FLAGS[flag_gen.CONFIG_FLAG].value,
                                               overrides=flag_gen.config_overrides())
    if not (g.init or g.hf_dir):
        print("no --init / --hf_dir: GRPO on a new, untrained model (rewards will stay near zero)", flush=True)
    source_dir = g.init or g.hf_dir
    base = os.path.basename(os.path.normpath(source_dir)) if source_dir else FLAGS[flag_gen.CONFIG_FLAG].value
    model_name = f"{base}_grpo"
    workdir = entry.workdir(opts, model_name)
    hooks: dict[str, Callable[[run_lib.Run], None]] = {}

    def setup() -> run_lib.Run:
        run, hooks["prepare"] = setup_run(cfg, settings, opts, g, workdir=workdir, model_name=model_name)
        return run

    entry.train(setup, prepare=lambda run: hooks["prepare"](run))


if __name__ == "__main__":
    define_flags()
    app.run(main)
