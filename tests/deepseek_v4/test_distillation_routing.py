"""Distillation routed by task (deepseek_v4/distillation.py, `teacher_mask`): without routing the loss is the
unrouted weighted KL of before; routed, each row is scored by its own task's teacher only; the per-teacher KL
metric is the mean over the tokens that teacher scores, also over microbatches; the teachers' tasks are checked
and fingerprinted. Eager calls of the loss on the train-step tests' toy model (no compile of a step).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import distillation, train
from deepseek_v4 import post_training_losses as ptl
from tests.deepseek_v4.test_distillation import WEIGHTS, _distill_batch
from tests.deepseek_v4.test_train import _SETTINGS, _Toy

TEACHER_TASKS = ("next_letter", "larger")
ROW_TASKS = ["next_letter", "larger", "larger", "next_letter"]  # the 4 rows of `_distill_batch`


@pytest.fixture(scope="module")
def toy():
    s = train.TrainSettings(**{**_SETTINGS, "balance_weight": 0.0, "indexer_weight": 0.0, "clip_norm": 0.0})
    return s, _Toy(nnx.Rngs(0))


def _loss(toy, batch, heads, **kw):
    s, model = toy
    return distillation.distill_loss(model, batch, train._batch_counts(batch, 1), s=s, sparse=True, mtp_weight=0.0,
                                     teacher_heads=heads, weights=WEIGHTS, vocab_chunk=16, **kw)


def _dense_token_kls(model, batch, heads):
    """KL(p_student || p_teacher_i) per token, dense: [n_teachers, B, T]."""
    hidden = model.forward_train(batch["tokens"], batch["segment_ids"], batch["positions"]).hidden
    logp_s = jax.nn.log_softmax(hidden @ model.head[...])
    out = []
    for i, head in enumerate(heads):
        logp_t = jax.nn.log_softmax(batch[distillation.teacher_hidden_key(i)] @ head)
        out.append(jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1))
    return np.asarray(jnp.stack(out))


def test_without_routing_the_loss_is_the_unrouted_weighted_kl(toy):
    s, model = toy
    batch, heads = _distill_batch()
    total, aux = _loss(toy, batch, heads)
    # the loss as it was before routing: sum_i w_i * (mean KL_i over the microbatch's tokens) * (its share of them)
    mask = train.token_weights(batch)
    hidden = model.forward_train(batch["tokens"], batch["segment_ids"], batch["positions"]).hidden
    scale = jnp.maximum(jnp.sum(mask), 1.0) / train._batch_counts(batch, 1)["tokens"]
    before = jnp.zeros((), jnp.float32)
    for i, (head, w) in enumerate(zip(heads, WEIGHTS)):
        kl = ptl.chunked_reverse_kl(hidden, model.head[...], [(batch[distillation.teacher_hidden_key(i)], head)],
                                    [1.0], mask, vocab_chunk=16) * scale
        np.testing.assert_allclose(aux[distillation.kl_metric(i)], kl, rtol=1e-6)
        before = before + w * kl
    np.testing.assert_allclose(aux["loss"], before, rtol=1e-6)
    np.testing.assert_allclose(total, before, rtol=1e-6)


def test_routed_rows_are_scored_by_their_own_teacher_only(toy):
    s, model = toy
    batch, heads = _distill_batch()
    b, t = batch["tokens"].shape
    batch[distillation.TEACHER_MASK] = jnp.asarray(distillation.teacher_mask(ROW_TASKS, TEACHER_TASKS, 2, t))
    _, aux = _loss(toy, batch, heads)

    kls, mask = _dense_token_kls(model, batch, heads), np.asarray(train.token_weights(batch))
    total, per_teacher = 0.0, {i: [0.0, 0.0] for i in range(2)}  # teacher -> [KL sum, tokens]
    for r in range(b):
        i = TEACHER_TASKS.index(ROW_TASKS[r])
        for k in range(t):
            if mask[r, k]:
                total += WEIGHTS[i] * kls[i, r, k]
                per_teacher[i][0] += kls[i, r, k]
                per_teacher[i][1] += 1
    np.testing.assert_allclose(aux["loss"], total / np.count_nonzero(mask), rtol=1e-5)
    for i, (kl_sum, n) in per_teacher.items():
        np.testing.assert_allclose(aux[distillation.kl_metric(i)], kl_sum / n, rtol=1e-5)

    # two microbatches with the whole batch's per-teacher counts add up to the batch's loss and metrics
    counts = train._batch_counts(batch, 1)
    whole = distillation.teacher_token_counts(batch)
    halves = [jax.tree.map(lambda x, sl=sl: x[sl], batch) for sl in (slice(0, 2), slice(2, 4))]
    parts = [distillation.distill_loss(model, h, counts, s=s, sparse=True, mtp_weight=0.0, teacher_heads=heads,
                                       weights=WEIGHTS, vocab_chunk=16, teacher_counts=whole)[1] for h in halves]
    for key in ("loss", distillation.kl_metric(0), distillation.kl_metric(1)):
        np.testing.assert_allclose(parts[0][key] + parts[1][key], aux[key], rtol=1e-5)


def test_teacher_mask_rows():
    off = distillation.teacher_mask(["", ""], None, 3, 5)
    assert off.shape == (2, 5, 3) and off.dtype == np.float32 and np.all(off == 1)
    routed = distillation.teacher_mask(ROW_TASKS, TEACHER_TASKS, 2, 5)
    np.testing.assert_array_equal(routed[:, 0], [[1, 0], [0, 1], [0, 1], [1, 0]])
    assert np.all(routed == routed[:, :1])  # constant along the row


def test_bad_teacher_tasks_are_one_line_errors():
    assert distillation.check_teacher_tasks(["larger"], 1, ("next_letter", "larger")) == ("larger",)
    for tasks, n, match in [(["larger"], 2, "1 task\\(s\\) for 2 teacher"),
                            (["larger", "poetry"], 2, "unknown task 'poetry'"),
                            (["larger", "string"], 2, "'string', which is not in --tasks=next_letter,larger")]:
        with pytest.raises(ValueError, match=match) as e:
            distillation.check_teacher_tasks(tasks, n, ("next_letter", "larger"))
        assert "\n" not in str(e.value)


def test_task_prompts_report_their_tasks_and_routing_is_fingerprinted():
    source = distillation.TaskPrompts(TEACHER_TASKS, ("non-think",))
    prompts, tasks = source.draw_with_tasks(6, np.random.default_rng(3))
    assert prompts == source.draw(6, np.random.default_rng(3)) and set(tasks) <= set(TEACHER_TASKS)
    assert len(set(tasks)) == 2
    only = distillation.TaskPrompts(("larger",), ("non-think",))
    assert only.draw_with_tasks(3, np.random.default_rng(3))[1] == ["larger"] * 3

    def iterator(**kw):
        return distillation.RolloutIterator(lambda: None, source, [None, None], rows=2, seq_len=64,
                                            max_new_tokens=4, seed=0, **kw)

    assert "teacher_tasks" not in iterator().settings  # unrouted runs resume as before
    routed = iterator(teacher_tasks=TEACHER_TASKS)
    assert routed.settings["teacher_tasks"] == "next_letter,larger"
    with pytest.raises(ValueError, match="teacher_tasks was 'next_letter,larger', is None"):
        iterator().set_state(routed.get_state())
    with pytest.raises(ValueError, match="not --data prompts"):
        distillation.RolloutIterator(lambda: None, object(), [None], rows=2, seq_len=64, max_new_tokens=4, seed=0,
                                     teacher_tasks=("larger",))
