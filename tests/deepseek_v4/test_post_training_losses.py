"""GRPO and distillation math on small arrays (deepseek_v4/post_training_losses.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepseek_v4 import post_training_losses as ptl
from deepseek_v4 import train
from deepseek_v4.config import get_config
from tests.deepseek_v4.test_train import _SETTINGS, _Toy, _batch


def test_group_advantages_subtract_the_mean_of_valid_samples():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [5.0, 2.0, 9.0, 9.0], [3.0, 0.0, 0.0, 0.0]])
    valid = jnp.array([[True] * 4, [True] * 4, [False] * 4, [True, True, False, False]])
    adv, signal = ptl.group_advantages(rewards, valid)
    np.testing.assert_allclose(adv[0], [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_array_equal(adv[1], 0.0)  # equal rewards: no signal
    np.testing.assert_array_equal(adv[2], 0.0)  # empty group: no signal, no NaN
    np.testing.assert_allclose(adv[3], [1.5, -1.5, 0.0, 0.0])  # invalid samples neither count nor get advantage
    np.testing.assert_array_equal(signal, [True, False, False, True])


def test_group_advantages_scaled_by_std_is_original_grpo():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0]])
    adv, _ = ptl.group_advantages(rewards, jnp.ones_like(rewards, bool), scale_by_std=True)
    np.testing.assert_allclose(adv[0], [1.0, -1.0, -1.0, 1.0], atol=1e-5)
    assert np.all(np.isfinite(ptl.group_advantages(jnp.ones((1, 3)), jnp.ones((1, 3), bool), scale_by_std=True)[0]))


def test_length_penalty_is_per_mode_and_saturates():
    out = ptl.length_penalized_rewards(jnp.array([1.0, 1.0, 1.0, 0.0]), jnp.array([50, 50, 500, 10]),
                                       jnp.array([0, 1, 1, 2]), coef=(0.2, 0.1, 0.0), max_len=(100, 200, 400))
    np.testing.assert_allclose(out, [0.9, 0.975, 0.9, 0.0])
    with pytest.raises(ValueError, match="one coefficient"):
        ptl.length_penalized_rewards(jnp.ones(1), jnp.ones(1), jnp.zeros(1, int), coef=(0.1,), max_len=(0,))
    with pytest.raises(ValueError, match="think-max"):
        ptl.mode_length_settings({"non-think": (0.1, 10)}, ("non-think", "think-max"))


def test_clipped_objective_clips_only_in_the_advantage_direction():
    old = jnp.zeros((1, 4))
    new = jnp.log(jnp.array([[0.5, 1.5, 0.5, 1.5]]))
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    out = ptl.clipped_policy_objective(new, old, adv, eps_low=0.2, eps_high=0.2)
    # A > 0: min(r, clip(r)) -> 0.5 and 1.2; A < 0: min(-r, -clip(r)) -> -0.8 and -1.5
    np.testing.assert_allclose(out[0], [0.5, 1.2, -0.8, -1.5], rtol=1e-6)


def test_unbiased_kl_is_exact_in_expectation_with_its_gradient():
    """Summing the estimator over every token weighted by pi_old gives KL(pi || pi_ref), and its gradient."""
    rng = np.random.default_rng(0)
    logits, ref_logits, old_logits = (jnp.asarray(rng.normal(size=7), jnp.float32) for _ in range(3))
    logp_old = jax.nn.log_softmax(old_logits)
    logp_ref = jax.nn.log_softmax(ref_logits)

    def expected(z):
        logp = jax.nn.log_softmax(z)
        return jnp.sum(jnp.exp(logp_old) * ptl.unbiased_kl(logp, logp_old, logp_ref))

    def exact(z):
        logp = jax.nn.log_softmax(z)
        return jnp.sum(jnp.exp(logp) * (logp - logp_ref))

    np.testing.assert_allclose(expected(logits), exact(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(expected)(logits), jax.grad(exact)(logits), atol=1e-6)
    assert float(jnp.min(ptl.unbiased_kl(logp_ref, logp_old, logp_ref))) == 0.0  # pi == pi_ref: 0


def test_off_policy_mask_drops_only_stale_negative_sequences():
    adv = jnp.array([-1.0, -1.0, 1.0, -1.0])
    logp = jnp.log(jnp.full((4, 3), 0.5))
    old = jnp.array([[0.0, 0.0, -9.0], [-0.6, -0.6, -0.6], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], jnp.float32)
    # mean log(pi_old / pi): row 0 (masked tail ignored) 0.69 > 0.5 -> 0; row 1 0.09 -> kept; row 2 A > 0 -> kept
    np.testing.assert_array_equal(ptl.off_policy_sequence_mask(adv, logp, old, mask, delta=0.5), [0, 1, 1, 0])


def test_grpo_token_loss_masks_and_aggregates():
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]))
    mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
    adv = jnp.array([1.0, -2.0])
    loss = ptl.grpo_token_loss(logp, logp, logp, adv, mask, kl_weight=0.1)
    np.testing.assert_allclose(loss, [[-1, -1, 0], [2, 0, 0]])  # on-policy, pi == pi_ref: -A on masked tokens
    np.testing.assert_allclose(ptl.aggregate(loss, mask, "sequence_mean"), 0.5)
    np.testing.assert_allclose(ptl.aggregate(loss, mask, "token_mean"), 0.0)
    assert float(ptl.aggregate(loss, jnp.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError, match="aggregation"):
        ptl.aggregate(loss, mask, "sum")
    # The on-policy gradient of the loss is -A * grad log pi on each token.
    g = jax.grad(lambda lp: ptl.aggregate(ptl.grpo_token_loss(lp, jax.lax.stop_gradient(lp), logp, adv, mask,
                                                              kl_weight=0.0), mask, "token_mean"))(logp)
    np.testing.assert_allclose(g, [[-1 / 3, -1 / 3, 0], [2 / 3, 0, 0]], rtol=1e-6)


def test_kept_token_log_probs_renormalise_over_the_kept_set():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
    kept = jnp.array([[2, 5, 7], [0, 1, 9], [4, 4, 3]])
    kept_valid = jnp.array([[True, True, True], [True, True, True], [True, False, True]])
    targets = jnp.array([5, 9, 3])
    got = ptl.kept_token_log_probs(hidden, head, targets, kept, kept_valid)
    logits = np.asarray(hidden @ head)
    want = []
    for i, ids in enumerate([[2, 5, 7], [0, 1, 9], [4, 3]]):
        z = logits[i, ids]
        want.append(logits[i, int(targets[i])] - np.log(np.sum(np.exp(z))))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("vocab,chunk", [(37, 8), (5, 64)])  # several chunks, the last one padded; one chunk
def test_chunked_reverse_kl_equals_dense_values_and_gradients(vocab, chunk):
    rng = np.random.default_rng(vocab)
    n, d, d_t = 6, 5, 3
    s_hidden = jnp.asarray(rng.normal(size=(2, n // 2, d)), jnp.float32)
    s_head = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)
    teachers = [(jnp.asarray(rng.normal(size=(2, n // 2, dt)), jnp.float32),
                 jnp.asarray(rng.normal(size=(dt, vocab)) * 2, jnp.float32)) for dt in (d, d_t)]
    weights = (0.7, 0.3)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 1]], jnp.float32)

    def chunked(h, w, ts):
        return ptl.chunked_reverse_kl(h, w, ts, weights, mask, vocab_chunk=chunk)

    def dense(h, w, ts):
        return ptl.reference_reverse_kl(h, w, ts, weights, mask)

    v_c, g_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(s_hidden, s_head, teachers)
    v_d, g_d = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2)))(s_hidden, s_head, teachers)
    np.testing.assert_allclose(v_c, v_d, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_c[:2]), jax.tree.leaves(g_d[:2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for leaf in jax.tree.leaves(g_c[2]):  # teachers get no gradient
        np.testing.assert_array_equal(leaf, 0.0)


def test_masked_full_softmax_equals_the_kept_set_path_when_the_set_is_the_vocabulary():
    """Top-p alone stores K = V ids per token (most likely first, the nucleus valid): the masked full softmax gives
    the gathered-columns path's values and gradients without gathering [N, V, D] head columns."""
    rng = np.random.default_rng(2)
    n, d, v = 5, 4, 13
    hidden = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    kept = jnp.asarray(np.stack([rng.permutation(v) for _ in range(n)]), jnp.int32)
    kept_valid = jnp.arange(v)[None, :] < jnp.array([[1], [3], [13], [7], [2]])
    targets = kept[:, 0].at[2].set(kept[2, 9]).at[3].set(kept[3, 11])  # row 3: a target outside its set
    args = (targets, kept, kept_valid)
    want = jax.value_and_grad(lambda h, w: jnp.sum(ptl.kept_token_log_probs(h, w, *args)),
                              argnums=(0, 1))(hidden, head)
    for chunk in (2, 5):
        got = jax.value_and_grad(lambda h, w: jnp.sum(ptl.masked_token_log_probs(h, w, *args, chunk_size=chunk)),
                                 argnums=(0, 1))(hidden, head)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for g, w in zip(got[1], want[1]):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ptl.masked_token_log_probs(hidden, head, *args),
                               ptl.kept_token_log_probs(hidden, head, *args), rtol=1e-5)


