"""The grain input pipeline: prepared datasets -> weighted mixture -> packed rows -> per-process batches.

Data flow (one process):
1. Pieces. A prepared document d (BOS + text + EOS, `n` ids) gives `n - 1` (input, target) pairs: inputs
   d[:-1], targets d[1:]. They are cut into pieces of at most `seq_len` pairs, piece k holding inputs
   d[k*T : (k+1)*T] and targets d[k*T+1 : (k+1)*T+1], so no token is dropped and a target never comes from
   another document. Every piece restarts its positions at 0: a long document is trained on as windows
   of at most T tokens, never attending across a piece boundary.
2. Order. Piece indices are shuffled with a seeded permutation, a fresh one per epoch. Process p of P takes
   positions p, p + P, p + 2P, ... of the endless stream epoch 0, epoch 1, ..., so the processes' pieces are
   disjoint and together cover every epoch exactly once.
3. Mixture. Datasets are interleaved deterministically (grain `MapDataset.mix`). `weights` are token
   shares: each dataset's piece rate is its weight divided by its mean piece length.
4. Packing. Online best fit into rows of `seq_len` (`BestFitPack`): each piece joins the open row it fills
   most tightly, full rows leave at once, and the fullest row leaves when a piece fits nowhere. On the
   embedded corpus at T=1024 this leaves 0.09% padding, against 0.76% for grain's BestFitPackIterDataset,
   which flushes all its bins whenever one piece does not fit (experiments/LOG.md).
5. Batches of `batch_size` rows (per process), in the shared batch format: int32 [B, T] `tokens`,
   `targets`, `segment_ids` (1, 2, ... per piece within a row; 0 = padding) and `positions`. A finite run
   (`num_epochs`) pads its last batch with padding rows. (The format allows an optional float32 [B, T]
   `loss_weights`, each token's weight in the loss, see `train.train_step`; pretraining batches leave it out.)
6. Optional multi-process prefetch (`num_workers` > 0): each worker runs steps 4-5 on a slice of the
   stream. Grain workers read absl flags, so the program must run under `absl.app.run` (or have parsed
   its flags); `num_workers=0` works everywhere.

Checkpointing: `DataIterator.get_state()` / `set_state()` give a small JSON-able dict, and
`checkpoint_args` gives the Orbax args; after a restore, the batches equal those of an uninterrupted run.
`carry_position` moves a position to a pipeline that differs only in batch size (a batch-size ramp).
The state records the pipeline's settings; restoring under different ones (another process count, seq_len,
batch size, seed, worker count, weights or datasets) raises ValueError instead of silently repeating or
skipping data. To continue on a different process count, start a fresh iterator with a new seed.

Multi-process evaluation: a finite run gives each process a data-dependent number of batches; to keep
processes in step, evaluate a fixed number of batches from an endless (`num_epochs=None`) iterator.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from deepseek_v4.corpus import prepare
from deepseek_v4.corpus.shakespeare import default_corpus  # noqa: F401  (part of this module's API)
from deepseek_v4.iterator_state import settings_changes
from sharding import host_data

PACKING_BINS = 64  # open rows of the packer; see experiments/LOG.md for the efficiency it gives
READ_THREADS = 2  # reader threads and their buffer: measured best on 2 cores (a larger buffer costs more per item)
READ_BUFFER = 64
BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared directory opened for reading.

    Attributes:
        path: the directory.
        manifest: its manifest.json.
        lengths: [num_documents] int64 token count of every document (BOS and EOS included).
        shard_paths: the ArrayRecord shards, in record order.
    """

    path: str
    manifest: dict[str, Any]
    lengths: np.ndarray
    shard_paths: tuple[str, ...]

    @property
    def identity(self) -> str:
        """Names this exact content (the run id of its files), independent of where it lies on disk."""
        return f"{self.manifest['lengths'].split('-')[0]}:{self.manifest['documents']}:{self.manifest['tokens']}"


def open_dataset(path: str) -> PreparedDataset:
    """Opens a directory written by `tools.prepare_data` (or `default_corpus`).

    Raises:
        ValueError: not a prepared directory, or its files are missing.
    """
    manifest = prepare.read_manifest(path)
    shard_paths = tuple(os.path.join(path, s["path"]) for s in manifest["shards"])
    missing = [p for p in shard_paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"prepared dataset {path} is missing {len(missing)} shard(s), e.g. {missing[0]}")
    lengths = np.load(os.path.join(path, manifest["lengths"]))
    if lengths.size != manifest["documents"]:
        raise ValueError(f"prepared dataset {path}: lengths file does not match the manifest")
    return PreparedDataset(path, manifest, lengths, shard_paths)


