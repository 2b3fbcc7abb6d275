r"""On-policy distillation of one or more teachers into a student (V4's consolidation of the specialists).

  python -m experiments.distill --init=runs/nano_sft --teachers=runs/spec_arith,runs/spec_string \
      --weights=0.5,0.5 --tasks=arithmetic,string --teacher_tasks=arithmetic,string --workdir=runs/nano_student
  python -m experiments.distill --hf_dir=export/student --teachers=export/a,export/b --data=chat.jsonl ...

Each step the student (the run's current weights) samples one completion per prompt with the inference engine,
seeded by (--seed, step); each teacher scores the student's tokens with its training forward and keeps only its
last hidden states; the loss is sum_i w_i KL(p_student || p_teacher_i) over the full vocabulary on the sampled
tokens, computed in vocabulary chunks (`deepseek_v4.distillation`, docs/training.md "On-policy distillation").

--init / --hf_dir give the student (as for experiments.sft; neither: a new model). --teachers are run directories
(their newest checkpoint, read only) or exported safetensors directories (tools.export_safetensors; the Config
fields config.json cannot carry come from --config), each with the student's vocabulary. --weights: one weight
>= 0 per teacher (default: equal). --teacher_tasks=T1,T2 (one task per teacher, each in --tasks; not with
--data) routes each task prompt to its task's teacher: a row is scored by that teacher alone, with its weight
(V4's consolidation sorts the samples by teacher); without it every teacher scores every row. Prompts come from
the seeded verifiable --tasks in the chat --modes (--seq_len must hold the longest plus --max_new_tokens), or from
--data: chat jsonl files in experiments.sft's format, `{"messages": [...], "mode": ...}` per line, where each
conversation up to its last assistant turn is a prompt in its mode and the student samples that turn. Lines that
do not parse, conversations the SFT checks reject and prompts longer than --seq_len - --max_new_tokens + 1 are
skipped and counted (the count is printed at start); a file that cannot be read, files that hold nothing, or no
usable prompt are a one-line error.

Every other flag is pretraining's (`train.TrainSettings`, `experiments.run.RunSettings`, `Config` fields):
checkpoints, resume (re-running with the same --workdir continues from its newest checkpoint and the same
sequence of prompts and sampling keys), metrics (`loss` = the weighted KL, `kl_teacher_<i>` = teacher i's mean KL
over the tokens it scores), mesh, fault handling. `tokens` and `nonpad_fraction` count the sampled tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from absl import app, flags
from flax import nnx

from deepseek_v4 import distillation, sft_data, train, verifiable_tasks
from deepseek_v4.config import Config, setting
from experiments import flags as flag_gen
from experiments import entry, init_weights, teachers as teacher_lib
from experiments import run as run_lib

FLAGS = flags.FLAGS


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """What distillation adds to pretraining's flags: the student's source, the teachers, the prompts, sampling."""

    init: str | None = setting(None, "Run directory to start the student from (its newest checkpoint).")
    hf_dir: str | None = setting(None, "Exported safetensors directory to start the student from.")
    teachers: str = setting("", "Comma-separated teachers: run directories or exported safetensors directories.")
    weights: tuple[float, ...] | None = setting(None, "One weight >= 0 per teacher (default: equal weights).")
    tasks: str = setting(",".join(verifiable_tasks.TASKS), "Comma-separated verifiable tasks the prompts are "
                         "drawn from (unused with --data).")
    modes: str = setting("non-think", "Comma-separated chat modes of the task prompts.")
    teacher_tasks: str = setting("", "Comma-separated tasks, one per teacher in --teachers order: each task prompt "
                                 "is scored by its task's teacher only (weight w_i), not by every teacher. Task "
                                 "prompts only.")
    data: str = setting("", "Comma-separated chat jsonl files to take the prompts from instead of --tasks.")
    max_new_tokens: int = setting(32, "Most tokens the student samples per prompt.")
    temperature: float = setting(1.0, "The student's sampling temperature.")
    top_p: float = setting(1.0, "The student's nucleus sampling mass.")
    top_k: int = setting(0, "Keep the k most likely tokens when sampling (0: all).")
    vocab_chunk: int = setting(distillation.DEFAULT_VOCAB_CHUNK, "Vocabulary columns of logits per chunk of "
                               "the KL.")
    teacher_sparse_attention: bool = setting(True, "Teachers score with top-k sparse CSA attention (as after "
                                             "pretraining's sparse phase); false: dense CSA attention.")

    def __post_init__(self):
        if self.init and self.hf_dir:
            raise ValueError("give --init or --hf_dir, not both")
        teachers = _names(self.teachers)
        if not teachers:
            raise ValueError("give at least one teacher with --teachers=DIR1,DIR2")
        weights = self.weights if self.weights is not None else (1.0 / len(teachers),) * len(teachers)
        object.__setattr__(self, "weights", distillation.check_weights(weights, len(teachers)))
        if self.teacher_tasks:
            if self.data:
                raise ValueError("--teacher_tasks routes task prompts (--tasks); it cannot be used with --data")
            distillation.check_teacher_tasks(_names(self.teacher_tasks), len(teachers), _names(self.tasks))
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.top_k >= 0):
            raise ValueError(f"sampling needs --temperature > 0, 0 < --top_p <= 1, --top_k >= 0; got "
                             f"{self.temperature}, {self.top_p}, {self.top_k}")
        if self.vocab_chunk < 1:
            raise ValueError(f"--vocab_chunk must be >= 1, got {self.vocab_chunk}")

    @property
    def teacher_dirs(self) -> tuple[str, ...]:
        return _names(self.teachers)

    @property
    def routing(self) -> tuple[str, ...] | None:
        """The teachers' tasks, or None: every teacher scores every prompt."""
        return _names(self.teacher_tasks) or None


