r"""Accuracy of a model on a verifiable task: `python -m tools.eval_tasks --init=WORKDIR --task=arithmetic --n=100`.

Draws --n problems of --task (`deepseek_v4.verifiable_tasks`) from --seed, asks each as one user turn in the chat
--mode, decodes greedily up to --max_new_tokens and scores the completion with `answer_reward` (1 when it parses
in the chat format and its `Answer:` line equals the expected answer exactly). Prints one JSON object:

  {"source": ..., "task": ..., "mode": ..., "n": ..., "correct": ..., "accuracy": ..., "parsed": ...,
   "standard_error": ...}

`standard_error` is sqrt(accuracy * (1 - accuracy) / n), the binomial standard error of the accuracy.

`parsed` is the fraction of completions that end properly (EOS) in the chat format. The default --seed (1000)
differs from the training sets' (experiments.sft's toy set and tools.make_chat_data use seed 0), but the problem
space is small: a drawn problem may also occur in a training set.

--init is a run directory (its newest checkpoint, read only; --step picks another), --hf_dir an exported
safetensors directory (the Config fields config.json cannot carry come from --config). Errors are one line on
stderr, exit status 1.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from deepseek_v4 import chat, inference, verifiable_tasks
from deepseek_v4.tokenizer import get_tokenizer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_string("init", None, "Run directory whose checkpoint to evaluate (read only).")
    flags.DEFINE_integer("step", None, "Checkpoint step of --init (default: the newest).")
    flags.DEFINE_string("hf_dir", None, "Exported safetensors directory to evaluate instead of --init.")
    flags.DEFINE_string("config", "nano", "Preset for the Config fields config.json cannot carry (--hf_dir).")
    flags.DEFINE_string("task", "arithmetic", f"Task: {', '.join(verifiable_tasks.TASKS)}.")
    flags.DEFINE_integer("n", 100, "Number of problems.")
    flags.DEFINE_string("mode", "non-think", f"Chat mode: {', '.join(chat.MODES)}.")
    flags.DEFINE_integer("seed", 1000, "Seed of the problems.")
    flags.DEFINE_integer("max_new_tokens", 32, "Most tokens generated per problem.")
    flags.DEFINE_integer("batch", 50, "Problems generated at once.")


def evaluate(model: Any, task: str, n: int, *, mode: str = "non-think", seed: int = 1000, max_new_tokens: int = 32,
             batch: int = 50) -> dict[str, Any]:
    """Greedy accuracy of `model` on `n` problems of `task` drawn from `seed` (see the module docstring)."""
    if n < 1 or batch < 1 or max_new_tokens < 1:
        raise ValueError(f"--n, --batch and --max_new_tokens must be >= 1, got {n}, {batch}, {max_new_tokens}")
    if mode not in chat.MODES:
        raise ValueError(f"unknown chat mode {mode!r}; choose one of {', '.join(chat.MODES)}")
    rng = np.random.default_rng(seed)
    problems = [verifiable_tasks.make_problem(task, rng) for _ in range(n)]
    tok = get_tokenizer()
    correct = parsed = 0
    for start in range(0, n, batch):
        group = problems[start:start + batch]
        prompts = [chat.token_ids(verifiable_tasks.prompt_messages(p), mode).tolist() for p in group]
        completions = inference.generate(model, prompts, max_new_tokens, greedy=True)
        for problem, ids in zip(group, completions):
            text = tok.decode(ids)
            correct += int(verifiable_tasks.answer_reward(problem.answer, text, mode))
            try:
                chat.parse(text, mode)
                parsed += 1
            except ValueError:
                pass
    return {"task": task, "mode": mode, "n": n, "correct": correct, "accuracy": correct / n, "parsed": parsed / n}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # Orbax logs every read at INFO
        absl_logging.set_verbosity(absl_logging.WARNING)
    from experiments.init_weights import load_model

    try:
        if (FLAGS.init is None) == (FLAGS.hf_dir is None):
            raise ValueError("give exactly one of --init and --hf_dir")
        if FLAGS.task not in verifiable_tasks.TASKS:
            raise ValueError(f"unknown task {FLAGS.task!r}; choose one of {', '.join(verifiable_tasks.TASKS)}")
        model, source = load_model(init=FLAGS.init, hf_dir=FLAGS.hf_dir, preset=FLAGS.config, step=FLAGS.step)
        result = evaluate(model, FLAGS.task, FLAGS.n, mode=FLAGS.mode, seed=FLAGS.seed,
                          max_new_tokens=FLAGS.max_new_tokens, batch=FLAGS.batch)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    standard_error = math.sqrt(result["accuracy"] * (1.0 - result["accuracy"]) / result["n"])
    print(json.dumps({"source": source, **result, "standard_error": standard_error}), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
