"""Three train steps of `tiny` on an 8-device mesh give the same losses and gradient norms as on one device.

Opt-in (`SHARDING_LONG_TESTS=1`): each run compiles the tiny train step (about 150-200 CPU-seconds each), more
than the default suite's budget. AdamW keeps the update in float32, so only summation order differs (Muon's
bfloat16 Newton-Schulz has its own sharded-vs-single test in the optimizer's tests).
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, train
from sharding import mesh as mesh_lib
from tests.conftest import TOLERANCES
from tests.sharding.test_mesh_equivalence import host_state

B, T, STEPS = 8, 32, 3


def batches():
    rng = np.random.default_rng(3)
    out = []
    for _ in range(STEPS):
        tokens = rng.integers(2, 5000, size=(B, T + 1)).astype(np.int32)
        seg = np.ones((B, T), np.int32)
        seg[:, T // 2:] = 2  # two documents per row
        pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32)
        out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
                    "positions": np.broadcast_to(pos, (B, T)).copy()})
    return out


def run(mesh) -> list[dict]:
    cfg = get_config("tiny")
    s = train.TrainSettings(steps=STEPS, optimizer="adamw", schedule="constant", warmup_steps=0)
    with jax.set_mesh(mesh):
        plan = train.plan_state(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)), s, mesh)
        params, extras = host_state(plan.abstract.params), host_state(plan.abstract.extras)
        state = train.TrainState(step=np.int32(0), params=params, extras=extras, opt_state=plan.tx.init(params),
                                 rng=np.zeros((2,), np.uint32), skipped=np.int32(0))
        state = jax.device_put(state, plan.shardings)
        step = train.make_train_step(plan.graphdef, cfg, plan.tx, s, sparse=True)
        bs = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        out = []
        for batch in batches():
            state, m = step(state, jax.device_put(batch, bs), np.float32(1.0))
            out.append(jax.device_get({k: m[k] for k in ("loss", "mtp_loss", "grad_norm", "balance_loss")}))
    return out


@pytest.fixture(scope="module")
def single():
    return run(mesh_lib.make_mesh("data=1", devices=jax.devices()[:1]))


@pytest.mark.skipif(not os.environ.get("SHARDING_LONG_TESTS"), reason="opt-in: about 3 CPU-minutes per mesh")
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["data=2,fsdp=2,expert=2", "fsdp=4,tensor=2"])
def test_three_train_steps_match_single_device(spec, single):
    sharded = run(mesh_lib.make_mesh(spec))
    tol = TOLERANCES["sharded_vs_single_f32"]
    for i, (w, g) in enumerate(zip(single, sharded)):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=tol, atol=tol, err_msg=f"step {i + 1} {k}")
    assert single[-1]["loss"] < single[0]["loss"]
