"""The GRPO loss under context parallelism equals the single-device one (hidden states come in the context
layout; the targets, kept sets and per-token fields are natural order): the small model of
tests/sharding/equivalence.py on context=8, 8 fake devices."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, train
from deepseek_v4 import post_training_losses as ptl
from sharding import mesh as mesh_lib
from tests.conftest import TOLERANCES
from tests.sharding.equivalence import SMALL, host_state, small_config
from tests.sharding.test_context_parallel import packed_rows


def rollout_batch() -> dict[str, np.ndarray]:
    """packed_rows() with GRPO's per-token fields: a loss on a third of the tokens, a top-4 kept set holding the
    target, advantages per token, stale old log-probs and reference log-probs."""
    rows = packed_rows()
    rng = np.random.default_rng(3)
    shape = rows["targets"].shape
    weights = ((rng.random(shape) < 0.33) & (rows["segment_ids"] != 0)).astype(np.float32)
    kept = rng.integers(0, SMALL["vocab_size"], size=shape + (4,)).astype(np.int32)
    kept[..., 0] = rows["targets"]
    return {**rows, "loss_weights": weights, "advantages": rng.normal(size=shape).astype(np.float32),
            "old_log_probs": (-1.0 - rng.random(shape)).astype(np.float32),
            "ref_log_probs": (-1.0 - rng.random(shape)).astype(np.float32),
            "kept_ids": kept, "kept_valid": np.ones(shape + (4,), np.float32)}


@pytest.mark.slow  # two loss-and-gradient compiles (one per mesh): ~25 s on a quiet machine, minutes when loaded
def test_grpo_loss_on_a_context_mesh_equals_one_device():
    # small_model(seed=4)'s values, filled into the abstract model (no eager initialisation to overwrite)
    abstract = nnx.eval_shape(lambda: DeepseekV4(small_config(), rngs=nnx.Rngs(0)))
    model = nnx.merge(nnx.graphdef(abstract), jax.tree.map(jnp.asarray, host_state(nnx.state(abstract), seed=4)))
    graphdef, rest, params = nnx.split(model, nnx.Not(nnx.Param), nnx.Param)
    batch = rollout_batch()
    counts = {"tokens": jnp.float32(batch["loss_weights"].sum())}
    loss_fn = ptl.make_grpo_loss(0.1, opsm_delta=0.2)
    s = train.TrainSettings(loss_chunk=128)

    @jax.jit
    def loss_and_grad(params, micro):
        def f(params):
            return loss_fn(nnx.merge(graphdef, rest, params), micro, counts, s=s, sparse=True,
                           mtp_weight=jnp.float32(0.0))

        (total, aux), grad = jax.value_and_grad(f, has_aux=True)(params)
        return total, aux["kl"], aux["clipped_fraction"], global_norm(grad)

    want = jax.device_get(loss_and_grad(params, batch))
    with jax.set_mesh(mesh_lib.make_mesh("context=8")):
        got = jax.device_get(loss_and_grad(params, batch))
    tol = TOLERANCES["sharded_vs_single_f32"]
    assert float(want[1]) > 0 and float(want[2]) > 0  # the KL and the clipping are exercised
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
