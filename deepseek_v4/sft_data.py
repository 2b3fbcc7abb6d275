"""SFT data: chat jsonl -> checked conversations -> token ids and loss weights -> packed rows with per-document masks.

    examples, skipped = read_chat_jsonl(["chat.jsonl"])          # dicts {"messages", "mode"}; bad lines counted
    docs, skipped = encode_examples(examples, seq_len, include_reasoning=True)
    it = SFTIterator(docs, batch_size, seq_len, seed)             # batches of packed rows, get_state / set_state

A conversation of n token ids (`chat.token_ids_and_loss_mask`) becomes one document of n - 1 (input, target)
pairs: `tokens = ids[:-1]`, `targets = ids[1:]`, `loss_weights = mask[1:]`, so a position carries a loss exactly
when the token it predicts belongs to an assistant turn (reasoning included or not). Documents are packed in
order into rows of `seq_len` (a document that does not fit the rest of a row starts the next one) with the
batch format of docs/packing.md plus float32 `loss_weights`; the train step then averages the cross entropy over
the assistant tokens of the batch, and no document sees another (per-document masks: segment ids).

Bad data never ends a run: a line that is not JSON, has no message list, an unknown mode, messages that do not
alternate (or that the chat module rejects), no assistant token, or more tokens than `seq_len + 1` is skipped,
and the reasons are counted (`Skipped`). All lines bad is a one-line ValueError.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from deepseek_v4 import chat
from deepseek_v4.iterator_state import SettingsCheckedState


class BadExample(ValueError):
    """A chat example that cannot be trained on (the message says why, in one line)."""


@dataclasses.dataclass
class Skipped:
    """Examples left out, by reason (the first example of each reason is kept for the message)."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: how many were skipped, why, and where the first of each kind was."""
        if not self.total:
            return "skipped 0 examples"
        parts = [f"{n} {reason} (first: {self.first[reason]})" for reason, n in self.counts.most_common()]
        return f"skipped {self.total} example(s): " + "; ".join(parts)


# ---- checking and reading --------------------------------------------------------------------------------


def check_turns(messages: Any) -> None:
    """Raise `BadExample` unless the conversation alternates user and assistant turns and ends with an assistant.

    After optional system messages, turns go user, assistant, user, assistant, ...; tool messages may only follow
    an assistant message with tool calls (or another tool message) and are followed by an assistant message;
    latest_reminder messages are ignored for the order. The chat module checks the fields of each message.
    """
    if not isinstance(messages, list) or not messages:
        raise BadExample("messages must be a non-empty list")
    expected, seen_turn = "user", False  # expected: user, assistant, tool, or tool_or_assistant
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "latest_reminder":
            continue
        if role == "system":
            if seen_turn:
                raise BadExample(f"message {i}: a system message after the conversation started")
            continue
        seen_turn = True
        if role == "tool":
            if expected not in ("tool", "tool_or_assistant"):
                raise BadExample(f"message {i}: a tool message must follow an assistant message with tool calls")
            expected = "tool_or_assistant"
        elif role == "assistant" and expected in ("assistant", "tool_or_assistant"):
            expected = "tool" if m.get("tool_calls") else "user"
        elif role == "user" and expected == "user":
            expected = "assistant"
        elif expected == "tool":
            raise BadExample(f"message {i}: tool calls must be followed by tool messages, got {role!r}")
        else:
            want = "assistant" if expected == "tool_or_assistant" else expected
            raise BadExample(f"message {i}: turns do not alternate (expected {want}, got {role!r})")
    if expected == "tool":
        raise BadExample("the conversation ends with tool calls that have no results")
    if expected != "user":
        raise BadExample("the conversation must end with an assistant message")


def check_example(example: Any) -> tuple[list[dict[str, Any]], str]:
    """(messages, mode) of one jsonl object, or `BadExample`."""
    if not isinstance(example, dict):
        raise BadExample(f"a line must be a JSON object, got {type(example).__name__}")
    mode = example.get("mode")
    if mode not in chat.MODES:
        raise BadExample(f"unknown mode {mode!r}; expected one of {', '.join(chat.MODES)}")
    messages = example.get("messages")
    check_turns(messages)
    return messages, mode


def _reason(message: str) -> str:
    """The kind of a skip message, for counting: its text without a 'message i' head and without the values."""
    head = message.split(": ", 1)[1] if message.startswith("message ") and ": " in message else message
    for cut in (" (", ";", ": ", " '", ", got"):
        head = head.split(cut)[0]
    return head


def read_chat_jsonl(paths: Sequence[str], skipped: Skipped | None = None) -> tuple[list[dict[str, Any]], Skipped]:
    """The well-formed JSON objects of jsonl files (blank lines ignored); unparseable lines are counted skips.

    Raises:
      ValueError: a file cannot be read (one line).
    """
    skipped = skipped or Skipped()
    out = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.readlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read chat data {path}: {e}") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                out.append(dict(json.loads(line), _where=f"{path}:{n}"))
            except (ValueError, TypeError):
                skipped.add("not a JSON object", f"{path}:{n}")
    return out, skipped


