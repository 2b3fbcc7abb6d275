"""Peak FLOP/s for MFU: the vendor table for accelerators, a timed matmul on CPU."""

import types

from deepseek_v4 import metrics


def test_accelerators_take_the_vendor_table():
    value, source = metrics.default_peak_flops(types.SimpleNamespace(device_kind="NVIDIA H200"))
    assert value == 989e12 and source == "NVIDIA H200 bf16 dense (vendor)"


def test_a_cpu_peak_is_measured():
    # The CPU default (a 1024-wide matmul timed for a second) at a small size and time: a positive, finite rate.
    flops = metrics.measure_matmul_peak(size=128, seconds=0.01)
    assert 1e6 < flops < 1e14
