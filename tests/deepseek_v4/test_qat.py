"""Low-precision training forward (`Config.quant`): FP4 QAT sees exactly the weights an FP4 export holds."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, interop, quant

FP8_WEIGHTS = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|"
                         r"[eh]_proj)\.weight$")
EXPERTS = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")


# Tiny cut to a hash-routed CSA layer, a learned-routed HCA layer (scanned) and the sliding-window MTP layer, which
# has every quantised GEMM kind: each test compiles a third of tiny's six layers.
SHORT = dict(num_hidden_layers=2, compress_ratios=(4, 16, 0), num_hash_layers=1)


def _export_roundtrip(state_dict):
    """What an fp4 release holds, dequantised: MXFP4 routed experts, FP8 128x128 blocks for the other GEMMs."""
    out = {}
    for name, w in state_dict.items():
        if EXPERTS.search(name):
            out[name] = quant.dequantize_mxfp4(*quant.quantize_mxfp4(w, axis=-1), axis=-1)
        elif FP8_WEIGHTS.search(name):
            out[name] = quant.dequantize_fp8_blocks(*quant.quantize_fp8_blocks(w))
        else:
            out[name] = w
    return out


def test_fp4_qat_forward_equals_the_dequantised_export_forward():
    cfg = get_config("tiny", quant="fp4", **SHORT)
    model = DeepseekV4(cfg, rngs=nnx.Rngs(3))
    config_dict, state_dict = interop.to_hf(model)
    exported = _export_roundtrip(state_dict)
    changed = sum(not np.array_equal(exported[k], state_dict[k]) for k in state_dict)
    assert changed > 20  # the export really quantised the GEMM weights
    reloaded = interop.from_hf(config_dict, exported, quant="fp4")
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens))
    np.testing.assert_array_equal(np.asarray(logits(nnx.state(model))), np.asarray(logits(nnx.state(reloaded))))
    # The MTP module too (its e_proj / h_proj are FP8 in the export).
    mtp = jax.jit(lambda s: nnx.merge(graphdef, s).forward_train(tokens).mtp_hidden[0])
    np.testing.assert_array_equal(np.asarray(mtp(nnx.state(model))), np.asarray(mtp(nnx.state(reloaded))))


@pytest.fixture(scope="module")
def base():
    """The unquantised model split as (graphdef, params, rest), its input, and its loss (compiled once)."""
    graphdef, params, rest = nnx.split(DeepseekV4(get_config("tiny", **SHORT), rngs=nnx.Rngs(4)), nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (1, 20), 0, 1000)
    full = jax.jit(lambda p, r: jnp.mean(nnx.merge(graphdef, p, r)(tokens) ** 2))(params, rest)
    return params, rest, tokens, full


@pytest.mark.parametrize("mode", ["fp8", "fp4"])
def test_quantised_forward_is_close_and_has_straight_through_gradients(mode, base):
    params, rest, tokens, full = base
    # Same parameters, quantised forward: only the graph (its config) differs, so no second model is built.
    q_graphdef = nnx.split(nnx.eval_shape(lambda: DeepseekV4(get_config("tiny", quant=mode, **SHORT), rngs=nnx.Rngs(4))),
                           nnx.Param, ...)[0]

    def loss(p, r):  # the router biases and hash tables as an argument, not as constants in the program
        return jnp.mean(nnx.merge(q_graphdef, p, r)(tokens) ** 2)

    low, grads = jax.jit(jax.value_and_grad(loss))(params, rest)
    assert float(low) != float(full) and abs(float(low) / float(full) - 1) < 0.1
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.sum(jnp.abs(grads["stack"]["blocks"][0]["ffn"]["experts"]["w1"][...]))) > 0
