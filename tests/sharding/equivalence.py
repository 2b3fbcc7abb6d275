"""Sharded-vs-one-device train steps, shared by the data/FSDP/expert/tensor tests (test_train_equivalence) and the
context-parallel tests (test_context_parallel): the cut-down model, deterministic weights, the run and the checks.

The model is `tiny` cut to the parts that sharding touches: a hash-routed sliding-window layer (unrolled prefix),
a scanned (CSA, HCA) unit repeated twice, the MTP layer, 8 experts top-2, and a 512-token vocabulary (the head and
embedding are sharded like the real one). AdamW keeps the update in float32, so only summation order differs.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, train
from deepseek_v4.params import path_str
from sharding import rules
from tests.conftest import TOLERANCES

# Prefix: layer 0 (sliding window, hash-routed); scanned unit (CSA ratio 4, HCA ratio 16) x 2; MTP (sliding).
SMALL = dict(num_hidden_layers=5, compress_ratios=(0, 4, 16, 4, 16, 0), num_hash_layers=1, vocab_size=512)


def small_config():
    return get_config("tiny", **SMALL)


def host_state(abstract_state, seed: int = 0):
    """Deterministic, well-scaled values for every variable of an abstract model state (numpy, no compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, var):
        v = var.get_value()
        name = path_str(path)
        if np.issubdtype(v.dtype, np.integer):  # hash-routing table: K distinct experts per token id
            rows, k = v.shape
            experts = np.argsort(rng.random((rows, get_config("tiny").n_routed_experts)), axis=1)[:, :k]
            return var.replace(experts.astype(v.dtype))
        if name.endswith("scale"):
            x = 1.0 + 0.1 * rng.standard_normal(v.shape)
        else:
            x = 0.05 * rng.standard_normal(v.shape)
        return var.replace(x.astype(v.dtype))

    return jax.tree_util.tree_map_with_path(fill, abstract_state, is_leaf=rules.is_variable)


def small_model(seed: int):
    """(graphdef, state) of the small model with `host_state`'s values of `seed` (device arrays). The model is
    built abstractly: building it eagerly would compile hundreds of one-operation programs for values that
    `host_state` replaces."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: DeepseekV4(small_config(), rngs=nnx.Rngs(0))))
    return graphdef, jax.tree.map(jnp.asarray, host_state(state, seed=seed))


def leaves(tree) -> dict[str, np.ndarray]:
    return {path_str(p): np.array(jax.device_get(v.get_value()), copy=True)  # a copy: donation reuses buffers
            for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=rules.is_variable)}


def run(mesh, batches: list[dict], metrics: tuple[str, ...]) -> tuple[list[dict], dict, dict]:
    """Train steps of the small model on `mesh`, one per batch (sparse phase; every batch of one shape: the step
    is compiled once): the `metrics` of each step, and the initial and final parameters (host numpy, by path)."""
    cfg = small_config()
    # eps = 1 makes AdamW momentum SGD here (sqrt(v) << 1 for these gradients), so parameter differences are lr x
    # gradient differences and can be held to float tolerance. With V4's eps 1e-20, Adam's normalisation turns the
    # rounding noise of near-zero gradient entries (e.g. the first layer's mHC mixing acts on R identical copies of
    # the embedding; Sinkhorn ignores row/column shifts of its logits) into +-lr steps whose sign depends on
    # summation order: observed 0.06 apart after 3 steps with losses equal to 1e-7 (5.9e-4 apart with eps 1e-8).
    s = train.TrainSettings(steps=len(batches), optimizer="adamw", schedule="constant", warmup_steps=0,
                            learning_rate=0.1, adam_eps=1.0)
    with jax.set_mesh(mesh):
        plan = train.plan_state(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)), s, mesh)
        params, extras = host_state(plan.abstract.params), host_state(plan.abstract.extras)
        initial = leaves(params)
        state = train.TrainState(step=np.int32(0), params=params, extras=extras, opt_state=plan.tx.init(params),
                                 rng=np.zeros((2,), np.uint32), skipped=np.int32(0))
        state = jax.device_put(state, plan.shardings)
        step = train.make_train_step(plan.graphdef, cfg, plan.tx, s, phase="sparse")
        out, compiled = [], None
        for batch in batches:
            bs = rules.named_sharding(("batch", "seq"), mesh, shape=batch["tokens"].shape)
            batch = jax.device_put(batch, bs)
            if compiled is None:
                compiled = step.lower(state, batch).compile()
            state, m = compiled(state, batch)
            out.append(jax.device_get({k: m[k] for k in metrics}))
        final = leaves(state.params)
    return out, initial, final


def assert_same_steps(want: tuple[list[dict], dict, dict], got: tuple[list[dict], dict, dict]) -> None:
    """`run`'s results on a mesh (`got`) equal those on one device (`want`) to float tolerance, every step's
    metrics and every final parameter; the loss fell and most parameters moved (compared after real updates)."""
    want_metrics, initial, want_params = want
    got_metrics, _, got_params = got
    tol = TOLERANCES["sharded_vs_single_f32"]
    for i, (w, g) in enumerate(zip(want_metrics, got_metrics)):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=tol, atol=tol, err_msg=f"step {i + 1} {k}")
    assert want_metrics[-1]["loss"] < want_metrics[0]["loss"]
    assert got_params.keys() == want_params.keys()
    for name, w in want_params.items():
        np.testing.assert_allclose(got_params[name], w, rtol=tol, atol=tol, err_msg=name)
    moved = sum(np.abs(want_params[k] - initial[k]).max() > 100 * tol for k in want_params)
    assert moved > len(want_params) // 2  # compared after real updates, not at the initial values
