"""Parity with transformers' DeepseekV4ForCausalLM (the reference), loaded as a user would: from the safetensors
files and config.json that our `to_hf` export produced."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, interop
from tests.conftest import TOLERANCES

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEQ = 45  # not a multiple of 4 or of the HCA ratio, longer than the tiny window (16)


def _randomize(model: DeepseekV4, seed: int) -> None:
    """Perturb every float parameter and the balancing biases so zero-initialised ones (sinks, ape, mHC biases,
    router bias) take part in the comparison. In numpy: eagerly in JAX, each parameter shape compiled programs."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(np.asarray(x) + (0.1 * rng.standard_normal(x.shape)).astype(x.dtype))
           if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = get_config("tiny")
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    _randomize(model, 1)
    config_dict, state_dict = interop.to_hf(model)
    return model, config_dict, state_dict, tmp_path_factory.mktemp("hf")


def _hf_model(config_dict, state_dict, path, index_topk):
    d = dict(config_dict, index_topk=index_topk)
    (path / "config.json").write_text(json.dumps(d))
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}
    safetensors_torch.save_file(tensors, str(path / "model.safetensors"))
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return hf.eval()


@pytest.mark.parametrize("index_topk", [3, 64])  # fewer / more than the 11 CSA entries of SEQ tokens
def test_logits_match_transformers(exported, index_topk):
    model, config_dict, state_dict, path = exported
    ours = interop.from_hf(dict(config_dict, index_topk=index_topk), state_dict)
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, SEQ), 0, model.cfg.vocab_size), np.int64)
    hf = _hf_model(config_dict, state_dict, path, index_topk)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(jax.jit(lambda t: ours(t))(jnp.asarray(tokens, jnp.int32)))
    err = np.abs(got - ref)
    print(f"index_topk={index_topk}: max abs {err.max():.3e}, mean abs {err.mean():.3e}")
    assert err.max() < TOLERANCES["parity_f32_logits"]


def test_from_hf_to_hf_round_trip_is_exact(exported):
    model, config_dict, state_dict, _ = exported
    again = interop.from_hf(config_dict, state_dict)
    a, b = nnx.state(model), nnx.state(again)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_from_hf_lists_missing_and_unexpected(exported):
    _, config_dict, state_dict, _ = exported
    broken = dict(state_dict)
    broken.pop("layers.0.attn.wq_a.weight")
    broken["layers.0.attn.bogus"] = np.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['layers.0.attn.wq_a.weight'\].*unexpected \['layers.0.attn.bogus'\]"):
        interop.from_hf(config_dict, broken)
