"""Recipe stages and the data pipeline: a batch-size change carries the row position over; other changes do not."""

import numpy as np

from deepseek_v4 import data
from tests.deepseek_v4.test_data import _write


def test_position_carries_over_a_batch_size_change(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "a", list(rng.integers(3, 100, size=60)), first_value=2)
    ds = [str(tmp_path / "a")]
    small = data.make_train_iterator(ds, None, 32, 2, seed=0)
    for _ in range(3):
        next(small)
    reference = data.make_train_iterator(ds, None, 32, 2, seed=0)
    rows = [next(reference)["tokens"] for _ in range(5)]  # batches 4 and 5 follow the 3 taken
    large = data.make_train_iterator(ds, None, 32, 4, seed=0)
    state = data.carry_position(small.get_state(), large)
    large.set_state(state)
    np.testing.assert_array_equal(next(large)["tokens"], np.concatenate(rows[3:5]))
    # another row length cuts other pieces: nothing carries over
    assert data.carry_position(small.get_state(), data.make_train_iterator(ds, None, 64, 2, seed=0)) is None
    assert data.carry_position(small.get_state(), data.make_train_iterator(ds, None, 32, 4, seed=1)) is None
