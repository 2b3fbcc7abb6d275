"""Raw documents -> tokenized ArrayRecord shards plus a small `manifest.json`.

What a document is, per input format:
- txt: one file is one document (a book, a play, a web page). Put many short documents in jsonl or parquet.
- jsonl: one JSON object per line; the document is the string under `text_field`. Blank lines are ignored;
  lines that are not JSON objects with a string `text_field` are skipped and counted as malformed.
- parquet: one row per document, column `text_field` (string or binary); nulls count as empty. Needs
  pyarrow, an optional dependency.

Every document is kept whole: int32 little-endian ids BOS + text + EOS, stored as consecutive records of
at most `CHUNK_TOKENS` ids each, so that the loader reads only the few records a training piece needs,
however long the document (a 1M-token book costs the same per piece as a short page). Very long
documents are not cut or truncated here; the loader splits them into `seq_len` pieces. Invalid UTF-8
bytes become U+FFFD and are counted; empty (whitespace-only) documents are skipped and counted.

Crash safety: shards and the lengths file are written under temporary names and renamed once complete;
`manifest.json` is written last by an atomic rename and only then are files of an older run in the same
directory deleted. A manifest therefore always points at complete files: an interrupted run leaves the
previous dataset (or none) in place, plus `.tmp` files that the next run removes.

Layout of a prepared directory: `manifest.json`, `<run>-<i>-of-<n>.array_record` shards (documents dealt
round-robin, each as ceil(length / chunk_tokens) consecutive records), and `<run>-lengths.npy` (int64
token count of every document, in shard-major order, the order of the records).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from deepseek_v4 import tokenizer as tokenizer_lib

FORMATS = ("txt", "jsonl", "parquet")
_EXTENSIONS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_RECORD_DTYPE = np.dtype("<i4")
CHUNK_TOKENS = 8192  # ids per record (32 KiB before compression)
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access to any document
_TMP_NAME = re.compile(r"^[0-9a-f]{8}-.*\.tmp$")
_BATCH_CHARS = 1 << 20  # text handed to the encoder at once
_NO_DOCUMENTS = "no non-empty documents to write"


@dataclasses.dataclass
class ReadStats:
    """Counts of what reading the input found."""

    documents: int = 0  # non-empty documents kept
    empty_skipped: int = 0
    replaced_bytes: int = 0  # invalid UTF-8 bytes replaced by U+FFFD
    malformed_records: int = 0  # jsonl lines without a JSON object holding a string `text_field`


def resolve_inputs(paths: Sequence[str], fmt: str | None = None) -> list[tuple[str, str]]:
    """Expands directories and checks every input; returns [(file, format)].

    Args:
        paths: files or directories (a directory contributes its files with a known extension, sorted).
        fmt: "txt", "jsonl" or "parquet" for every file; None infers it from each file's extension.

    Raises:
        ValueError: an input is missing, unreadable, or of unknown format (one-line message).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not paths:
        raise ValueError("no input given")
    out = []
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"input not found: {path}")
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
            files = [os.path.join(path, n) for n in names if _format_of(n) and fmt in (None, _format_of(n))]
            if not files:
                raise ValueError(f"input directory has no {fmt or 'txt/jsonl/parquet'} files: {path}")
        else:
            files = [path]
        for f in files:
            if not os.access(f, os.R_OK) or not os.path.isfile(f):
                raise ValueError(f"input not readable: {f}")
            file_fmt = fmt or _format_of(f)
            if file_fmt is None:
                raise ValueError(f"cannot infer the format of {f} from its extension; pass the format explicitly")
            out.append((f, file_fmt))
    return out


def _format_of(path: str) -> str | None:
    return _EXTENSIONS.get(os.path.splitext(path)[1].lower())


def _decode(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        escaped = raw.decode("utf-8", "surrogateescape")
        stats.replaced_bytes += len(re.findall("[\udc80-\udcff]", escaped))
        return raw.decode("utf-8", "replace")


def iter_documents(inputs: Sequence[tuple[str, str]], text_field: str, stats: ReadStats) -> Iterator[tuple[str, int]]:
    """Yields (document text, input bytes consumed since the previous yield), updating `stats`.

    Readers yield a str per document ("" or whitespace = empty, counted and skipped) and None for input
    that is not a document (a blank jsonl line, or a malformed one, which the reader counts); the bytes of
    skipped input are carried into the next yield, and a final ("", n) carries what is left.
    """
    carried = 0
    for path, fmt in inputs:
        reader = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet}[fmt]
        for text, nbytes in reader(path, text_field, stats):
            carried += nbytes
            if text is None:
                continue
            if not text.strip():
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            yield text, carried
            carried = 0
    if carried:
        yield "", carried


def _read_txt(path: str, text_field: str, stats: ReadStats) -> Iterator[tuple[str | None, int]]:
    with open(path, "rb") as f:
        raw = f.read()
    yield _decode(raw, stats), len(raw)