class DocumentReader:
    """Random access to token ranges of a prepared dataset's documents; reads only the records holding them.

    Picklable (grain workers receive a copy); the ArrayRecord reader is opened lazily in each process.
    """

    def __init__(self, ds: PreparedDataset):
        self._shards = ds.shard_paths
        self._chunk = int(ds.manifest["chunk_tokens"])
        self._lengths = ds.lengths
        records = -(-ds.lengths // self._chunk)  # [docs] records per document
        self._first_record = np.concatenate([[0], np.cumsum(records)[:-1]])  # [docs]
        if int(records.sum()) != sum(s["records"] for s in ds.manifest["shards"]):
            raise ValueError(f"prepared dataset {ds.path}: lengths file does not match the shards' records")
        self._source = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Ids [start, stop) of document `doc` (default: all of it). Shapes: -> [stop - start] int32."""
        stop = int(self._lengths[doc]) if stop is None else stop
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(list(self._shards))
        first, last = start // self._chunk, (stop - 1) // self._chunk
        base = int(self._first_record[doc])
        parts = [np.frombuffer(self._source[base + r], dtype="<i4") for r in range(first, last + 1)]
        ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
        offset = start - first * self._chunk
        return ids[offset : offset + stop - start].astype(np.int32)


class PieceSource:
    """The pieces of one dataset in this process's order: `source(k)` is this process's k-th piece.

    Picklable, like `DocumentReader`.
    """

    def __init__(self, ds: PreparedDataset, seq_len: int, seed: int, process_index: int, process_count: int):
        self._reader = DocumentReader(ds)
        self._lengths = ds.lengths
        self._seq_len = seq_len
        self._seed = seed
        self._process_index = process_index
        self._process_count = process_count
        pairs = ds.lengths - 1  # [docs] (input, target) pairs per document
        self._cum_pieces = np.cumsum(-(-pairs // seq_len))  # [docs] pieces up to and including each doc
        self.num_pieces = int(self._cum_pieces[-1])
        self.mean_piece_tokens = float(pairs.sum()) / self.num_pieces

    def stream_length(self, num_epochs: int | None) -> int:
        """How many pieces this process reads in `num_epochs` (None: endless)."""
        total = sys.maxsize if num_epochs is None else num_epochs * self.num_pieces
        return max(0, -(-(total - self._process_index) // self._process_count))

    def piece_index(self, k: int) -> int:
        """Index of this process's k-th piece in the dataset's piece list."""
        epoch, i = divmod(k * self._process_count + self._process_index, self.num_pieces)
        seed = (self._seed + epoch) % 2**32
        return int(grain.experimental.index_shuffle(i, max_index=self.num_pieces - 1, seed=seed, rounds=4))

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        j = self.piece_index(k)
        doc = int(np.searchsorted(self._cum_pieces, j, side="right"))
        start = (j - (int(self._cum_pieces[doc - 1]) if doc else 0)) * self._seq_len
        stop = min(start + self._seq_len, int(self._lengths[doc]) - 1)
        ids = self._reader.read(doc, start, stop + 1)  # [n + 1]: inputs and the targets shifted by one
        return {"tokens": ids[:-1], "targets": ids[1:]}  # [n], [n] with n <= T


def _with_index(index: int, piece: dict[str, np.ndarray]) -> dict[str, Any]:
    return {**piece, "index": index}


class BestFitPack(grain.IterDataset):
    """Packs pieces (dicts with `tokens`, `targets` [<=T] and their stream `index`) into rows of T.

    Online best fit over at most `num_bins` open rows: a piece goes to the open row it fills most tightly;
    a row is emitted as soon as it is full; when a piece fits in no open row and all `num_bins` are open,
    the fullest row is emitted to make room. Rows whose pieces fill exactly T (every piece of a long
    document but its last) pass straight through, and short pieces keep meeting partners for as long as
    they wait, which is what makes the fill rate high. At the end of a finite stream the open rows are
    emitted, fullest first.

    The iterator's state is the parent's position plus the stream indices of the pieces still waiting in
    open rows; `source` (random access by stream index) refetches them on restore.
    """

    def __init__(self, parent: grain.IterDataset, source: grain.MapDataset, seq_len: int, num_bins: int):
        super().__init__(parent)
        self._source = source
        self._seq_len = seq_len
        self._num_bins = num_bins

    def __iter__(self) -> grain.DatasetIterator:
        return _BestFitPackIterator(self._parent.__iter__(), self._source, self._seq_len, self._num_bins)


class _BestFitPackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, source: grain.MapDataset, seq_len: int, num_bins: int):
        super().__init__(parent)
        self._source = source
        self._seq_len = seq_len
        self._num_bins = num_bins
        self._open: list[list[dict[str, Any]]] = []  # pieces of each open row, in row order
        self._used: list[int] = []  # tokens used in each open row
        self._ready: list[list[dict[str, Any]]] = []  # full rows not yet emitted (at most two at a time)

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._ready:
            try:
                piece = next(self._parent)
            except StopIteration:
                if not self._open:
                    raise
                order = sorted(range(len(self._open)), key=lambda b: -self._used[b])
                self._ready = [self._open[b] for b in order]
                self._open, self._used = [], []
                break
            self._add(piece)
        return self._row(self._ready.pop(0))

    def _add(self, piece: dict[str, Any]) -> None:
        n = len(piece["tokens"])
        best, best_free = -1, self._seq_len + 1
        for b, used in enumerate(self._used):
            free = self._seq_len - used
            if n <= free < best_free:
                best, best_free = b, free
        if best < 0:
            if len(self._open) == self._num_bins:
                fullest = max(range(len(self._used)), key=self._used.__getitem__)
                self._ready.append(self._open.pop(fullest))
                self._used.pop(fullest)
            self._open.append([])
            self._used.append(0)
            best = len(self._open) - 1
        self._open[best].append(piece)
        self._used[best] += n
        if self._used[best] == self._seq_len:
            self._ready.append(self._open.pop(best))
            self._used.pop(best)

    def _row(self, pieces: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        row = {k: np.zeros(self._seq_len, np.int32) for k in BATCH_KEYS}  # 4 x [T]
        start = 0
        for segment, piece in enumerate(pieces, start=1):
            stop = start + len(piece["tokens"])
            row["tokens"][start:stop] = piece["tokens"]
            row["targets"][start:stop] = piece["targets"]
            row["segment_ids"][start:stop] = segment
            row["positions"][start:stop] = np.arange(stop - start)
            start = stop
        return row

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "open": [[p["index"] for p in row] for row in self._open],
            "ready": [[p["index"] for p in row] for row in self._ready],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._open = [[self._source[i] for i in row] for row in state["open"]]
        self._used = [sum(len(p["tokens"]) for p in row) for row in self._open]
        self._ready = [[self._source[i] for i in row] for row in state["ready"]]


class _PadBatch:
    """Pads a short final batch with padding rows, so every batch is [batch_size, seq_len]."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self._batch_size - batch["tokens"].shape[0]
        if missing == 0:
            return batch
        return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}


