"""Three train steps on each 8-device mesh give the same losses, gradient norms and parameters as on one device.

The model is the cut-down `tiny` of `tests.sharding.equivalence`, small enough that seven train-step compiles fit
the default suite. Muon's bfloat16 Newton-Schulz has its own sharded-vs-single test in the optimizer's tests. On
meshes with an expert axis the MoE runs expert-parallel (all-to-all, dropless) while the one-device run uses the
dense reference MoE.
"""

import jax
import numpy as np
import pytest

from sharding import mesh as mesh_lib
from tests.sharding.equivalence import SMALL, assert_same_steps, run

B, T, STEPS = 8, 32, 3
MESHES = ["data=8", "fsdp=8", "expert=8", "data=2,expert=4", "data=2,fsdp=2,expert=2", "fsdp=4,tensor=2"]
METRICS = ("loss", "mtp_loss", "grad_norm", "balance_loss")


def batches() -> list[dict]:
    """The same batch every step (so the loss must fall): two documents per row, one padded row."""
    rng = np.random.default_rng(3)
    tokens = rng.integers(2, SMALL["vocab_size"], size=(B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, 19:] = 2  # the document boundary is not aligned to the compression ratios
    seg[1, 28:] = 0  # padding
    pos = np.concatenate([np.arange(19), np.arange(T - 19)]).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
             "positions": np.broadcast_to(pos, (B, T)).copy()}
    return [batch] * STEPS


@pytest.fixture(scope="module")
def single():
    return run(mesh_lib.make_mesh("data=1", devices=jax.devices()[:1]), batches(), METRICS)


@pytest.mark.slow  # one train-step compile per mesh: about 30 CPU-seconds each
@pytest.mark.parametrize("spec", MESHES)
def test_three_train_steps_match_single_device(spec, single):
    assert_same_steps(single, run(mesh_lib.make_mesh(spec), batches(), METRICS))
