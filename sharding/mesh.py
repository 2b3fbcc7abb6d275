"""The device mesh: five named axes, built from a `--mesh=data=2,expert=4` string; multi-host start-up.

This is the only module that names mesh axes (together with `rules.py`, which maps logical names onto them).

Axes, outermost first (the last axis gets the fastest links):
  data    pure data parallelism: parameters replicated, batch split. Multi-slice runs put slices here (DCN).
  fsdp    data parallelism with parameters and optimizer state split (ZeRO-3 style); all-gathered per use.
  expert  expert parallelism: routed experts split, tokens moved by all-to-all; the batch is split here too.
  context context parallelism: the sequence split (load-balanced two-chunk layout, `context.py`); parameters
          replicated over it; attention exchanges halos and compressed entries (docs/sharding.md).
  tensor  tensor parallelism: heads / hidden widths split, activations all-reduced.

Axis types: every axis is `AxisType.Auto`. The model is written without `out_sharding=` annotations on its
einsums, so Explicit axes would make every contraction over a sharded dimension an error ("Contracting dimensions
are sharded and it is ambiguous how the output should be sharded"). With Auto axes GSPMD propagates shardings from
the parameters and the few `rules.constrain` calls on activations, `with_sharding_constraint` works, flax builds
modules under the mesh, and expert dispatch uses `jax.shard_map` where layout matters. This choice is made here
for the whole project (docs/sharding.md, "Axis types").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES: tuple[str, ...] = ("data", "fsdp", "expert", "context", "tensor")


def parse_mesh(spec: str | Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Sizes of all mesh axes from a string such as `"data=2,expert=4"`.

    Axes not named get size 1; at most one axis may be `-1`, which takes whatever the device count leaves.
    An empty string or None means `data=-1` (pure data parallelism).

    Args:
      spec: `"name=size,..."` with names from `AXES`, or a mapping of the same.
      num_devices: the number of devices the mesh must cover exactly.

    Returns:
      `{axis: size}` for every axis in `AXES`, in that order, with product `num_devices`.

    Raises:
      ValueError: (one line) on unknown or repeated names, sizes that are not positive integers, more than one
        `-1`, or a product that does not equal `num_devices`.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = "data=-1"
    if isinstance(spec, str):
        items = []
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"mesh entry {part.strip()!r} is not name=size (in --mesh={spec})")
            try:
                size = int(value)
            except ValueError:
                raise ValueError(f"mesh axis {name!r} has size {value.strip()!r}, not an integer") from None
            items.append((name, size))
    else:
        items = list(spec.items())
    sizes: dict[str, int] = {}
    for name, size in items:
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r}; the axes are {', '.join(AXES)}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice")
        if size != -1 and size < 1:
            raise ValueError(f"mesh axis {name!r} has size {size}; sizes are >= 1, or -1 for the rest")
        sizes[name] = int(size)
    fill = [n for n, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(fill)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(f"mesh {_fmt(sizes)}: {num_devices} devices are not divisible by {fixed}")
        sizes[fill[0]] = num_devices // fixed
    full = {name: sizes.get(name, 1) for name in AXES}
    if math.prod(full.values()) != num_devices:
        raise ValueError(f"mesh {_fmt(full)} has {math.prod(full.values())} devices, but {num_devices} are available")
    return full


def _fmt(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def num_slices(devices: Sequence[Any]) -> int:
    """Number of TPU slices (ICI islands) among `devices`; 1 for GPUs, CPUs and single-slice TPUs."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(sizes: Mapping[str, int], devices: Sequence[Any]) -> np.ndarray:
    """The devices arranged as an array of shape `[data, fsdp, expert, context, tensor]`.

    With several slices, `data` is split into (slices over DCN) x (data per slice over ICI), using
    `mesh_utils.create_hybrid_device_mesh`, so only the data-parallel gradient all-reduce crosses slices.
    Otherwise `mesh_utils.create_device_mesh` picks a layout that follows the physical topology (TPU torus,
    process order on GPUs: with data outermost, consecutive hosts differ along `data` first).
    """
    shape = [sizes[a] for a in AXES]
    slices = num_slices(devices)
    if slices == 1:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    if sizes["data"] % slices:
        raise ValueError(f"{slices} slices need the data axis ({sizes['data']}) to be a multiple of {slices}")
    ici = [sizes["data"] // slices] + shape[1:]
    dcn = [slices] + [1] * (len(AXES) - 1)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """The training mesh: axes `("data", "fsdp", "expert", "context", "tensor")`, all `AxisType.Auto`.

    Args:
      spec: `"data=2,fsdp=1,expert=4,context=1,tensor=1"`, any subset, one axis may be -1 (see `parse_mesh`).
      devices: defaults to all devices of all processes (`jax.devices()`).

    Returns:
      A `jax.sharding.Mesh`. Enter it with `jax.set_mesh(mesh)` around model construction and the train step.

    Raises:
      ValueError: (one line) on a malformed spec or a device-count mismatch.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    grid = device_grid(sizes, devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def describe(mesh: Mesh) -> str:
    """One line such as `mesh data=2,fsdp=1,expert=4,context=1,tensor=1 (8 devices, 2 processes)`."""
    procs = len({d.process_index for d in mesh.devices.flat})
    return f"mesh {_fmt(dict(mesh.shape))} ({mesh.size} devices, {procs} process{'es' if procs > 1 else ''})"


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                     *, auto: bool = False, cpu_collectives: str = "gloo") -> None:
    """Start multi-host JAX. Call it first, before anything touches devices (`jax.devices()`, arrays, jit).

    - Explicit: give `coordinator_address` ("host:port" of process 0), `num_processes` and `process_id`
      (e.g. two processes on one machine, or a GPU cluster launched by hand).
    - Auto: `auto=True` with no other arguments lets `jax.distributed.initialize()` read the cluster from its
      usual environment: Cloud TPU pod slices (the TPU metadata), SLURM (`SLURM_*`), Open MPI (`OMPI_*`),
      Kubernetes/GKE, or `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`.
    - Neither (`num_processes` None or 1 and `auto` False): a single process, nothing to do.

    CPU devices of different processes talk through `cpu_collectives` ("gloo"), set before the backend starts;
    the setting only affects the CPU backend, so it is harmless on GPU and TPU runs.

    Raises:
      ValueError: (one line) when the explicit arguments are incomplete or inconsistent.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if not auto and all(v is None for v in explicit):
        return
    if num_processes == 1 and not auto:
        return
    if not auto and any(v is None for v in explicit):
        raise ValueError("multi-process start needs coordinator_address, num_processes and process_id together "
                         f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} must be in [0, {num_processes})")
    if jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
