"""Tasks with exact answers, for SFT data and verifiable RL rewards: seeded problems, dialogues, answer checks.

    rng = np.random.default_rng(0)
    problem = make_problem("arithmetic", rng)       # Problem(task, question, answer, reasoning)
    example = dialogue(problem, "think-high")        # {"messages": [...], "mode": ..., "task": ..., "answer": ...}
    reward = answer_reward(problem.answer, completion_text, "think-high")   # 1.0 or 0.0

Every assistant answer ends with a line `Answer: <answer>`; `parse_answer` reads the last such line, and the
reward is 1 when it equals the expected answer exactly (after stripping spaces), 0 otherwise (also for a
completion that does not parse in the chat format). The data is generated here from numbers and a fixed word
list, so it can be shipped and regenerated bit for bit (`tools/make_chat_data.py` writes it as jsonl).

Tasks:
  arithmetic   a + b, a - b (two-digit operands) and a * b (one-digit by two-digit), integer answers.
  string       reverse a word, count a letter in a word, or sort a word's letters.
  next_letter  the letter after a given one in the alphabet (a-y): 25 problems, a one-token answer.
  larger       the larger of two different one-digit numbers: 90 problems, a one-token answer that is one of the
               question's two numbers (copying either one scores half of them).

The last two are small enough for a nano model to learn partly in a short SFT run, so that sampled groups of a
briefly trained policy have differing rewards (the signal GRPO learns from); see experiments/LOG.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from deepseek_v4 import chat

TASKS = ("arithmetic", "string", "next_letter", "larger")
ANSWER_PREFIX = "Answer:"

# Common English words of 3 to 8 letters: the vocabulary of the string puzzles.
WORDS = (
    "apple", "river", "stone", "cloud", "garden", "window", "planet", "silver", "orange", "forest", "bridge",
    "candle", "rocket", "pencil", "jungle", "marble", "summer", "winter", "yellow", "purple", "basket", "castle",
    "dragon", "flower", "guitar", "hammer", "island", "ladder", "mirror", "needle", "pepper", "rabbit", "saddle",
    "tunnel", "violin", "wallet", "zebra", "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "lamp",
    "book", "door", "road", "ship", "rain", "snow", "wind", "fire", "sand", "salt", "milk", "bread", "chair",
    "table", "paper", "music", "tiger", "horse", "lemon", "grape", "peach", "mango", "honey", "ocean", "valley",
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: the user's question, the exact expected answer, and a worked reasoning (for think modes)."""

    task: str
    question: str
    answer: str
    reasoning: str


