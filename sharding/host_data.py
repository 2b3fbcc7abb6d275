"""Which rows of the global batch each process loads, and their assembly into global arrays.

A batch is [B, T] in the natural token order, laid out by the ("batch", "seq") activation spec: rows split over
the batch axes (data, fsdp, expert), tokens over `context`. A process loads whole rows: every row that any of its
devices holds a part of. When `context` (or `tensor`) spans processes, several processes hold parts of the same
rows; they form one *row group*, load the same rows, and each of their devices keeps its own tokens (the model
then moves them into the load-balanced two-chunk layout, sharding/context.py). See docs/sharding.md,
"Several processes".

`row_group(sharding)` says which group a process belongs to and how many there are; a data source is asked for
part `index` of `count` (`batch_size // count` rows) where it used to be asked for part `process_index` of
`process_count`. `to_global` assembles the parts into one global array.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """This process's share of the global batch: part `index` of `count` equal parts of the rows."""

    index: int
    count: int


def _process_rows(sharding: jax.sharding.Sharding, process_of: Callable[[Any], int]) -> dict[int, frozenset[int]]:
    """process -> the rows its devices hold, of a nominal [n, n] batch, n = the device count (every split
    divides it)."""
    n = len(sharding.device_set)
    out: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((n, n)).items():
        out.setdefault(process_of(device), set()).update(range(n)[index[0]])
    return {p: frozenset(r) for p, r in out.items()}


def row_group(sharding: jax.sharding.Sharding, process_index: int | None = None,
              process_of: Callable[[Any], int] = lambda d: d.process_index) -> RowGroup:
    """The row group of `process_index` (default: this process) under the batch `sharding`; `process_of` maps a
    device to its process (tests assign processes to the fake devices of one process).

    Groups are numbered in the order of their first row, so with the batch axes spanning processes (the usual
    layout) group i is process i, and with one process there is one group.

    Raises:
      ValueError: (one line) when two processes hold overlapping but different sets of rows, or the groups are
        of unequal size: no split of whole rows over processes then matches the devices.
    """
    process_index = jax.process_index() if process_index is None else process_index
    by_process = _process_rows(sharding, process_of)
    groups = sorted(set(by_process.values()), key=min)
    sizes = {len(g) for g in groups}
    if len(sizes) > 1 or sum(len(g) for g in groups) != len(set().union(*groups)):
        raise ValueError(f"the batch layout {getattr(sharding, 'spec', sharding)} gives processes overlapping or "
                         "unequal sets of rows; use a mesh whose batch axes split rows evenly over processes")
    return RowGroup(groups.index(by_process[process_index]), len(groups))


def check_batch(batch_size: int, group: RowGroup) -> int:
    """Rows per process (`batch_size // group.count`); a one-line ValueError when they do not divide."""
    if batch_size % group.count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {group.count} row groups of processes "
                         "(processes that share rows through the context or tensor axis count once)")
    return batch_size // group.count


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """Every process's rows [B / count, T] (whole rows, natural order) -> global arrays [B, T] laid out by
    `sharding`; each device takes its tokens of its rows."""
    count = row_group(sharding).count
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count,) + v.shape[1:])
            for k, v in batch.items()}
