"""Which rows each process loads (row groups) and their assembly into global arrays, with processes assigned to the
8 fake devices of this one process (device id // 4: two processes of four devices, as `create_device_mesh` orders
them)."""

import numpy as np
import pytest

from sharding import host_data, rules
from sharding import mesh as mesh_lib


def two_processes(device) -> int:
    return device.id // 4


def groups(spec: str, process_of=two_processes) -> list[host_data.RowGroup]:
    sharding = rules.named_sharding(("batch", "seq"), mesh_lib.make_mesh(spec))
    return [host_data.row_group(sharding, p, process_of) for p in (0, 1)]


@pytest.mark.parametrize("spec, want", [
    ("data=2,context=4", [(0, 2), (1, 2)]),  # context inside a process: rows split by process, as without it
    ("fsdp=2,context=4", [(0, 2), (1, 2)]),
    ("expert=8", [(0, 2), (1, 2)]),
    ("context=8", [(0, 1), (0, 1)]),  # context across processes: both load every row
    ("context=4,tensor=2", [(0, 1), (0, 1)]),
    ("data=8", [(0, 2), (1, 2)]),
])
def test_row_groups(spec, want):
    assert groups(spec) == [host_data.RowGroup(*w) for w in want]


def test_overlapping_rows_are_a_clear_error():
    # processes of 3 and 5 devices on data=4,context=2: process 0 holds row 0 and half of row 1, process 1 the rest
    with pytest.raises(ValueError, match="overlapping or unequal sets of rows"):
        groups("data=4,context=2", lambda d: int(d.id > 2))


def test_batch_must_split_over_row_groups():
    assert host_data.check_batch(6, host_data.RowGroup(1, 2)) == 3
    with pytest.raises(ValueError, match="batch_size 3 is not divisible by the 2 row groups"):
        host_data.check_batch(3, host_data.RowGroup(0, 2))


@pytest.mark.parametrize("spec", ["context=8", "data=2,context=4"])
def test_to_global_places_whole_rows_by_token(spec):
    sharding = rules.named_sharding(("batch", "seq"), mesh_lib.make_mesh(spec))
    rows = {"tokens": np.arange(2 * 64, dtype=np.int32).reshape(2, 64)}
    out = host_data.to_global(rows, sharding)["tokens"]
    assert out.shape == (2, 64) and out.sharding == sharding
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), rows["tokens"][shard.index])
