"""Loss-spike handling of the training loop: detect a step whose loss jumps, then skip it or roll back.

Detection: a step's cross entropy is a spike when it exceeds `spike_factor` x the mean loss of the last
`spike_window` updated steps, once at least `spike_min_history` of them are known. The limit is passed into the
jitted step (`train.train_step`'s `loss_limit`), so a spike step changes nothing on the device: no update, no
bias change, the optimizer's count does not advance (like a non-finite step). The host looks at each step's
metrics one step late (the loop never waits for the device), so the limit of step s comes from the steps up to
s - 2.

Responses (`--spike_response`):
  skip      the spike step's update is dropped; training goes on with the next batch.
  rollback  also restore the newest checkpoint (written before the spike: the loop checks for a spike before it
            saves) and skip the data window from that checkpoint to the spike, i.e. the batches of the steps
            after the checkpoint up to the spike step; the steps are taken again on the batches that follow.
            Metrics records after the checkpoint move to metrics_discarded.jsonl (one timeline). Without a
            checkpoint it falls back to skip.
Both are counted in the metrics (`loss_spikes`, `spike_rollbacks`) and logged with the step. The history is kept
in memory only: a resumed run starts a new one.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
from typing import Any

import numpy as np

from deepseek_v4 import train
from deepseek_v4.config import setting

SPIKE_WEIGHT = 1000.0  # --debug_spike_at_batches multiplies these batches' loss weights by this


@dataclasses.dataclass(frozen=True)
class SpikeSettings:
    """Loss-spike detection and response (the entry points generate `--spike_*` flags from these fields)."""

    spike_response: str = setting("off", "What a loss spike does: off = nothing (not detected); skip = drop that "
                                  "step's update; rollback = restore the newest checkpoint and skip the data from "
                                  "it to the spike.", choices=("off", "skip", "rollback"))
    spike_factor: float = setting(2.0, "A step's loss is a spike above this factor x the running mean loss.")
    spike_window: int = setting(20, "Updated steps in the running mean.")
    spike_min_history: int = setting(10, "Updated steps seen before spikes are detected (after a start or resume).")
    debug_spike_at_batches: tuple[int, ...] = setting((), "Testing only: these batches (1-based, in the order the "
                                                      f"run reads them) carry loss weights x {SPIKE_WEIGHT:g}.")

    def __post_init__(self):
        if self.spike_response not in ("off", "skip", "rollback"):
            raise ValueError(f"--spike_response must be off, skip or rollback, got {self.spike_response!r}")
        if not (self.spike_factor > 1 and math.isfinite(self.spike_factor)):
            raise ValueError(f"--spike_factor must be a number > 1, got {self.spike_factor}")
        if self.spike_window < 1:
            raise ValueError(f"--spike_window must be >= 1, got {self.spike_window}")
        if self.spike_min_history < 1:
            raise ValueError(f"--spike_min_history must be >= 1, got {self.spike_min_history}")

    @property
    def active(self) -> bool:
        return self.spike_response != "off"


class SpikeGuard:
    """The running statistic, the counters and the test injection of one training loop."""

    def __init__(self, settings: SpikeSettings, batches_read: int = 0):
        self.settings = settings
        self.history: collections.deque[float] = collections.deque(maxlen=settings.spike_window)
        self.spikes = 0
        self.rollbacks = 0
        self.batches_read = batches_read  # batches taken from the data iterator, in data order (the step at start)
        self._poisoned = set(settings.debug_spike_at_batches)
        self.batch_of_step: dict[int, int] = {}  # step -> data position after reading its batch (recent steps)
        # checkpoint step -> data position saved with it (the run's start checkpoint counts as its step)
        self.saved_positions: dict[int, int] = {batches_read: batches_read} if batches_read else {}

    def take(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """`batch`, the one just read for `step` (1-based), counted, with its loss weights scaled if it is one of
        `debug_spike_at_batches` (with that flag set every batch carries `loss_weights`, so the step compiles once).
        """
        self.batches_read += 1
        self.batch_of_step[step] = self.batches_read
        self.batch_of_step.pop(step - 4, None)
        if not self._poisoned:
            return batch
        weights = batch.get("loss_weights", np.ones(batch["tokens"].shape, np.float32))
        scale = np.float32(SPIKE_WEIGHT if self.batches_read in self._poisoned else 1.0)
        return {**batch, "loss_weights": weights * scale}

    def saved(self, step: int) -> None:
        """The run saved a checkpoint at `step` (with the data position of now)."""
        self.saved_positions[step] = self.batches_read

    def skip_batches(self, data, n: int) -> None:
        """Read and drop `n` batches (the data window of a rollback)."""
        for _ in range(n):
            next(data)
            self.batches_read += 1

    def limit(self) -> np.ndarray | None:
        """The `loss_limit` for the next step: None when detection is off, inf until the history is long enough."""
        if not self.settings.active:
            return None
        if len(self.history) < self.settings.spike_min_history:
            return np.float32(np.inf)
        return np.float32(self.settings.spike_factor * float(np.mean(self.history)))

    def observe(self, step: int, m: dict[str, Any]) -> bool:
        """Look at a finished step's metrics (host values or device arrays); True if it was a spike."""
        if not self.settings.active:
            return False
        if bool(m["loss_spike"]):
            self.spikes += 1
            mean = float(np.mean(self.history)) if self.history else float("nan")
            print(f"step {step}: loss spike ({float(m['loss']):.4f} > {self.settings.spike_factor:g} x running mean "
                  f"{mean:.4f}), update skipped ({self.spikes} so far)", file=sys.stderr, flush=True)
            return True
        if bool(m["update_ok"]):
            self.history.append(float(m["loss"]))
        return False

    def record(self) -> dict[str, int]:
        """The counters for a metrics record (nothing when detection is off)."""
        if not self.settings.active:
            return {}
        return {"loss_spikes": self.spikes, "spike_rollbacks": self.rollbacks}


def respond(run, guard: SpikeGuard, spike_step: int) -> int | None:
    """After a spike at `spike_step`: with `rollback`, restore the newest checkpoint and skip the data window.

    Args:
      run: the `experiments.run.Run` (its state, data iterator, checkpointer and metrics writer are replaced or
        rewound in place). Call under the run's mesh.

    Returns:
      The step training continues from after a rollback; None when it goes on (skip, or no checkpoint).
    """
    if guard.settings.spike_response != "rollback":
        return None
    run.checkpointer.wait()
    restored = run.checkpointer.restore(run.plan.target, config=run.cfg,
                                        optional={"indexer_opt_state": run.plan.indexer_opt_target})
    if restored is None or restored.step not in guard.saved_positions:
        print(f"step {spike_step}: no checkpoint of this run to roll back to; the update was skipped",
              file=sys.stderr, flush=True)
        return None
    run.state = train.with_indexer_warmup_state(restored.state, run.plan)
    run.open_data(restored.step, restored.data_state)
    window = guard.batch_of_step[spike_step] - guard.saved_positions[restored.step]
    guard.batches_read = guard.saved_positions[restored.step]
    guard.skip_batches(run.data, window)
    guard.rollbacks += 1
    if run.writer is not None:
        run.writer.rewind(restored.step)
    print(f"step {spike_step}: rolled back to step {restored.step}, skipping {window} batch(es) of data "
          f"({guard.rollbacks} rollback(s) so far)", file=sys.stderr, flush=True)
    return restored.step
