"""On-policy distillation (deepseek_v4/distillation.py): the loss inside the shared train step equals the dense
reverse KL, values and gradients; weights and vocabularies are checked; rollout rows mask the completion.

The step runs on the train-step tests' toy model (compiles in seconds); the real model's on-policy loop is in
tests/experiments/test_distill.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepseek_v4 import distillation, train
from deepseek_v4 import post_training_losses as ptl
from deepseek_v4.config import get_config
from tests.deepseek_v4.test_train import _SETTINGS, D, V, _batch, _Toy

WEIGHTS = (0.7, 0.3)
TEACHER_DIMS = (D, 8)  # one teacher as wide as the student, one narrower


def _distill_batch(seed=0):
    rng = np.random.default_rng(seed)
    batch = _batch(seed=seed)
    b, t = batch["tokens"].shape
    weights = (rng.random((b, t)) < 0.6).astype(np.float32)  # the "completion" tokens
    batch["loss_weights"] = weights * (batch["segment_ids"] != 0)
    heads = []
    for i, d in enumerate(TEACHER_DIMS):
        batch[distillation.teacher_hidden_key(i)] = rng.normal(size=(b, t, d)).astype(np.float32)
        heads.append(jnp.asarray(rng.normal(size=(d, V)) * 0.5, jnp.float32))
    batch[distillation.TEACHER_MASK] = distillation.teacher_mask([""] * b, None, len(TEACHER_DIMS), t)  # no routing
    return {k: jnp.asarray(v) for k, v in batch.items()}, heads


def _reference(params, extras, graphdef, batch, heads):
    """The weighted KL from the dense reference, on the toy model's hidden states."""
    model = nnx.merge(graphdef, params, extras)
    out = model.forward_train(batch["tokens"], batch["segment_ids"], batch["positions"])
    teachers = [(batch[distillation.teacher_hidden_key(i)], h) for i, h in enumerate(heads)]
    return ptl.reference_reverse_kl(out.hidden, model.head[...], teachers, WEIGHTS, train.token_weights(batch))


@pytest.fixture(scope="module")
def toy():
    s = train.TrainSettings(**{**_SETTINGS, "balance_weight": 0.0, "indexer_weight": 0.0, "clip_norm": 0.0})
    tx = train.make_optimizer(s)
    graphdef, _ = train.init_state(_Toy(nnx.Rngs(0)), tx, seed=0)
    return s, tx, graphdef


def test_the_loss_in_the_train_step_equals_the_dense_reverse_kl(toy):
    s, tx, graphdef = toy
    batch, heads = _distill_batch()
    state = train.init_state(_Toy(nnx.Rngs(0)), tx, seed=0)[1]
    # the references jitted: one compile each instead of one eager dispatch per operation
    ref_value, ref_grads = jax.jit(jax.value_and_grad(_reference), static_argnums=2)(state.params, state.extras,
                                                                                       graphdef, batch, heads)

    @jax.jit
    def teacher_kls(params, extras, batch, heads):
        model = nnx.merge(graphdef, params, extras)
        hidden = model.forward_train(batch["tokens"], batch["segment_ids"], batch["positions"]).hidden
        return [ptl.reference_reverse_kl(hidden, model.head[...], [(batch[distillation.teacher_hidden_key(i)], h)],
                                         [1.0], train.token_weights(batch)) for i, h in enumerate(heads)]

    per_teacher = teacher_kls(state.params, state.extras, batch, heads)

    # gradients: the function the step differentiates, over two microbatches (they must add up to the batch's)
    counts = train._batch_counts(batch, 1)
    loss_fn = functools.partial(distillation.distill_loss, teacher_heads=heads, weights=WEIGHTS, vocab_chunk=16)
    micro = lambda p, mb: train._microbatch_loss(p, state.extras, mb, counts, graphdef=graphdef,  # noqa: E731
                                                 loss_fn=loss_fn, s=s, phase="sparse", mtp_weight=0.0)
    (total, aux), grads = jax.jit(lambda p, b: train._value_and_grads(micro, p, b, 2))(state.params, batch)
    np.testing.assert_allclose(total, ref_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)

    # the value, each teacher's KL and the gradient norm through the jitted step
    step = distillation.make_distill_step(graphdef, get_config("tiny"), tx, s, phase="sparse", teacher_heads=heads,
                                          weights=WEIGHTS, vocab_chunk=16)
    new, m = step(state, batch)
    assert bool(m["update_ok"])
    np.testing.assert_allclose(m["loss"], ref_value, rtol=1e-5)
    for i, kl in enumerate(per_teacher):
        np.testing.assert_allclose(m[distillation.kl_metric(i)], kl, rtol=1e-5)
    np.testing.assert_allclose(m["grad_norm"], optax.global_norm(ref_grads), rtol=1e-4)


def test_bad_weights_are_one_line_errors():
    assert distillation.check_weights([1, 0], 2) == (1.0, 0.0)
    for weights, n, match in [((0.5,), 2, "1 value\\(s\\) for 2 teacher"), ((0.5, -0.5), 2, "finite and >= 0"),
                              ((0.0, 0.0), 2, "sum to 0"), ((float("nan"), 1.0), 2, "finite")]:
        with pytest.raises(ValueError, match=match) as e:
            distillation.check_weights(weights, n)
        assert "\n" not in str(e.value)


def test_a_teacher_with_another_vocabulary_is_a_one_line_error():
    distillation.check_vocabularies(100, {"a": 100})
    with pytest.raises(ValueError, match="teacher b has a vocabulary of 99 tokens, the student 100") as e:
        distillation.check_vocabularies(100, {"a": 100, "b": 99})
    assert "\n" not in str(e.value)


def test_task_prompts_are_seeded_chat_prompts():
    source = distillation.TaskPrompts(("arithmetic", "string"), ("non-think",))
    a = source.draw(4, np.random.default_rng(5))
    assert a == source.draw(4, np.random.default_rng(5)) and a != source.draw(4, np.random.default_rng(6))
    assert all(p[0] == 0 for p in a)  # BOS
    with pytest.raises(ValueError, match="unknown task"):
        distillation.TaskPrompts(("poetry",), ("non-think",))
    with pytest.raises(ValueError, match="unknown chat mode"):
        distillation.TaskPrompts(("string",), ("fast",))


def test_chat_prompts_end_before_the_last_assistant_turn_and_count_skips():
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Answer: 1"}],
            "mode": "non-think"}
    bad = {"messages": [{"role": "user", "content": "hi"}], "mode": "non-think"}
    source = distillation.ChatPrompts([good, bad, good], max_len=64)
    assert len(source.prompts) == 2 and source.skipped.total == 1
    from deepseek_v4 import chat

    assert source.prompts[0] == chat.token_ids(good["messages"][:1], "non-think").tolist()
    with pytest.raises(ValueError, match="no usable prompt"):
        distillation.ChatPrompts([bad], max_len=64)
