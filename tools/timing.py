"""Timing of one benchmark call, shared by the bench tools: warm-up calls, then timed calls that wait for the device.

    times = timing.time_calls(lambda: fn(*args), repeats=5)
    times.first_s, times.median_s, times.median_cpu_s, times.best_s

A jitted function compiles in its first call, so `first_s` (all warm-up calls) is compile + first run when
`warmup` is 1. Each call's result is waited for with `jax.block_until_ready` (a no-op on host values), so
asynchronous dispatch does not hide device time.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class CallTimes:
    """Seconds of the warm-up calls together and of each timed call.

    `cpu_s` is this process's CPU time per timed call: on a shared machine the wall time includes waiting for
    other processes; the CPU time does not.
    """

    first_s: float
    wall_s: tuple[float, ...]
    cpu_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)

    @property
    def best_s(self) -> float:
        return min(self.wall_s)


def time_calls(call: Callable[[], Any], repeats: int, warmup: int = 1) -> CallTimes:
    """Call `call()` `warmup` times, then `repeats` timed times; every call is waited for.

    Raises:
      ValueError: `repeats` < 1 or `warmup` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0 timed calls, got repeats={repeats}, warmup={warmup}")
    t0 = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(call())
    first = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(call())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return CallTimes(first_s=first, wall_s=tuple(wall), cpu_s=tuple(cpu))
