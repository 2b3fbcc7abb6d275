"""The mesh: --mesh parsing, axis names and types, multi-slice layout, multi-host start-up arguments."""

import dataclasses

import jax
import pytest
from jax.sharding import AxisType

from sharding import mesh as mesh_lib


@pytest.mark.parametrize("spec, want", [
    ("data=2,fsdp=1,expert=4,tensor=1", (2, 1, 4, 1, 1)),
    ("expert=8", (1, 1, 8, 1, 1)),
    ("data=2,expert=-1", (2, 1, 4, 1, 1)),
    ("tensor=2,fsdp=-1", (1, 4, 1, 1, 2)),
    ("", (8, 1, 1, 1, 1)),
    (None, (8, 1, 1, 1, 1)),
    ({"expert": 4, "data": 2}, (2, 1, 4, 1, 1)),
    ("fsdp=2,context=4", (1, 2, 1, 4, 1)),
])
def test_parse(spec, want):
    sizes = mesh_lib.parse_mesh(spec, 8)
    assert tuple(sizes) == ("data", "fsdp", "expert", "context", "tensor")
    assert tuple(sizes.values()) == want


@pytest.mark.parametrize("spec, message", [
    ("data=3", "has 3 devices, but 8 are available"),
    ("data=2,expert=2", "has 4 devices, but 8 are available"),
    ("data=3,expert=-1", "not divisible by 3"),
    ("pipeline=2", "unknown mesh axis 'pipeline'"),
    ("data=2,data=4", "given twice"),
    ("data=-1,expert=-1", "only one mesh axis may be -1"),
    ("data=two", "not an integer"),
    ("data", "is not name=size"),
    ("expert=0", "sizes are >= 1"),
])
def test_parse_errors_are_one_line(spec, message):
    with pytest.raises(ValueError, match=message) as e:
        mesh_lib.parse_mesh(spec, 8)
    assert "\n" not in str(e.value)


def test_make_mesh_names_types_and_devices():
    mesh = mesh_lib.make_mesh("data=2,expert=4")
    assert mesh.axis_names == ("data", "fsdp", "expert", "context", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "context": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 5
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    assert mesh_lib.describe(mesh) == "mesh data=2,fsdp=1,expert=4,context=1,tensor=1 (8 devices, 1 process)"


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_multi_slice_puts_slices_on_data():
    devices = [FakeDevice(i, i // 4, i // 4) for i in range(8)]
    assert mesh_lib.num_slices(devices) == 2
    grid = mesh_lib.device_grid(mesh_lib.parse_mesh("data=4,expert=2", 8), devices)
    assert grid.shape == (4, 1, 2, 1, 1)
    # The outer half of the data axis is slice 0, the inner half slice 1: only data crosses DCN.
    assert [{d.slice_index for d in grid[i].flat} for i in range(4)] == [{0}, {0}, {1}, {1}]
    with pytest.raises(ValueError, match="2 slices need the data axis"):
        mesh_lib.device_grid(mesh_lib.parse_mesh("expert=8", 8), devices)


def test_init_distributed_arguments():
    mesh_lib.init_distributed()  # single process: nothing to do
    mesh_lib.init_distributed(num_processes=1)
    with pytest.raises(ValueError, match="needs coordinator_address, num_processes and process_id together"):
        mesh_lib.init_distributed(coordinator_address="localhost:1234", num_processes=2)
    with pytest.raises(ValueError, match=r"process_id 2 must be in \[0, 2\)"):
        mesh_lib.init_distributed("localhost:1234", 2, 2)
    assert not jax.distributed.is_initialized()
