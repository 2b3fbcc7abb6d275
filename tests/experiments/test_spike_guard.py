"""The spike guard's bookkeeping on its own (the entry-point behaviour is in test_faults.py)."""

import numpy as np
import pytest

from experiments import spikes


def _metrics(loss, ok=True, spike=False):
    return {"loss": np.float32(loss), "update_ok": np.bool_(ok), "loss_spike": np.bool_(spike)}


def test_limit_follows_the_running_mean_after_the_minimum_history():
    guard = spikes.SpikeGuard(spikes.SpikeSettings(spike_response="skip", spike_factor=2.0, spike_window=3,
                                                   spike_min_history=2))
    assert guard.limit() == np.inf
    guard.observe(1, _metrics(5.0))
    assert guard.limit() == np.inf  # one step of history: not yet
    guard.observe(2, _metrics(4.0))
    assert guard.limit() == pytest.approx(9.0)
    guard.observe(3, _metrics(float("nan"), ok=False))  # a skipped step adds nothing
    guard.observe(4, _metrics(3.0))
    guard.observe(5, _metrics(2.0))  # the window keeps the last 3: 4, 3, 2
    assert guard.limit() == pytest.approx(6.0)
    assert guard.observe(6, _metrics(50.0, ok=False, spike=True)) and guard.spikes == 1
    assert guard.limit() == pytest.approx(6.0)  # a spike stays out of the statistic
    assert guard.record() == {"loss_spikes": 1, "spike_rollbacks": 0}


def test_off_detects_nothing_and_adds_no_metrics():
    guard = spikes.SpikeGuard(spikes.SpikeSettings())
    assert guard.limit() is None and guard.record() == {}
    assert not guard.observe(1, {"loss": np.float32(1.0), "update_ok": np.bool_(True)})


def test_injected_batches_carry_scaled_loss_weights():
    guard = spikes.SpikeGuard(spikes.SpikeSettings(debug_spike_at_batches=(2,)))
    data = iter([{"tokens": np.zeros((2, 3), np.int32)} for _ in range(3)])
    weights = [guard.take(next(data), step)["loss_weights"] for step in (1, 2, 3)]
    assert [float(w.max()) for w in weights] == [1.0, spikes.SPIKE_WEIGHT, 1.0]
    assert guard.batch_of_step == {1: 1, 2: 2, 3: 3}


@pytest.mark.parametrize("field, value, message", [
    ("spike_response", "retry", "--spike_response must be off, skip or rollback"),
    ("spike_factor", 1.0, "--spike_factor must be a number > 1"),
    ("spike_window", 0, "--spike_window must be >= 1"),
    ("spike_min_history", 0, "--spike_min_history must be >= 1"),
])
def test_bad_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        spikes.SpikeSettings(**{field: value})


def test_metrics_writer_rewinds_to_a_rollback_step(tmp_path):
    from deepseek_v4.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.rewind(3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics_discarded.jsonl"))] == [4, 5]
