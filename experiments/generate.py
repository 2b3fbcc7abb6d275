r"""Generate text from a checkpoint: a pretraining run, an export, or imported official weights.

    python -m experiments.generate --workdir=runs/nano [--step=N] --prompt="The capital of France is" --mode=raw
    python -m experiments.generate --hf_dir=export/nano --prompts_file=prompts.txt --mode=think-high

Prompts: --prompt, or --prompts_file (one prompt per line). --mode wraps each as one user turn in the chat
format (non-think, think-high, think-max; deepseek_v4/chat.py) or `raw` (BOS + the text, for pretraining
checkpoints). A single prompt streams its completion to stdout; several are printed one after another once done.
Generation stops at EOS or --max_new_tokens. Sampling defaults are V4's (temperature 1.0, top-p 1.0); --greedy
takes the argmax, --speculative drafts with the MTP head (greedy only).

The checkpoint is only read: nothing is written into the workdir (a bad checkpoint is an error, not moved aside).
Errors (no checkpoint, a checkpoint that does not match its config, an unknown mode, a prompt longer than
--max_len) are one line on stderr and exit status 1.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags

from deepseek_v4 import DeepseekV4, chat, inference
from deepseek_v4.tokenizer import BOS_ID, get_tokenizer
from experiments.init_weights import load_checkpoint, load_safetensors  # noqa: F401  (part of this module's API)

MODES = chat.MODES + ("raw",)
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory whose checkpoint to load (read-only).")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the newest).")
    flags.DEFINE_string("hf_dir", None, "Directory with config.json and *.safetensors (an export or official).")
    flags.DEFINE_string("config", "nano", "Preset for the Config fields config.json cannot carry (with --hf_dir).")
    flags.DEFINE_string("prompt", None, "The prompt text.")
    flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
    flags.DEFINE_string("mode", "non-think", f"Prompt format: {', '.join(MODES)}.")
    flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate per prompt.")
    flags.DEFINE_integer("max_len", None, "Cache size in tokens (default: longest prompt + max_new_tokens).")
    flags.DEFINE_bool("greedy", False, "Argmax decoding instead of sampling.")
    flags.DEFINE_float("temperature", inference.DEFAULT_TEMPERATURE, "Sampling temperature.")
    flags.DEFINE_float("top_p", inference.DEFAULT_TOP_P, "Nucleus sampling mass.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("speculative", False, "Self-speculative decoding with the MTP head (needs --greedy).")


def prompt_ids(text: str, mode: str) -> list[int]:
    """Token ids of one prompt: a user turn in the chat format of `mode`, or BOS + text for `raw`."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "raw":
        return [BOS_ID] + get_tokenizer().encode(text).tolist()
    return chat.token_ids([{"role": "user", "content": text}], mode).tolist()


class TextStream:
    """Prints the text of a growing token list as it becomes complete characters."""

    def __init__(self, eos: int, out=sys.stdout):
        self.ids: list[int] = []
        self.eos = eos
        self.shown = 0
        self.out = out

    def add(self, ids: list[int]) -> None:
        self.ids.extend(i for i in ids if i != self.eos)
        text = get_tokenizer().decode(self.ids)
        if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)


def run(model: DeepseekV4, prompts: list[str], mode: str, out=sys.stdout, **generate_kwargs: Any) -> list[str]:
    """Completions of `prompts` (printed to `out`: streamed for one prompt); returns their texts."""
    ids = [prompt_ids(p, mode) for p in prompts]
    eos = model.cfg.eos_token_id
    if len(prompts) == 1:
        stream = TextStream(eos, out)
        new = inference.generate(model, ids, on_step=lambda step: stream.add(step[0]), **generate_kwargs)
        out.write("\n")
    else:
        new = inference.generate(model, ids, **generate_kwargs)
    texts = [get_tokenizer().decode([t for t in n if t != eos]) for n in new]
    if len(prompts) > 1:
        for i, (p, t) in enumerate(zip(prompts, texts)):
            out.write(f"=== {i}: {p}\n{t}\n")
    out.flush()
    return texts


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        if (FLAGS.workdir is None) == (FLAGS.hf_dir is None):
            raise ValueError("give exactly one of --workdir and --hf_dir")
        if (FLAGS.prompt is None) == (FLAGS.prompts_file is None):
            raise ValueError("give exactly one of --prompt and --prompts_file")
        if FLAGS.mode not in MODES:
            raise ValueError(f"unknown mode {FLAGS.mode!r}; choose one of {', '.join(MODES)}")
        if FLAGS.prompt is not None:
            prompts = [FLAGS.prompt]
        else:
            with open(FLAGS.prompts_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
            if not prompts:
                raise ValueError(f"{FLAGS.prompts_file} holds no prompt")
        if FLAGS.workdir is not None:
            model, source = load_checkpoint(FLAGS.workdir, FLAGS.step)
        else:
            model, source = load_safetensors(FLAGS.hf_dir, FLAGS.config)
        print(f"# {source}, mode {FLAGS.mode}", file=sys.stderr)
        run(model, prompts, FLAGS.mode, max_new_tokens=FLAGS.max_new_tokens, max_len=FLAGS.max_len,
            greedy=FLAGS.greedy, temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k,
            seed=FLAGS.seed, speculative=FLAGS.speculative)
    except (ValueError, OSError) as e:
        sys.exit(f"generate: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