def test_chunked_reverse_kl_is_zero_for_the_student_itself_and_checks_teachers():
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
    assert abs(float(ptl.chunked_reverse_kl(h, w, [(h, w)], [1.0], jnp.ones(4), vocab_chunk=3))) < 1e-6
    with pytest.raises(ValueError, match="one weight per teacher"):
        ptl.chunked_reverse_kl(h, w, [(h, w)], [1.0, 2.0], jnp.ones(4))
    with pytest.raises(ValueError, match="vocabulary"):
        ptl.chunked_reverse_kl(h, w, [(h, w[:, :5])], [1.0], jnp.ones(4))


def test_token_log_probs_equal_the_dense_log_softmax():
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(3, 9)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, (2, 5)))

    def dense(h, w):
        return jnp.take_along_axis(jax.nn.log_softmax(h @ w), targets[..., None], axis=-1)[..., 0]

    got = jax.jit(lambda h, w: ptl.token_log_probs(h, w, targets, chunk_size=4))(hidden, head)
    np.testing.assert_allclose(got, dense(hidden, head), rtol=1e-5)
    g = jax.jit(jax.grad(lambda h, w: jnp.sum(ptl.token_log_probs(h, w, targets, chunk_size=4) ** 2),
                         argnums=(0, 1)))(hidden, head)
    g_d = jax.grad(lambda h, w: jnp.sum(dense(h, w) ** 2), argnums=(0, 1))(hidden, head)
    for a, b in zip(g, g_d):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_per_sequence_mean_is_per_row_and_segment():
    x = jnp.array([[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 6.0, 8.0]])
    w = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    seg = jnp.array([[1, 1, 2, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(ptl._per_sequence_mean(x, w, seg), [[2, 2, 5, 0], [16 / 3] * 4])


@pytest.mark.slow  # compiles a (toy) train step: ~10 s alone, more on a busy machine
def test_grpo_loss_in_the_shared_step_raises_good_and_lowers_bad_completions():
    """One on-policy GRPO step through `train.make_train_step(loss_fn=...)` on the train-step test's toy model."""
    s = train.TrainSettings(**{**_SETTINGS, "bias_speed": 0.0})
    tx = train.make_optimizer(s)
    graphdef, state = train.init_state(_Toy(nnx.Rngs(0)), tx, seed=0)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}

    @jax.jit
    def log_probs(params, extras):
        model = nnx.merge(graphdef, params, extras)
        out = model.forward_train(batch["tokens"], batch["segment_ids"], batch["positions"])
        return ptl.token_log_probs(out.hidden, model.head[...], batch["targets"], chunk_size=16)

    before = log_probs(state.params, state.extras)
    adv = jnp.zeros_like(before).at[0].set(1.0).at[2].set(-1.0)
    rollout = {**batch, "loss_weights": (batch["segment_ids"] != 0).astype(jnp.float32), "advantages": adv,
               "old_log_probs": before, "ref_log_probs": before}
    step = train.make_train_step(graphdef, get_config("tiny"), tx, s, phase="sparse",
                                 loss_fn=ptl.make_grpo_loss(0.1, opsm_delta=0.5))
    new, m = step(state, rollout)
    assert bool(m["update_ok"]) and float(m["kl"]) == 0.0 and float(m["clipped_fraction"]) == 0.0
    np.testing.assert_allclose(m["loss"], -float(jnp.sum(adv * rollout["loss_weights"])) / float(m["tokens"]),
                               rtol=1e-5)  # on-policy: r = 1, the loss is -mean(A)
    after = log_probs(new.params, new.extras)
    assert float(jnp.mean(after[0] - before[0])) > 0 > float(jnp.mean(after[2] - before[2]))