# ---- encoding ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Document:
    """One conversation as training pairs: tokens / targets int32 [n], loss_weights float32 [n]."""

    tokens: np.ndarray
    targets: np.ndarray
    loss_weights: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def to_document(ids: np.ndarray, mask: np.ndarray) -> Document:
    """Token ids [n] and the chat loss mask [n] -> a document of n - 1 pairs (see the module docstring)."""
    return Document(tokens=np.asarray(ids[:-1], np.int32), targets=np.asarray(ids[1:], np.int32),
                    loss_weights=np.asarray(mask[1:], np.float32))


def encode_examples(examples: Iterable[dict[str, Any]], seq_len: int, *, include_reasoning: bool = True,
                    skipped: Skipped | None = None) -> tuple[list[Document], Skipped]:
    """Check and tokenize each example; bad ones are counted in `skipped` (see the module docstring).

    Raises:
      ValueError: no example is usable (one line, with the reasons).
    """
    skipped = skipped or Skipped()
    docs = []
    for i, ex in enumerate(examples):
        where = ex.get("_where", f"example {i}") if isinstance(ex, dict) else f"example {i}"
        try:
            messages, mode = check_example(ex)
            ids, mask = chat.token_ids_and_loss_mask(messages, mode, include_reasoning=include_reasoning)
        except ValueError as e:  # BadExample or the chat module's one-line errors
            skipped.add(_reason(str(e)), f"{where}: {e}")
            continue
        if len(ids) - 1 > seq_len:
            skipped.add("longer than --seq_len", f"{where}: {len(ids)} tokens")
            continue
        doc = to_document(ids, mask)
        if not doc.loss_weights.any():
            skipped.add("no assistant token to train on", where)
            continue
        docs.append(doc)
    if not docs:
        raise ValueError(f"no usable chat example: {skipped.summary()}")
    return docs, skipped


# ---- packing ----------------------------------------------------------------------------------------------

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_weights")


def empty_rows(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding rows in the batch format. [rows, seq_len] each."""
    out = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
    out["loss_weights"] = np.zeros((rows, seq_len), np.float32)
    return out


def place(batch: dict[str, np.ndarray], row: int, start: int, segment: int, doc: Document) -> None:
    """Write `doc` into `batch` at `row`, columns [start, start + len(doc)), as segment `segment`."""
    end = start + len(doc)
    batch["tokens"][row, start:end] = doc.tokens
    batch["targets"][row, start:end] = doc.targets
    batch["loss_weights"][row, start:end] = doc.loss_weights
    batch["segment_ids"][row, start:end] = segment
    batch["positions"][row, start:end] = np.arange(len(doc))


def pack(docs: Sequence[Document], seq_len: int) -> dict[str, np.ndarray]:
    """All of `docs` packed in order into as few rows as the in-order rule gives. [rows, seq_len] each."""
    rows: list[list[Document]] = [[]]
    used = 0
    for d in docs:
        if len(d) > seq_len:
            raise ValueError(f"a document of {len(d)} tokens does not fit rows of {seq_len}")
        if used + len(d) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(d)
        used += len(d)
    batch = empty_rows(len(rows), seq_len)
    for r, row in enumerate(rows):
        start = 0
        for segment, d in enumerate(row, start=1):
            place(batch, r, start, segment, d)
            start += len(d)
    return batch


def _fingerprint(docs: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.tokens.tobytes())
        h.update(d.loss_weights.tobytes())
    return h.hexdigest()[:16]


class SFTIterator(SettingsCheckedState):
    """Endless batches of packed rows: each epoch visits every document once, in an order shuffled by
    (seed, epoch). Every process packs the same global batch and keeps its own `batch_size // process_count`
    rows. The state (JSON) is the position in the document order; it is checked against the data and settings on
    restore (`get_state` / `set_state`, `iterator_state.SettingsCheckedState`)."""

    resume_error = "cannot resume the SFT data under different data or settings ({detail})"

    def __init__(self, docs: Sequence[Document], batch_size: int, seq_len: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if batch_size % process_count:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by the process count ({process_count})")
        if not docs:
            raise ValueError("no documents to train on")
        longest = max(len(d) for d in docs)
        if longest > seq_len:
            raise ValueError(f"a document of {longest} tokens does not fit rows of {seq_len}")
        self.docs, self.batch_size, self.seq_len, self.seed = list(docs), batch_size, seq_len, seed
        self.per_process = batch_size // process_count
        self.first_row = process_index * self.per_process
        self.settings = {"documents": len(self.docs), "data": _fingerprint(self.docs), "batch_size": batch_size,
                         "seq_len": seq_len, "seed": seed, "process_count": process_count}
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))

    def _next_doc(self) -> Document:
        if self.cursor == len(self.docs):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        return self.docs[self._order[self.cursor]]

    def __iter__(self) -> SFTIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = empty_rows(self.batch_size, self.seq_len)
        for row in range(self.batch_size):
            start, segment = 0, 1
            while True:
                doc = self._next_doc()
                if start + len(doc) > self.seq_len:
                    break
                place(batch, row, start, segment, doc)
                start, segment = start + len(doc), segment + 1
                self.cursor += 1
        return {k: v[self.first_row:self.first_row + self.per_process] for k, v in batch.items()}

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore_position(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