def _arithmetic(rng: np.random.Generator) -> Problem:
    op = ("+", "-", "*")[int(rng.integers(3))]
    if op == "*":
        a, b = int(rng.integers(2, 10)), int(rng.integers(10, 100))
        value = a * b
        tens, ones = (b // 10) * 10, b % 10
        steps = f"{a} * {tens} = {a * tens}; {a} * {ones} = {a * ones}; {a * tens} + {a * ones} = {value}."
    else:
        a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
        value = a + b if op == "+" else a - b
        check = f"{value} - {b} = {a}" if op == "+" else f"{value} + {b} = {a}"
        steps = f"{a} {op} {b} = {value}. Check: {check}."
    return Problem("arithmetic", f"What is {a} {op} {b}?", str(value), steps)


def _string(rng: np.random.Generator) -> Problem:
    word = WORDS[int(rng.integers(len(WORDS)))]
    kind = int(rng.integers(3))
    letters = " ".join(word)
    if kind == 0:
        answer = word[::-1]
        return Problem("string", f"Reverse the word '{word}'.", answer,
                       f"The letters are {letters}. Backwards: {' '.join(answer)}.")
    if kind == 1:
        letter = word[int(rng.integers(len(word)))]
        count = word.count(letter)
        return Problem("string", f"How many times does the letter '{letter}' occur in '{word}'?", str(count),
                       f"The letters are {letters}. '{letter}' occurs {count} time(s).")
    answer = "".join(sorted(word))
    return Problem("string", f"Sort the letters of '{word}' alphabetically.", answer,
                   f"The letters are {letters}. In order: {' '.join(answer)}.")


ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _next_letter(rng: np.random.Generator) -> Problem:
    i = int(rng.integers(len(ALPHABET) - 1))
    letter, answer = ALPHABET[i], ALPHABET[i + 1]
    return Problem("next_letter", f"What letter comes after '{letter}' in the alphabet?", answer,
                   f"The alphabet goes {' '.join(ALPHABET[max(i - 2, 0): i + 3])}. After {letter} comes {answer}.")


def _larger(rng: np.random.Generator) -> Problem:
    a, b = (int(x) for x in rng.choice(10, size=2, replace=False))
    answer = max(a, b)
    return Problem("larger", f"Which is larger, {a} or {b}?", str(answer),
                   f"{answer} > {min(a, b)}, so the larger is {answer}.")


_MAKERS: dict[str, Callable[[np.random.Generator], Problem]] = {
    "arithmetic": _arithmetic, "string": _string, "next_letter": _next_letter, "larger": _larger}


def _check_task(task: str) -> None:
    if task not in _MAKERS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def make_problem(task: str, rng: np.random.Generator) -> Problem:
    """A random problem of `task` drawn from `rng` (one-line ValueError for an unknown task)."""
    _check_task(task)
    return _MAKERS[task](rng)


def prompt_messages(problem: Problem) -> list[dict[str, Any]]:
    """The conversation up to the assistant's turn (what a policy is asked)."""
    return [{"role": "user", "content": problem.question}]


def dialogue(problem: Problem, mode: str) -> dict[str, Any]:
    """One SFT example: the question and the worked answer in `mode` (reasoning only in the think modes).

    Returns a jsonl-ready dict {"messages", "mode", "task", "answer"}.
    """
    if mode not in chat.MODES:
        raise ValueError(f"unknown chat mode {mode!r}; choose one of {', '.join(chat.MODES)}")
    reply: dict[str, Any] = {"role": "assistant", "content": f"{ANSWER_PREFIX} {problem.answer}"}
    if mode != "non-think":
        reply["reasoning_content"] = problem.reasoning
    return {"messages": prompt_messages(problem) + [reply], "mode": mode, "task": problem.task,
            "answer": problem.answer}


def make_chat_set(n: int, seed: int, *, tasks: Sequence[str] = TASKS,
                  modes: Sequence[str] = chat.MODES) -> list[dict[str, Any]]:
    """`n` dialogues, tasks and modes taken in turn, problems drawn from `seed` (the same list for the same
    arguments, on every machine)."""
    if n < 0:
        raise ValueError(f"the number of examples must be >= 0, got {n}")
    if not tasks or not modes:
        raise ValueError("need at least one task and one mode")
    for t in tasks:
        _check_task(t)
    rng = np.random.default_rng(seed)
    return [dialogue(make_problem(tasks[i % len(tasks)], rng), modes[(i // len(tasks)) % len(modes)])
            for i in range(n)]


# ---- rewards -------------------------------------------------------------------------------------------------


def parse_answer(content: str) -> str | None:
    """The text after the last `Answer:` line of an assistant content, stripped; None if there is none."""
    found = None
    for line in content.splitlines():
        line = line.strip()
        if line.startswith(ANSWER_PREFIX):
            found = line[len(ANSWER_PREFIX):].strip()
    return found


def answer_reward(expected: str, completion: str, mode: str) -> float:
    """1.0 if the completion (the text generated after the generation prompt, EOS included) parses in `mode`
    and its answer equals `expected` exactly, else 0.0."""
    try:
        content = chat.parse(completion, mode)["content"]
    except ValueError:
        return 0.0
    return 1.0 if parse_answer(content) == expected.strip() else 0.0


@dataclasses.dataclass
class GroupRewards:
    """Rewards of a group of samples: `rewards` float32 [n] (0 where invalid), `valid` bool [n] (False where the
    reward function raised or returned a non-finite value), and the `errors` seen (one line each)."""

    rewards: np.ndarray
    valid: np.ndarray
    errors: list[str]

    @property
    def skipped(self) -> int:
        return int(np.sum(~self.valid))


def score_group(reward_fn: Callable[..., float], samples: Sequence[Any]) -> GroupRewards:
    """`reward_fn(sample)` for each sample; a call that raises or returns a non-finite number is a counted skip
    (`valid` False) with its one-line message kept, never an exception that ends the run."""
    rewards = np.zeros(len(samples), np.float32)
    valid = np.zeros(len(samples), bool)
    errors = []
    for i, sample in enumerate(samples):
        try:
            r = float(reward_fn(sample))
        except Exception as e:  # noqa: BLE001 - a user reward function may raise anything
            errors.append(f"sample {i}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            continue
        if not math.isfinite(r):
            errors.append(f"sample {i}: non-finite reward {r}")
            continue
        rewards[i], valid[i] = r, True
    return GroupRewards(rewards=rewards, valid=valid, errors=errors)
