"""`Config.attention_impl` (auto | reference | pallas): what each value asks the attention kernels for, and an
explicit request that cannot run on this platform raises instead of falling back."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, attention, get_config
from deepseek_v4.checkpoint import EXECUTION_FIELDS


def test_attention_impl_values_map_to_kernel_options():
    cfg = get_config("tiny")
    assert cfg.attention_impl == "auto"
    assert attention.kernel_options(cfg) == {"impl": None, "interpret": None}
    assert attention.kernel_options(cfg.replace(attention_impl="reference"))["impl"] == "reference"
    assert attention.kernel_options(cfg.replace(attention_impl="pallas"))["impl"] == "pallas"
    with attention.kernel_implementation("pallas_tpu", interpret=True):  # an enclosing block wins
        assert attention.kernel_options(cfg) == {"impl": "pallas_tpu", "interpret": True}
    assert "attention_impl" in EXECUTION_FIELDS


def test_unknown_attention_impl_is_a_config_error():
    with pytest.raises(ValueError, match="attention_impl must be 'auto', 'reference' or 'pallas'"):
        get_config("tiny", attention_impl="triton")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="Pallas runs natively off CPU")
def test_pallas_on_cpu_raises_instead_of_falling_back():
    cfg = get_config("tiny", attention_impl="pallas")
    tokens = jnp.ones((1, 16), jnp.int32)
    pos = jnp.arange(16, dtype=jnp.int32)[None]
    with pytest.raises(ValueError, match="cannot run on the 'cpu' backend"):  # traced only: no weights initialised
        jax.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0))(tokens, tokens, pos))
