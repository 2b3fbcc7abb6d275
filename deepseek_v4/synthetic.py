"""Synthetic packed batches: a learnable token pattern that needs no tokenizer and no files.

Each document is BOS, then x_0 + 2, x_1 + 2, ... with x_{i+1} = (31 x_i + 7) mod m, then EOS; documents of random
length are packed into rows in the shared batch format (`deepseek_v4.data`: int32 [B, T] `tokens`, `targets`,
`segment_ids`, `positions`). Used by the fault and multi-process tests and by `--data=synthetic`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_STATE_KEYS = ("batch_size", "seq_len", "seed", "first_row")


class SyntheticIterator:
    """Deterministic packed batches of a learnable pattern (x_{i+1} = (a * x_i + c) mod m per document).

    Row r of global batch i depends only on (seed, i, r), so every process builds exactly its own rows of the
    same global batch whatever the process count, and the state is the index of the next batch. This process
    holds global rows [first_row, first_row + batch_size).
    """

    def __init__(self, batch_size: int, seq_len: int, seed: int, vocab: int, first_row: int = 0):
        self.batch_size, self.seq_len, self.seed, self.first_row = batch_size, seq_len, seed, first_row
        self.modulus = min(vocab - 2, 997)
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        index = self.index
        self.index += 1
        b, t = self.batch_size, self.seq_len
        out = {k: np.zeros((b, t), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        for row in range(b):
            rng = np.random.default_rng([self.seed, index, self.first_row + row])
            pos, seg = 0, 0
            while pos < t:
                n = int(rng.integers(8, 2 * t))  # document length (BOS + text + EOS) before cutting to the row
                seg += 1
                x = int(rng.integers(0, self.modulus))
                doc = [0]
                for _ in range(n - 2):
                    doc.append(x + 2)
                    x = (31 * x + 7) % self.modulus
                doc.append(1)
                m = min(len(doc) - 1, t - pos)
                out["tokens"][row, pos:pos + m] = doc[:m]
                out["targets"][row, pos:pos + m] = doc[1:m + 1]
                out["segment_ids"][row, pos:pos + m] = seg
                out["positions"][row, pos:pos + m] = np.arange(m)
                pos += m
        return out

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index, "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed,
                "first_row": self.first_row}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a `get_state` dict.

        Raises:
          ValueError: the state was saved under another batch size, sequence length, seed or row range.
        """
        mine = self.get_state()
        changed = [k for k in _STATE_KEYS if state.get(k, 0) != mine[k]]
        if changed:
            raise ValueError(f"cannot resume synthetic data under different {', '.join(changed)}")
        self.index = int(state["index"])
