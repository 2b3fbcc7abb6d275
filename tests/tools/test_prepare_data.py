"""tools/prepare_data and the library behind it: formats, bad input, crash safety, the command line."""

import os
import subprocess
import sys

import numpy as np
import pytest

from deepseek_v4 import data
from deepseek_v4 import tokenizer as tokenizer_lib
from deepseek_v4.corpus import prepare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _documents(directory):
    """Decoded documents of a prepared directory, in record order."""
    ds = data.open_dataset(str(directory))
    reader = data.DocumentReader(ds)
    docs = [reader.read(d) for d in range(ds.lengths.size)]
    tok = tokenizer_lib.get_tokenizer()
    assert all(d[0] == 0 and d[-1] == 1 for d in docs)
    return [tok.decode(d[1:-1]) for d in docs]


def test_txt_and_jsonl_with_bad_input_counted(tmp_path):
    (tmp_path / "play.txt").write_bytes(b"To be, or not to be.\n\nThat is the question.")
    (tmp_path / "bad.txt").write_bytes(b"bad \xff\xfe bytes")
    (tmp_path / "blank.txt").write_bytes(b"  \n\t\n")
    (tmp_path / "docs.jsonl").write_bytes(
        b'{"text": "first"}\n\n{"text": ""}\nnot json\n{"body": "no text"}\n{"text": "caf\\u00e9"}\n'
    )
    out = tmp_path / "out"
    manifest = prepare.prepare([str(tmp_path)], str(out), num_shards=2, progress=False)
    assert manifest["read_stats"] == {"documents": 4, "empty_skipped": 2, "replaced_bytes": 2, "malformed_records": 2}
    assert manifest["documents"] == 4 and len(manifest["shards"]) == 2
    assert manifest["tokenizer"] == tokenizer_lib.get_tokenizer().identifier
    docs = _documents(out)
    assert manifest["tokens"] == sum(data.open_dataset(str(out)).lengths)
    assert sorted(docs) == sorted(
        ["bad \ufffd\ufffd bytes", "first", "café", "To be, or not to be.\n\nThat is the question."]
    )


def test_very_long_document_is_kept_whole(tmp_path):
    text = "".join(f"line {i} of a long document.\n" for i in range(3000))
    (tmp_path / "long.txt").write_text(text)
    manifest = prepare.prepare([str(tmp_path / "long.txt")], str(tmp_path / "out"), progress=False)
    assert manifest["documents"] == 1 and manifest["max_document_tokens"] == manifest["tokens"] > 20_000
    assert manifest["shards"][0]["records"] == -(-manifest["tokens"] // prepare.CHUNK_TOKENS) > 1
    assert _documents(tmp_path / "out") == [text]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"content": ["alpha", None, "", "gamma"], "other": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "d.parquet")
    manifest = prepare.prepare(
        [str(tmp_path / "d.parquet")], str(tmp_path / "out"), text_field="content", progress=False
    )
    assert manifest["read_stats"]["empty_skipped"] == 2
    assert sorted(_documents(tmp_path / "out")) == ["alpha", "gamma"]
    with pytest.raises(ValueError, match="has no column 'text'"):
        prepare.prepare([str(tmp_path / "d.parquet")], str(tmp_path / "out2"), progress=False)
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        prepare.prepare([str(tmp_path / "corrupt.parquet")], str(tmp_path / "out3"), progress=False)


def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="reading parquet needs pyarrow: pip install pyarrow"):
        prepare.prepare([str(tmp_path / "d.parquet")], str(tmp_path / "out"), progress=False)


def test_missing_unreadable_and_empty_inputs(tmp_path):
    with pytest.raises(ValueError, match="input not found: .*nope.txt"):
        prepare.prepare([str(tmp_path / "nope.txt")], str(tmp_path / "out"), progress=False)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="cannot infer the format"):
        prepare.prepare([str(tmp_path / "notes.md")], str(tmp_path / "out"), progress=False)
    with pytest.raises(ValueError, match="has no txt/jsonl/parquet files"):
        prepare.prepare([str(tmp_path)], str(tmp_path / "out"), progress=False)
    (tmp_path / "e.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="no non-empty documents in the input .*1 malformed"):
        prepare.prepare([str(tmp_path / "e.jsonl")], str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / prepare.MANIFEST).exists()
    if os.geteuid() != 0:  # root reads any file, so only an ordinary user can check permission errors
        (tmp_path / "locked.txt").write_text("x")
        os.chmod(tmp_path / "locked.txt", 0)
        with pytest.raises(ValueError, match="input not readable"):
            prepare.prepare([str(tmp_path / "locked.txt")], str(tmp_path / "out"), progress=False)


def test_interrupted_run_keeps_the_previous_dataset(tmp_path):
    out = str(tmp_path / "out")
    first = [np.array([0, 7, 8, 1]), np.array([0, 9, 1])]
    prepare.write_dataset(first, out, tokenizer_id="t", num_shards=2)
    before = data.open_dataset(out)

    def interrupted():
        yield np.array([0, 5, 1])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare.write_dataset(interrupted(), out, tokenizer_id="t", num_shards=2)
    after = data.open_dataset(out)
    assert after.identity == before.identity and after.manifest == before.manifest
    assert sorted(os.listdir(out)) == sorted(
        [prepare.MANIFEST, before.manifest["lengths"]] + [s["path"] for s in before.manifest["shards"]]
    )
    # A run killed outright leaves temporary files; the next run removes them and the old dataset's files.
    (tmp_path / "out" / "0badf00d-00000.array_record.tmp").write_bytes(b"partial")
    prepare.write_dataset([np.array([0, 5, 6, 1])], out, tokenizer_id="t", num_shards=2)
    new = data.open_dataset(out)
    assert new.manifest["documents"] == 1 and new.lengths.tolist() == [4]
    assert sorted(os.listdir(out)) == sorted(
        [prepare.MANIFEST, new.manifest["lengths"], new.manifest["shards"][0]["path"]]
    )


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tools.prepare_data", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_command_line_summary_and_one_line_errors(tmp_path):
    (tmp_path / "a.txt").write_text("Some text.")
    (tmp_path / "b.txt").write_text("More text here.")
    ok = _cli(f"--input={tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", f"--output={tmp_path / 'out'}", "--num_shards=4")
    assert ok.returncode == 0, ok.stderr
    assert "prepared 2 documents" in ok.stdout and "2 shard(s)" in ok.stdout and "tokens/s" in ok.stdout
    bad = _cli(f"--input={tmp_path / 'missing.txt'}", f"--output={tmp_path / 'out2'}")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1] == f"prepare_data: error: input not found: {tmp_path / 'missing.txt'}"
    assert "Traceback" not in bad.stderr