_RUN_FIELDS = [f.name for f in dataclasses.fields(run_lib.RunSettings)
               if f.name not in ("data", "data_weights", "data_cache", "data_workers")]


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests and tools can import this module)."""
    flag_gen.define_config_flags()
    flag_gen.define_settings_flags(train.TrainSettings, defaults={"learning_rate": 1e-4, "steps": 20,
                                                                  "schedule": "constant"})
    flag_gen.define_settings_flags(run_lib.RunSettings, names=_RUN_FIELDS, defaults={"seq_len": 128})
    flag_gen.define_settings_flags(DistillSettings)
    flags.adopt_module_key_flags(flag_gen)  # --help lists them


def prompt_source(d: DistillSettings, seq_len: int):
    """The prompts --tasks / --modes or --data name; one-line ValueError if none fits --seq_len."""
    fits = seq_len - d.max_new_tokens + 1  # a row holds prompt + completion - 1 token pairs
    if d.data:
        examples, skipped = sft_data.read_chat_jsonl(list(_names(d.data)))
        if not examples and not skipped.total:
            raise ValueError(f"--data={d.data} holds no conversation")
        return distillation.ChatPrompts(examples, fits, skipped)
    source = distillation.TaskPrompts(_names(d.tasks), _names(d.modes))
    if source.longest() > fits:
        raise ValueError(f"task prompts of up to {source.longest()} tokens plus --max_new_tokens={d.max_new_tokens} "
                         f"do not fit --seq_len={seq_len}")
    return source


def main(argv: list[str]) -> None:
    entry.start(argv)
    preset = FLAGS[flag_gen.CONFIG_FLAG].value
    with entry.user_errors():  # the only place flags are read
        d = flag_gen.settings_from_flags(DistillSettings)
        settings = flag_gen.settings_from_flags(train.TrainSettings)
        opts = run_lib.RunSettings(**flag_gen.settings_values(run_lib.RunSettings, names=_RUN_FIELDS))
        cfg: Config = init_weights.init_config(init=d.init, hf_dir=d.hf_dir, preset=preset,
                                               overrides=flag_gen.config_overrides())
        distillation.check_vocabularies(cfg.vocab_size, {t: teacher_lib.teacher_config(t, preset).vocab_size
                                                         for t in d.teacher_dirs})
        prompts = prompt_source(d, opts.seq_len)
    if isinstance(prompts, distillation.ChatPrompts):
        print(f"prompts: {len(prompts.prompts)} from {d.data}; {prompts.skipped.summary()}", flush=True)
    if not (d.init or d.hf_dir):
        print("no --init / --hf_dir: distilling into a new, untrained model", flush=True)
    with entry.user_errors():
        teachers = [teacher_lib.load_teacher(t, preset, sparse_attention=d.teacher_sparse_attention)
                    for t in d.teacher_dirs]
    for i, (t, w) in enumerate(zip(teachers, d.weights)):
        task = f", scores {d.routing[i]} prompts" if d.routing else ""
        print(f"teacher {i}: {t.name} (weight {w:g}{task}, hidden {t.cfg.hidden_size}, {t.cfg.num_hidden_layers} "
              "layers)", flush=True)
    source = d.init or d.hf_dir
    model_name = f"{os.path.basename(os.path.normpath(source)) if source else preset}_distilled"
    workdir = entry.workdir(opts, model_name)
    holder: dict[str, run_lib.Run] = {}

    def policy():  # the student as the train state holds it now (read before the step that donates it)
        run = holder["run"]
        return nnx.merge(run.plan.graphdef, run.state.params, run.state.extras)

    def data_source(process_index: int, process_count: int):
        return distillation.RolloutIterator(policy, prompts, teachers, rows=opts.batch_size, seq_len=opts.seq_len,
                                            max_new_tokens=d.max_new_tokens, seed=opts.seed,
                                            temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                                            process_index=process_index, process_count=process_count,
                                            teacher_tasks=d.routing)

    make_step = functools.partial(distillation.make_distill_step, teacher_heads=[t.head for t in teachers],
                                  weights=d.weights, vocab_chunk=d.vocab_chunk)

    def setup() -> run_lib.Run:
        holder["run"] = run_lib.setup(cfg, settings, opts, workdir=workdir, model_name=model_name,
                                      data_source=data_source, make_step=make_step,
                                      initial_state=init_weights.weights_loader(init=d.init, hf_dir=d.hf_dir,
                                                                                cfg=cfg, settings=settings,
                                                                                seed=opts.seed))
        return holder["run"]

    entry.train(setup)


if __name__ == "__main__":
    define_flags()
    app.run(main)
