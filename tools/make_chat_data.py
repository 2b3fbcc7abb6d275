"""Write the toy chat set: seeded dialogues of the verifiable tasks (arithmetic, string puzzles, next letter,
larger number) with exact answers, in the three modes.

    python -m tools.make_chat_data --output=chat.jsonl [--examples=2000] [--seed=0]
        [--tasks=arithmetic,string,next_letter,larger]
        [--modes=non-think,think-high,think-max]

One JSON object per line: {"messages": [...], "mode": ..., "task": ..., "answer": ...}, the format that
`python -m experiments.sft --data=chat.jsonl` reads (extra keys are ignored there). The same arguments give the
same file on every machine (`deepseek_v4.verifiable_tasks.make_chat_set`); `--data=toy` builds the default set
in memory.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from deepseek_v4 import chat, verifiable_tasks

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command-line flags (defined only when run as a program, so tests can import this module)."""
    flags.DEFINE_string("output", None, "Output jsonl file.")
    flags.DEFINE_integer("examples", 2000, "Number of dialogues.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of the problems.")
    flags.DEFINE_list("tasks", list(verifiable_tasks.TASKS), "Tasks, taken in turn.")
    flags.DEFINE_list("modes", list(chat.MODES), "Chat modes, taken in turn.")
    flags.mark_flags_as_required(["output"])


def write_chat_set(path: str, examples: list[dict]) -> None:
    """Write `examples` as jsonl (atomically: a temporary file renamed at the end)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        examples = verifiable_tasks.make_chat_set(FLAGS.examples, FLAGS.seed, tasks=FLAGS.tasks, modes=FLAGS.modes)
        write_chat_set(FLAGS.output, examples)
    except (ValueError, OSError) as e:
        sys.exit(f"make_chat_data: error: {e}")
    print(f"wrote {len(examples)} dialogues to {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
