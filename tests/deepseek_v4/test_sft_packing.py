"""Packed SFT rows give each conversation the loss it gets alone (deepseek_v4/sft_data.py on a real model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import DeepseekV4, get_config, sft_data, verifiable_tasks

T = 256


@pytest.mark.slow  # one forward compile of a cut-down nano model with the full vocabulary (~30 s on 2 cores)
def test_packed_sft_loss_equals_each_conversation_alone():
    cfg = get_config("nano", num_hidden_layers=2, compress_ratios=(4, 32, 0), num_hash_layers=1)
    model = DeepseekV4(cfg, rngs=nnx.Rngs(0))
    docs, _ = sft_data.encode_examples(verifiable_tasks.make_chat_set(6, seed=2), T)
    packed = sft_data.pack(docs, T)
    rows = packed["tokens"].shape[0]
    assert rows < len(docs)  # several conversations share a row
    alone = sft_data.empty_rows(len(docs), T)
    for r, d in enumerate(docs):
        sft_data.place(alone, r, 0, 1, d)
    packed = {k: np.concatenate([v, np.zeros((len(docs) - rows, T), v.dtype)]) for k, v in packed.items()}

    graphdef, state = nnx.split(model)

    @jax.jit
    def weighted_nll(state, batch):  # the weights as an argument, not as constants folded into the program
        logits = nnx.merge(graphdef, state)(batch["tokens"], batch["segment_ids"], batch["positions"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return nll * batch["loss_weights"]

    got, want = np.asarray(weighted_nll(state, packed)), np.asarray(weighted_nll(state, alone))
    per_doc = []
    for r in range(rows):
        for s in np.unique(packed["segment_ids"][r]):
            if s:
                per_doc.append(got[r, packed["segment_ids"][r] == s])
    assert len(per_doc) == len(docs)
    for i, d in enumerate(docs):
        np.testing.assert_allclose(per_doc[i], want[i, :len(d)], atol=1e-5, rtol=0)
    # The batch loss (mean over assistant tokens) is the token-weighted mean of the conversations' losses.
    weights = sum(float(d.loss_weights.sum()) for d in docs)
    np.testing.assert_allclose(got.sum() / weights, want.sum() / weights, rtol=1e-6)
