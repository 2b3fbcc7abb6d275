"""The `tiny` model gives the same forward results on 8 devices, whatever the mesh, as on one device.

On meshes with an expert axis the model's MoE runs expert-parallel (`sharding.routed_experts`, dropless); the
one-device result uses its dense reference MoE, so this also checks the expert-parallel path inside the model.

Parameters are filled on the host from numpy (the model's own random init costs a long XLA compile on CPU and
is not what is tested here); each mesh gets them laid out by `rules.param_shardings`. Compared: a slice of the
logits and the full-vocabulary log-normaliser, so every part of the network, the head included, is checked
without moving [B, T, V] logits to the host.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config
from sharding import mesh as mesh_lib
from sharding import rules
from tests.conftest import TOLERANCES

B, T = 8, 32
MESHES = ["data=8", "fsdp=8", "expert=8", "data=2,expert=4", "data=2,fsdp=2,expert=2", "fsdp=4,tensor=2"]


def host_state(abstract_state, seed: int = 0):
    """Deterministic, well-scaled values for every variable of an abstract model state (numpy, no compile)."""
    rng = np.random.default_rng(seed)

    def fill(path, var):
        v = var.get_value()
        name = rules.path_str(path)
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


@pytest.fixture(scope="module")
def model_parts():
    cfg = get_config("tiny")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0))))
    state = host_state(abstract)
    tokens = np.random.default_rng(1).integers(2, cfg.vocab_size, size=(B, T)).astype(np.int32)
    return graphdef, state, tokens


def forward(graphdef):
    def f(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens)  # [B, T, V]
        return logits[..., :128], jax.nn.logsumexp(logits, axis=-1)

    return jax.jit(f)


@pytest.fixture(scope="module")
def single_device(model_parts):
    graphdef, state, tokens = model_parts
    device = jax.devices()[0]
    return jax.device_get(forward(graphdef)(jax.device_put(state, device), jax.device_put(tokens, device)))


@pytest.mark.slow  # one forward compile per mesh: about 170 CPU-seconds for the six meshes on 2 cores
@pytest.mark.parametrize("spec", MESHES)
def test_forward_matches_single_device(spec, model_parts, single_device):
    graphdef, state, tokens = model_parts
    mesh = mesh_lib.make_mesh(spec)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(state, rules.param_shardings(state, mesh))
        batch = jax.device_put(tokens, rules.named_sharding(("batch", "seq"), mesh, shape=tokens.shape))
        got = jax.device_get(forward(graphdef)(sharded, batch))
    tol = TOLERANCES["sharded_vs_single_f32"]
    for g, w in zip(got, single_device):
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol)
    assert np.abs(single_device[1]).max() > 1.0  # a non-degenerate forward
