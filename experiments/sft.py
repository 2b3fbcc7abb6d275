r"""Supervised fine-tuning on chat data: loss on the assistant tokens only, packed rows with per-document masks.

  python -m experiments.sft --init=runs/nano --workdir=runs/nano_sft            # the embedded toy chat set
  python -m experiments.sft --hf_dir=export/tiny --data=chat.jsonl --workdir=runs/tiny_sft --steps=500

--init is a run directory of experiments.pretrain (its newest checkpoint), --hf_dir an exported safetensors
directory (tools.export_safetensors); the weights and router biases are kept, the optimizer starts fresh. With
neither, a new model is trained (a smoke test). --data is 'toy' (seeded dialogues of every verifiable task:
arithmetic, string puzzles, next letter, larger number; in all three modes, `deepseek_v4.verifiable_tasks`;
the same set `tools.make_chat_data` writes) or comma-separated jsonl files of `{"messages": [...], "mode":
"non-think" | "think-high" | "think-max"}` (other keys ignored), encoded by `deepseek_v4.chat`.
--include_reasoning decides whether the reasoning of assistant turns is trained on.
Bad lines are skipped and counted (`deepseek_v4.sft_data`).

Every other flag is pretraining's, with the same meaning (`train.TrainSettings`, `experiments.run.RunSettings`,
`Config` fields over the source's config, e.g. --dtype or --remat_policy): checkpoints, resume (re-running with
the same --workdir continues from its newest checkpoint, data position included; --init is then not read),
metrics, mesh, fault handling. In the metrics, `tokens` and `nonpad_fraction` count the assistant tokens (those
with a loss).
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags

from deepseek_v4 import sft_data, train, verifiable_tasks
from deepseek_v4.config import Config, setting
from experiments import flags as flag_gen
from experiments import entry, init_weights
from experiments import run as run_lib

FLAGS = flags.FLAGS
TOY = "toy"


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """What SFT adds to pretraining's flags: where the weights and the chat data come from."""

    init: str | None = setting(None, "Run directory of experiments.pretrain to start from (its newest checkpoint).")
    hf_dir: str | None = setting(None, "Exported safetensors directory to start from (instead of --init).")
    data: str = setting(TOY, "'toy' (the embedded seeded chat set) or comma-separated chat jsonl files.")
    toy_examples: int = setting(3000, "Dialogues in the toy chat set.")
    include_reasoning: bool = setting(True, "Train on the reasoning of assistant turns (think modes) too.")

    def __post_init__(self):
        if self.init and self.hf_dir:
            raise ValueError("give --init or --hf_dir, not both")
        if self.toy_examples < 1:
            raise ValueError(f"--toy_examples must be >= 1, got {self.toy_examples}")


# RunSettings' data flags are pretraining's corpus; SFT's --data (above) replaces them.
_RUN_FIELDS = [f.name for f in dataclasses.fields(run_lib.RunSettings)
               if f.name not in ("data", "data_weights", "data_cache", "data_workers")]


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests and tools can import this module)."""
    flag_gen.define_config_flags()
    flag_gen.define_settings_flags(train.TrainSettings, defaults={"learning_rate": 1e-3})
    flag_gen.define_settings_flags(run_lib.RunSettings, names=_RUN_FIELDS, defaults={"seq_len": 256})
    flag_gen.define_settings_flags(SFTSettings)
    flags.adopt_module_key_flags(flag_gen)  # --help lists them


def chat_documents(sft: SFTSettings, seq_len: int, seed: int) -> tuple[list[sft_data.Document], sft_data.Skipped]:
    """The documents --data names, encoded and checked (bad examples skipped and counted)."""
    if sft.data == TOY:
        examples = verifiable_tasks.make_chat_set(sft.toy_examples, seed)
        skipped = sft_data.Skipped()
    else:
        examples, skipped = sft_data.read_chat_jsonl([p for p in sft.data.split(",") if p])
    return sft_data.encode_examples(examples, seq_len, include_reasoning=sft.include_reasoning, skipped=skipped)


def sft_data_source(docs: list[sft_data.Document], opts: run_lib.RunSettings) -> run_lib.DataSource:
    def make(process_index: int, process_count: int):
        return sft_data.SFTIterator(docs, opts.batch_size, opts.seq_len, opts.seed, process_index, process_count)

    return make


def main(argv: list[str]) -> None:
    entry.start(argv)
    with entry.user_errors():  # the only place flags are read
        sft = flag_gen.settings_from_flags(SFTSettings)
        settings = flag_gen.settings_from_flags(train.TrainSettings)
        opts = run_lib.RunSettings(**flag_gen.settings_values(run_lib.RunSettings, names=_RUN_FIELDS), data=sft.data)
        cfg: Config = init_weights.init_config(init=sft.init, hf_dir=sft.hf_dir,
                                               preset=FLAGS[flag_gen.CONFIG_FLAG].value,
                                               overrides=flag_gen.config_overrides())
        docs, skipped = chat_documents(sft, opts.seq_len, opts.seed)
    print(f"chat data: {len(docs)} conversations, {sum(len(d) for d in docs):,} tokens, "
          f"{int(sum(d.loss_weights.sum() for d in docs)):,} with a loss; {skipped.summary()}", flush=True)
    if not (sft.init or sft.hf_dir):
        print("no --init / --hf_dir: fine-tuning a new, untrained model", flush=True)
    source = sft.init or sft.hf_dir
    model_name = f"{os.path.basename(os.path.normpath(source)) if source else FLAGS[flag_gen.CONFIG_FLAG].value}_sft"
    workdir = entry.workdir(opts, model_name)
    entry.train(lambda: run_lib.setup(
        cfg, settings, opts, workdir=workdir, model_name=model_name, data_source=sft_data_source(docs, opts),
        initial_state=init_weights.weights_loader(init=sft.init, hf_dir=sft.hf_dir, cfg=cfg, settings=settings,
                                                  seed=opts.seed)))


if __name__ == "__main__":
    define_flags()
    app.run(main)
