"""tools.timing: warm-up calls untimed in the per-call times, every call waited for, bad counts refused."""

import jax.numpy as jnp
import pytest

from tools import timing


def test_time_calls_counts_warmup_and_timed_calls():
    calls = []

    def call():
        calls.append(len(calls))
        return jnp.ones(4) * len(calls)

    times = timing.time_calls(call, repeats=3, warmup=2)
    assert len(calls) == 5
    assert len(times.wall_s) == len(times.cpu_s) == 3
    assert times.first_s >= 0 and times.best_s == min(times.wall_s) <= times.median_s


def test_time_calls_refuses_no_timed_call():
    with pytest.raises(ValueError, match="repeats"):
        timing.time_calls(lambda: None, repeats=0)