def _read_jsonl(path: str, text_field: str, stats: ReadStats) -> Iterator[tuple[str | None, int]]:
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                yield None, len(line)
                continue
            try:
                record = json.loads(_decode(line, stats))
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get(text_field), str):
                yield record[text_field], len(line)
            else:
                stats.malformed_records += 1
                yield None, len(line)


def _read_parquet(path: str, text_field: str, stats: ReadStats) -> Iterator[tuple[str | None, int]]:
    try:
        import pyarrow.parquet as pq  # optional dependency
    except ImportError:
        raise ValueError("reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001  (pyarrow raises several unrelated types for a corrupt file)
        raise ValueError(f"not a readable parquet file: {path} ({type(e).__name__}: {e})") from None
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
    done = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        per_row = size // rows
        for v in batch.column(0).to_pylist():
            done += per_row
            yield ("" if v is None else _decode(v, stats) if isinstance(v, bytes) else str(v)), per_row
    yield None, size - done


def _text_batches(docs: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    batch, chars, nbytes = [], 0, 0
    for text, consumed in docs:
        nbytes += consumed
        if text:
            batch.append(text)
            chars += len(text)
        if chars >= _BATCH_CHARS:
            yield batch, nbytes
            batch, chars, nbytes = [], 0, 0
    if batch or nbytes:
        yield batch, nbytes


def _encode_batch(item: tuple[list[str], int]) -> tuple[list[np.ndarray], int]:
    texts, nbytes = item
    return (tokenizer_lib.get_tokenizer().encode_documents(texts) if texts else []), nbytes


def encode_stream(
    batches: Iterable[tuple[list[str], int]], tok: tokenizer_lib.Tokenizer, workers: int
) -> Iterator[tuple[list[np.ndarray], int]]:
    """Tokenizes text batches in order, in this process or in `workers` spawned processes."""
    if workers <= 1:
        for texts, nbytes in batches:
            yield (tok.encode_documents(texts) if texts else []), nbytes
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending = collections.deque()
        for item in batches:  # a bounded window keeps memory flat on large inputs
            pending.append(pool.submit(_encode_batch, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a prepared directory.

    Raises:
        ValueError: no manifest (not prepared, or preparation did not finish) or an unknown format version.
    """
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"not a prepared dataset (no {MANIFEST}): {directory}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable manifest {path}: {e}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def write_dataset(
    docs: Iterable[np.ndarray],
    output_dir: str,
    *,
    tokenizer_id: str,
    num_shards: int = 8,
    metadata: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Writes tokenized documents (each BOS + ids + EOS) as shards + lengths + manifest; returns the manifest.

    Args:
        docs: int token arrays, one per document, in order.
        output_dir: created if needed. An older dataset there stays valid until the new manifest replaces it.
        tokenizer_id: recorded in the manifest (`Tokenizer.identifier`).
        num_shards: at most this many shards (fewer when there are fewer documents).
        metadata: returns more manifest entries; called once `docs` is exhausted (for input statistics).

    Raises:
        ValueError: no documents, or a bad argument.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):  # leftovers of interrupted runs
        if _TMP_NAME.match(name):
            os.remove(os.path.join(output_dir, name))
    run = secrets.token_hex(4)
    tmp_paths = [os.path.join(output_dir, f"{run}-{i:05d}.array_record.tmp") for i in range(num_shards)]
    lengths = [[] for _ in range(num_shards)]
    writers = []
    try:
        writers = [ArrayRecordWriter(p, _WRITER_OPTIONS) for p in tmp_paths]
        for i, doc in enumerate(docs):
            doc = np.asarray(doc)
            if doc.ndim != 1 or doc.size < 2:
                raise ValueError(f"document {i} is not a 1-D token array of BOS + ids + EOS")
            raw = doc.astype(_RECORD_DTYPE)
            for start in range(0, raw.size, CHUNK_TOKENS):
                writers[i % num_shards].write(raw[start : start + CHUNK_TOKENS].tobytes())
            lengths[i % num_shards].append(raw.size)
        for w in writers:
            w.close()
        writers = []
        kept = [i for i in range(num_shards) if lengths[i]]
        for i in set(range(num_shards)) - set(kept):
            os.remove(tmp_paths[i])
        if not kept:
            raise ValueError(_NO_DOCUMENTS)
        shards = []
        for j, i in enumerate(kept):
            name = f"{run}-{j:05d}-of-{len(kept):05d}.array_record"
            _fsync(tmp_paths[i])
            os.rename(tmp_paths[i], os.path.join(output_dir, name))
            records = int(np.sum(-(-np.asarray(lengths[i]) // CHUNK_TOKENS)))
            shards.append({"path": name, "documents": len(lengths[i]), "records": records})
        all_lengths = np.concatenate([np.asarray(lengths[i], np.int64) for i in kept])
        lengths_name = f"{run}-lengths.npy"
        npy = io.BytesIO()
        np.save(npy, all_lengths)
        _atomic_write(os.path.join(output_dir, lengths_name), npy.getvalue())
    except BaseException:
        for w in writers:
            with contextlib.suppress(Exception):
                w.close()
        for p in tmp_paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        raise
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_id,
        "vocab_size": tokenizer_lib.VOCAB_SIZE,
        "bos_id": tokenizer_lib.BOS_ID,
        "eos_id": tokenizer_lib.EOS_ID,
        "dtype": "int32",
        "chunk_tokens": CHUNK_TOKENS,
        "documents": int(all_lengths.size),
        "tokens": int(all_lengths.sum()),
        "max_document_tokens": int(all_lengths.max()),
        "shards": shards,
        "lengths": lengths_name,
        **(metadata() if metadata else {}),
    }
    old = _referenced_files(output_dir)
    _atomic_write(os.path.join(output_dir, MANIFEST), json.dumps(manifest, indent=2).encode())
    for name in old - _referenced_files(output_dir):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, name))
    return manifest


def _referenced_files(directory: str) -> set[str]:
    try:
        manifest = read_manifest(directory)
    except ValueError:
        return set()
    return {s["path"] for s in manifest["shards"]} | {manifest["lengths"]}


def prepare(
    inputs: Sequence[str],
    output_dir: str,
    *,
    fmt: str | None = None,
    text_field: str = "text",
    num_shards: int = 8,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenizes raw documents into a prepared directory; returns its manifest.

    Args:
        inputs: files or directories (see `resolve_inputs`).
        output_dir: the prepared directory.
        fmt: input format for every file, or None to infer it from extensions.
        text_field: the jsonl key / parquet column holding the text.
        num_shards: at most this many ArrayRecord shards.
        workers: tokenizer processes (1 = in this process).
        progress: show a tqdm bar (bytes of input, with rate and ETA).

    Raises:
        ValueError: bad input (one-line message).
    """
    resolved = resolve_inputs(inputs, fmt)
    tok = tokenizer_lib.get_tokenizer()
    stats = ReadStats()
    total_bytes = sum(os.path.getsize(p) for p, _ in resolved)
    start = time.perf_counter()
    bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    counts = {"docs": 0, "tokens": 0}

    def token_docs() -> Iterator[np.ndarray]:
        batches = _text_batches(iter_documents(resolved, text_field, stats))
        for encoded, nbytes in encode_stream(batches, tok, workers):
            counts["docs"] += len(encoded)
            counts["tokens"] += sum(doc.size for doc in encoded)
            bar.set_postfix(docs=counts["docs"], tokens=counts["tokens"], refresh=False)
            bar.update(nbytes)
            yield from encoded

    def metadata() -> dict[str, Any]:
        return {
            "inputs": [p for p, _ in resolved],
            "text_field": text_field,
            "read_stats": dataclasses.asdict(stats),
            "seconds": round(time.perf_counter() - start, 3),
        }

    try:
        return write_dataset(
            token_docs(), output_dir, tokenizer_id=tok.identifier, num_shards=num_shards, metadata=metadata
        )
    except ValueError as e:
        if str(e) == _NO_DOCUMENTS:
            raise ValueError(f"no non-empty documents in the input ({_describe(stats)})") from None
        raise
    finally:
        bar.close()


def _describe(stats: ReadStats) -> str:
    return (
        f"{stats.empty_skipped} empty skipped, {stats.malformed_records} malformed, "
        f"{stats.replaced_bytes} invalid UTF-8 bytes replaced"
    )


def prepare_cached(
    cache_dir: str, name: str, splits: dict[str, Sequence[str]], *, fmt: str = "txt", progress: bool = True
) -> str:
    """Prepares `splits` ({split: input files}) once into `cache_dir/name/<split>/`; returns `cache_dir/name`.

    Safe when several processes call it at once: they serialise on a lock file where the OS supports it,
    and each builds in a private temporary directory that is renamed into place atomically, so a reader
    never sees a half-built corpus and a loser of the rename race simply uses the winner's copy.
    """
    final = os.path.join(cache_dir, name)
    if _complete(final, splits):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    with _file_lock(os.path.join(cache_dir, f".{name}.lock")):
        if _complete(final, splits):
            return final
        if os.path.exists(final):
            raise ValueError(f"{final} exists but is not a complete prepared corpus; delete it to rebuild")
        tmp = os.path.join(cache_dir, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            for split, files in splits.items():
                prepare(files, os.path.join(tmp, split), fmt=fmt, num_shards=4, progress=progress)
            try:
                os.rename(tmp, final)
            except OSError:
                if not _complete(final, splits):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(directory: str, splits: dict[str, Sequence[str]]) -> bool:
    return all(os.path.isfile(os.path.join(directory, s, MANIFEST)) for s in splits)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock on this OS: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