class DataIterator(grain.DatasetIterator):
    """Iterator of batches whose state also records the pipeline settings, checked on restore."""

    def __init__(self, inner: grain.DatasetIterator, settings: dict[str, Any]):
        super().__init__(inner)
        self.settings = settings

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        """A JSON-able dict: the settings and grain's state."""
        return {"settings": self.settings, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state`. Raises ValueError if it was saved under different settings."""
        detail = settings_changes(state.get("settings", {}), self.settings)
        if detail:
            raise ValueError(
                f"cannot resume the data iterator under different settings ({detail}): the saved position "
                "only means the same thing in the same pipeline. Restore with the saved settings, or start a "
                "fresh iterator with a new seed (the rest of the current epoch is then not seen)."
            )
        self._parent.set_state(state["grain"])


def make_train_iterator(
    data_dirs: Sequence[str],
    weights: Sequence[float] | None,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    *,
    num_epochs: int | None = None,
) -> DataIterator:
    """Packed, shuffled, process-sharded batches from a mixture of prepared datasets.

    Args:
        data_dirs: prepared directories (all made with the same tokenizer).
        weights: token share of each dataset (any positive scale); None = in proportion to their sizes.
        seq_len: T, the row length.
        batch_size: rows per batch on this process.
        seed: drives the per-epoch piece order, the mixture and the row order.
        process_index: this process, in [0, process_count).
        process_count: processes that each call this with their own index.
        num_workers: grain prefetch processes; > 0 needs absl flags parsed (absl.app.run).
        num_epochs: None = endless; n = stop after n passes over the data (a mixture stops when its first
            dataset runs out).

    Returns:
        A `DataIterator` of dict batches, each value int32 [batch_size, seq_len].

    Shapes:
        document [n] -> pieces [<=T] -> packed rows [T] -> batch [B, T].
    """
    if not data_dirs:
        raise ValueError("no data directories given")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():
            raise ValueError("num_workers > 0 needs absl flags parsed: run the program under absl.app.run")
    datasets = [open_dataset(d) for d in data_dirs]
    tokenizers = {ds.manifest["tokenizer"] for ds in datasets}
    if len(tokenizers) > 1:
        raise ValueError(f"datasets were prepared with different tokenizers: {sorted(tokenizers)}")
    if weights is None:
        weights = [float(ds.manifest["tokens"]) for ds in datasets]
    if len(weights) != len(datasets) or any(not w > 0 for w in weights):
        raise ValueError(f"need one positive weight per dataset, got {list(weights)} for {len(datasets)} datasets")

    seeds = np.random.SeedSequence(seed).generate_state(len(datasets))
    components, rates = [], []
    for ds, w, s in zip(datasets, weights, seeds):
        source = PieceSource(ds, seq_len, int(s), process_index, process_count)
        length = source.stream_length(num_epochs)
        if length == 0:
            raise ValueError(f"{ds.path} has {source.num_pieces} pieces, too few for {process_count} processes")
        components.append(grain.MapDataset.range(length).map(source))
        rates.append(w / source.mean_piece_tokens)
    mixed = components[0] if len(components) == 1 else grain.MapDataset.mix(components, rates)

    indexed = mixed.map_with_index(_with_index)
    read = indexed.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_BUFFER))
    rows = BestFitPack(read, indexed, seq_len, PACKING_BINS)
    batches = rows.batch(batch_size, drop_remainder=False).map(_PadBatch(batch_size))
    if num_workers > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    settings = {
        "datasets": [ds.identity for ds in datasets],
        "weights": [round(float(w) / sum(weights), 12) for w in weights],
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "process_index": process_index,
        "process_count": process_count,
        "num_workers": num_workers,
        "num_epochs": num_epochs,
        "packing_bins": PACKING_BINS,
    }
    return DataIterator(iter(batches), settings)


def carry_position(state: dict[str, Any], iterator: Any) -> dict[str, Any] | None:
    """`state` (another `DataIterator`'s) made valid for `iterator` when the two pipelines differ only in batch size:
    rows are packed before they are batched, so the row position carries over exactly (a batch-size ramp reads on
    where it was). None for anything else (another row length cuts other pieces: that needs a fresh iterator), and
    with prefetch workers, whose state is per worker.
    """
    mine = getattr(iterator, "settings", None)
    saved = state.get("settings") if isinstance(state, dict) else None
    if mine is None or saved is None or "grain" not in state or mine.get("num_workers"):
        return None
    if {k: v for k, v in saved.items() if k != "batch_size"} != {k: v for k, v in mine.items() if k != "batch_size"}:
        return None
    return {"settings": dict(mine), "grain": state["grain"]}


def checkpoint_args(iterator: DataIterator, restore: bool = False) -> Any:
    """Orbax args for the iterator, e.g. `ocp.args.Composite(state=..., data_iter=checkpoint_args(it))`.

    grain's handler writes one JSON file per process (`process_<i>-of-<n>.json`, from jax.process_index()).
    """
    return grain.checkpoint.CheckpointRestore(iterator) if restore else grain.checkpoint.CheckpointSave(iterator)


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Fraction of non-padding positions in a batch."""
    return float(np.mean(batch["segment_ids"] > 0))


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Assembles every process's batch into global arrays laid out by `sharding` (the ("batch", "seq") spec).

    A process holds whole rows: those of its row group (`sharding.host_data.row_group`; processes that share rows
    through `context` or `tensor` hold the same rows), and each device takes its tokens of them.

    Shapes:
        per process [B / row groups, T] -> global [B, T].
    """
    return host_data.to_global(batch, sharding)
