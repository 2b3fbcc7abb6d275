"""Safetensors files: the dtype names, a streaming writer of sharded files with their index, a lazy reader.

`SafetensorsWriter` writes tensors whose names, dtypes and shapes are known in advance (`StoredTensor`) into
`model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`, one tensor at a time;
`SafetensorsDir` opens such a directory (official or exported) and reads tensors by name. What the tensors
are (the official names and storage formats) is `deepseek_v4.export`'s business; see docs/checkpoints.md.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from deepseek_v4 import quant

# numpy dtype <-> safetensors dtype name
ST_DTYPES: dict[np.dtype, str] = {
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e8m0fnu): "F8_E8M0",
}


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors file holds it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---- writing sharded safetensors ----------------------------------------------------------------------------


def _header(entries: Sequence[StoredTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in entries:
        header[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Streams tensors, in a fixed order, into `model-0000i-of-0000n.safetensors` files plus
    `model.safetensors.index.json`. Shapes and dtypes are known in advance, so each file's header is written
    first and every tensor goes to disk as it arrives (no file is held in memory).

    Args:
      directory: an existing directory.
      tensors: every tensor to be written, in writing order.
      max_shard_bytes: a file is closed before it would exceed this (a larger single tensor gets its own file).
    """

    def __init__(self, directory: str, tensors: Sequence[StoredTensor], max_shard_bytes: int):
        for t in tensors:
            if t.dtype not in ST_DTYPES:
                raise ValueError(f"{t.name}: dtype {t.dtype} has no safetensors name")
        shards: list[list[StoredTensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        n = len(shards)
        self.directory = directory
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._queue = [(s, k) for s, shard in enumerate(shards) for k in range(len(shard))]
        self._pos = 0
        self._file = None
        self.total_bytes = sum(t.nbytes for t in tensors)

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor; it must be the next one of the plan, with the planned dtype and shape."""
        if self._pos >= len(self._queue):
            raise ValueError(f"unexpected tensor {name}: every planned tensor is written")
        s, k = self._queue[self._pos]
        want = self._shards[s][k]
        if name != want.name or np.dtype(array.dtype) != want.dtype or tuple(array.shape) != want.shape:
            raise ValueError(f"tensor {name} {array.dtype}{list(array.shape)} written where {want.name} "
                             f"{want.dtype}{list(want.shape)} was planned")
        if k == 0:
            self._file = open(os.path.join(self.directory, self.files[s]), "wb")
            self._file.write(_header(self._shards[s]))
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._pos += 1
        if k == len(self._shards[s]) - 1:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Write the index; raises ValueError if a planned tensor was never written."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pos != len(self._queue):
            s, k = self._queue[self._pos]
            raise ValueError(f"export incomplete: {self._shards[s][k].name} and later tensors were not written")
        weight_map = {t.name: self.files[s] for s, shard in enumerate(self._shards) for t in shard}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)


# ---- reading safetensors ------------------------------------------------------------------------------------


class SafetensorsDir:
    """The tensors of a directory of `.safetensors` files (with or without `model.safetensors.index.json`),
    opened lazily; fp8 tensors load through the numpy dtype patch of `quant`."""

    def __init__(self, directory: str):
        quant.patch_numpy_fp8_dtypes()
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "*.safetensors")))
        if not files:
            raise ValueError(f"no .safetensors files in {directory}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.exists(path):
                raise ValueError(f"{directory}: the index names {name}, which does not exist")
            try:
                handle = safe_open(path, framework="numpy")
            except Exception as e:
                raise ValueError(f"cannot open {path}: {str(e).splitlines()[0]}") from e
            self._handles[name] = handle
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"tensor {key} is in both {self._where[key]} and {name}")
                self._where[key] = name

    def names(self) -> set[str]:
        return set(self._where)

    def dtype(self, name: str) -> str:
        """The safetensors dtype name (e.g. "BF16", "F8_E4M3") of a tensor."""
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        return self._handles[self._where[name]].get_tensor(name)
