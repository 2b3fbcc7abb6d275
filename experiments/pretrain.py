r"""Pretrain a DeepSeek-V4 model: flags -> Config -> mesh -> init or resume -> train loop -> checkpoints.

With no flags it trains the `nano` preset on the embedded Shakespeare corpus on CPU:

  python -m experiments.pretrain

A recipe (`deepseek_v4/recipes.py`: LR schedule, batch ramp, sequence-length stages, attention phases) runs its
stages in one go; flags given beside it override its fields and are reported:

  python -m experiments.pretrain --recipe=nano

Re-running a command with the same --workdir resumes from its newest good checkpoint (model, optimizer,
step, RNG, data position). Larger runs name a preset and override fields, e.g.

  python -m experiments.pretrain --config=tiny --workdir=runs/tiny --steps=2000 --batch_size=16 \
      --seq_len=512 --learning_rate=1e-3 --schedule=cosine --mesh=data=2,expert=4

Flags: one per field of `Config` (unset: the preset's value), of `train.TrainSettings` (the optimization) and of
`experiments.run.RunSettings` (execution and records); defaults and help live with those fields.

Outputs in --workdir: checkpoints/<step>/ (Orbax), metrics.jsonl (one JSON object per logged step),
tensorboard/ (event files), config.json (the resolved model config), metrics.png (the curves, drawn at the end
by `python -m tools.plot_metrics <workdir>`). Progress: one line per record with loss, tok/s, MFU and ETA (a bar
on a terminal).

Faults: SIGTERM / SIGINT finish the current step, save and exit 0; a step with a non-finite loss or
gradient changes nothing and is counted, and --max_bad_steps consecutive ones stop the run (exit 1);
an unreadable newest checkpoint is moved aside and the previous one is used. Loss spikes (experiments/spikes.py):
--spike_response=skip drops a spiking step's update, rollback also returns to the newest checkpoint and skips the
data up to the spike.

Held-out evaluation (deepseek_v4/evaluation.py): every --eval_every steps and at the end, --eval_batches fixed
batches of --eval_data (default: the embedded validation split) give eval_loss, eval_mtp_loss, eval_bits_per_byte
and the loss by position bucket, in the same metrics record as the training losses.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from deepseek_v4 import config as config_lib
from deepseek_v4 import data, evaluation, recipes, train
from deepseek_v4.config import Config
from deepseek_v4.synthetic import SyntheticIterator
from experiments import flags as flag_gen
from experiments import entry, held_out, preflight, spikes
from experiments import run as run_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests and tools can import this module)."""
    flag_gen.define_config_flags()
    flag_gen.define_settings_flags(train.TrainSettings)
    flag_gen.define_settings_flags(run_lib.RunSettings)
    flag_gen.define_settings_flags(evaluation.EvalSettings)
    flag_gen.define_settings_flags(spikes.SpikeSettings)
    flags.adopt_module_key_flags(flag_gen)  # --help lists them
    flags.DEFINE_string("recipe", None, f"Training recipe ({', '.join(recipes.RECIPES)}): its stages set the steps, "
                        "seq_len, batch and attention phase by tokens consumed; its model preset is the default "
                        "--config.")


def pretrain_data(cfg: Config, opts: run_lib.RunSettings) -> run_lib.DataSource:
    """The data source `opts.data` names: the embedded corpus, synthetic batches, or prepared directories."""
    def make(process_index: int, process_count: int, opts: run_lib.RunSettings = opts):
        per_process = opts.batch_size // process_count
        if opts.data == "synthetic":
            return SyntheticIterator(per_process, opts.seq_len, opts.seed, cfg.vocab_size,
                                     first_row=process_index * per_process)
        if opts.data == "shakespeare":
            dirs = [data.default_corpus(opts.data_cache, progress=process_index == 0)]
        else:
            dirs = [d for d in opts.data.split(",") if d]
        weights = None if opts.data_weights is None else list(opts.data_weights)
        return data.make_train_iterator(dirs, weights, opts.seq_len, per_process, opts.seed, process_index,
                                        process_count, opts.data_workers)

    return make


def settings_from_flags() -> tuple[Config, train.TrainSettings, run_lib.RunSettings, recipes.Schedule | None, str]:
    """(model config, train settings, run settings, resolved recipe or None, preset name) from the flags.

    Raises:
      ValueError: one line: a bad value, an unknown recipe, a flag contradicting a recipe stage, or a pod preset
        without a recipe or explicit --steps and --learning_rate.
    """
    given = {name for name in FLAGS if FLAGS[name].present}
    preset = FLAGS[flag_gen.CONFIG_FLAG].value
    if FLAGS.recipe is None:
        preflight.require_pod_settings(preset, None, given)
        return (flag_gen.config_from_flags(), flag_gen.settings_from_flags(train.TrainSettings),
                flag_gen.settings_from_flags(run_lib.RunSettings), None, preset)
    recipe = recipes.get_recipe(FLAGS.recipe)
    if flag_gen.CONFIG_FLAG not in given:
        preset = recipe.preset
    cfg = config_lib.get_config(preset, **flag_gen.config_overrides())
    train_values = flag_gen.settings_values(train.TrainSettings)
    run_values = flag_gen.settings_values(run_lib.RunSettings)
    explicit = {k: v for k, v in {**train_values, **run_values}.items() if k in given}
    schedule = recipes.resolve(recipe, explicit)
    if preset != recipe.preset:
        schedule = dataclasses.replace(schedule, preset=preset,
                                       overrides={**schedule.overrides, "config": (recipe.preset, preset)})
    first = schedule.stages[0]
    settings = train.TrainSettings(**{**train_values, **schedule.settings})
    opts = run_lib.RunSettings(**{**run_values, "seq_len": first.seq_len, "batch_size": first.batch_size})
    return cfg, settings, opts, schedule, preset


def main(argv: list[str]) -> None:
    entry.start(argv)
    with entry.user_errors():  # the only place flags are read
        cfg, settings, opts, schedule, model_name = settings_from_flags()
        eval_settings = flag_gen.settings_from_flags(evaluation.EvalSettings)
        spike_settings = flag_gen.settings_from_flags(spikes.SpikeSettings)
        held_out.check_data(eval_settings)
    workdir = entry.workdir(opts, model_name)

    def attach_evaluation(run: run_lib.Run) -> None:
        run.evaluator = held_out.for_run(run, eval_settings)
        run.spike_settings = spike_settings

    entry.train(lambda: run_lib.setup(cfg, settings, opts, workdir=workdir, model_name=model_name,
                                      data_source=pretrain_data(cfg, opts), schedule=schedule),
                prepare=attach_evaluation)


if __name__ == "__main__":
    define_flags()
    app.run(main)
