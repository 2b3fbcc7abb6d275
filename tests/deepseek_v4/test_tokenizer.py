"""The DeepSeek-V4 tokenizer wrapper: BOS/EOS framing, ids inside the model's rows, round trips."""

import json

import numpy as np
import pytest

from deepseek_v4 import config
from deepseek_v4 import tokenizer as tokenizer_lib

TEXT = "Hello world. Ünïcödé, 你好, こんにちは, emoji 🙂, tabs\tand\nnewlines   and    spaces 12345."


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.get_tokenizer()


def test_document_framing_and_round_trip(tok):
    doc = tok.encode_document(TEXT)
    assert doc.dtype == np.int32 and doc[0] == tokenizer_lib.BOS_ID == 0 and doc[-1] == tokenizer_lib.EOS_ID == 1
    np.testing.assert_array_equal(doc[1:-1], tok.encode(TEXT))
    assert tok.decode(doc[1:-1]) == TEXT
    assert tok.decode(doc, skip_special_tokens=True) == TEXT
    batch = tok.encode_documents([TEXT, "a"])
    np.testing.assert_array_equal(batch[0], doc)
    assert batch[1].tolist() == [0, tok.encode("a")[0], 1]


def test_is_the_real_v4_tokenizer(tok):
    # Pinned ids of the shipped DeepSeek-V4 tokenizer.json; a different tokenizer would not give these.
    assert tok.encode("hello world").tolist() == [33310, 2058]
    assert tok.encode("Hello").tolist() == [19923]
    assert tok.vocab_size == config.VOCAB_SIZE == 129280
    assert tok.identifier.startswith("deepseek-v4:")


def test_special_strings_in_text_stay_text_and_ids_fit_the_model(tok):
    with open(tokenizer_lib.tokenizer_json_path(), encoding="utf-8") as f:
        added = [t["content"] for t in json.load(f)["added_tokens"]]
    text = " ".join(added[:50] + added[-50:]) + TEXT + bytes(range(256)).decode("latin-1")
    ids = tok.encode(text)
    assert ids.max() < config.VOCAB_SIZE
    assert not np.isin(ids, [tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID]).any(), "raw text produced a control id"
    assert tok.decode(ids) == text
