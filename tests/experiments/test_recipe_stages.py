"""A run's data across recipe stages, without compiling anything: the iterator is rebuilt at each boundary with the
stage's shapes, a batch-size change keeps the row position, and a run resumed inside a stage or exactly at a boundary
reads the batches the uninterrupted run read."""

import numpy as np
import pytest

from deepseek_v4 import data, recipes
from experiments.run import Run, RunSettings
from tests.deepseek_v4.test_data import _write

STAGES = (recipes.Stage("a", 2 * 32 * 3, 32, 2 * 32, "dense", ""),  # 3 steps of 2 x 32
          recipes.Stage("b", 2 * 32 * 3 + 4 * 32 * 2, 32, 4 * 32, "dense", ""),  # 2 steps of 4 x 32: batch change
          recipes.Stage("c", 2 * 32 * 3 + 4 * 32 * 2 + 2 * 64 * 3, 64, 2 * 64, "sparse", ""))  # 3 of 2 x 64
SCHEDULE = recipes.resolve(recipes.Recipe("t", "tiny", 1e-3, 0.1, 1, 64, 0.3, 0.1, 1e-3, 1e-4, STAGES, {}))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    _write(root / "a", list(np.random.default_rng(0).integers(3, 150, size=80)), first_value=2)

    def make(process_index, process_count, opts=None):
        return data.make_train_iterator([str(root / "a")], None, opts.seq_len, opts.batch_size, opts.seed,
                                        process_index, process_count)

    return make


def _run(source):
    return Run(cfg=None, settings=None, opts=RunSettings(), workdir="", mesh=None, plan=None, state=None, start=0,
               resumed=False, checkpointer=None, primary=False, make_step=None, resources=None, schedule=SCHEDULE,
               data_source=source)


def _read(run, first, last):
    """Batches of steps [first, last) and the checkpointed data state after each step."""
    batches, states = [], {}
    for step in range(first, last):
        batches.append(run.next_batch(step))
        states[step + 1] = run.data_state()
    return batches, states


def test_each_stage_reads_its_shapes_and_a_batch_change_keeps_the_position(source):
    run = _run(source)
    run.open_data(0)
    batches, _ = _read(run, 0, SCHEDULE.steps)
    shapes = [b["tokens"].shape for b in batches]
    assert shapes == [(2, 32)] * 3 + [(4, 32)] * 2 + [(2, 64)] * 3
    assert run.opts.seq_len == 64 and run.opts.batch_size == 2
    # stage b continues stage a's rows: the same rows as one iterator of batch 2 read on
    single = source(0, 1, RunSettings(seq_len=32, batch_size=2))
    expected = np.concatenate([next(single)["tokens"] for _ in range(3 + 4)])
    np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in batches[:5]]), expected)


@pytest.mark.parametrize("step", [2, 3, 4, 5])  # inside a; a -> b (batch change); inside b; b -> c (new row length)
def test_a_resumed_run_reads_what_the_uninterrupted_run_read(source, step):
    run = _run(source)
    run.open_data(0)
    reference, states = _read(run, 0, SCHEDULE.steps)
    resumed = _run(source)
    resumed.open_data(step, states[step])
    got, _ = _read(resumed, step, SCHEDULE.steps)
    for a, b in zip(got, reference[step:], strict=True):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
