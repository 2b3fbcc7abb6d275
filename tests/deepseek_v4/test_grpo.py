"""The GRPO loop's data side (deepseek_v4/grpo.py): batch layout, counted skips, settings, seeded prompts."""

import numpy as np
import pytest

from deepseek_v4 import chat, grpo, rollout, verifiable_tasks
from deepseek_v4.tokenizer import EOS_ID, get_tokenizer

L, K_EXPERTS, KEPT = 2, 2, 3


def _fake_rollouts(completions: list[list[int]], prompts: list[list[int]]) -> rollout.Rollouts:
    """Rollouts with recognisable values: log-prob -(position + 1) / 10, kept ids = token + 0..2, expert ids =
    the position in the sequence."""
    out = rollout.Rollouts([], [], [], [], [])
    for c, p in zip(completions, prompts):
        n = len(c)
        out.completions.append(c)
        out.log_probs.append(-(np.arange(n, dtype=np.float32) + 1) / 10)
        out.kept_ids.append(np.asarray(c, np.int32)[:, None] + np.arange(KEPT, dtype=np.int32))
        out.kept_valid.append(np.ones((n, KEPT), bool))
        out.expert_ids.append(np.broadcast_to(np.arange(len(p) + n - 1, dtype=np.int32)[None, :, None],
                                              (L, len(p) + n - 1, K_EXPERTS)).copy())
    return out


def _answer_tokens(text: str) -> list[int]:
    return [int(t) for t in get_tokenizer().encode(text)] + [EOS_ID]


def _problems():
    return [verifiable_tasks.Problem("arithmetic", "What is 1 + 1?", "2", ""),
            verifiable_tasks.Problem("arithmetic", "What is 2 + 2?", "4", ""),
            verifiable_tasks.Problem("arithmetic", "What is 3 + 3?", "6", "")]


def test_batch_layout_rewards_and_counted_skips():
    g = grpo.GRPOSettings(prompts_per_step=3, group_size=2, max_new_tokens=8, top_k=KEPT)
    problems = _problems()
    fits = np.array([True, True, False])  # the third prompt does not fit: a skipped group
    prompts = [[11, 12, 13]] * 2 + [[21, 22]] * 2
    right, wrong = _answer_tokens("Answer: 2"), _answer_tokens("Answer: 7")
    completions = [right, wrong, _answer_tokens("Answer: 4"), _answer_tokens("Answer: 4")]
    rollouts = _fake_rollouts(completions, prompts)

    def reward(problem, text, mode):
        if problem.answer == "4":
            raise RuntimeError("grader down\nsecond line")  # every sample of group 1 raises: skipped group
        return grpo.default_reward(problem, text, mode)

    batch, stats = grpo.build_batch(g, 24, problems, prompts, rollouts, fits, reward)
    assert stats.skipped_groups == 2 and stats.skipped_samples == 2 and len(stats.errors) == 2
    assert all("\n" not in e and "RuntimeError: grader down" in e for e in stats.errors)
    assert stats.mean_reward == 0.5 and stats.kept_fraction == pytest.approx(2 / 6)
    assert stats.signal_groups == pytest.approx(1 / 3)
    # row 0: prompt [11, 12, 13] + the right answer; the loss sits on the completion's targets
    seq = [11, 12, 13] + right
    t = len(seq) - 1
    np.testing.assert_array_equal(batch["tokens"][0, :t], seq[:-1])
    np.testing.assert_array_equal(batch["targets"][0, :t], seq[1:])
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * t + [0] * (24 - t))
    np.testing.assert_array_equal(batch["loss_weights"][0], [0] * 2 + [1] * len(right) + [0] * (24 - t))
    np.testing.assert_allclose(batch["advantages"][0, :t], 0.5)
    np.testing.assert_allclose(batch["advantages"][1, :t], -0.5)
    np.testing.assert_allclose(batch["old_log_probs"][0, 2:t], rollouts.log_probs[0])
    np.testing.assert_array_equal(batch["kept_ids"][0, 2:t], rollouts.kept_ids[0])
    np.testing.assert_array_equal(batch["kept_valid"][0, :2], 0)
    np.testing.assert_array_equal(batch["expert_ids"][0, :t, :, 0], np.arange(t)[:, None].repeat(L, 1))
    # the skipped groups carry no loss; the unfitting prompt's rows are padding
    assert batch["loss_weights"][2:].sum() == 0 and batch["segment_ids"][4:].sum() == 0
    assert batch["expert_ids"].shape == (6, 24, L, K_EXPERTS) and batch["kept_ids"].shape == (6, 24, KEPT)


def test_without_a_cut_or_with_the_stabilisers_off_the_batch_has_no_mask_or_routing():
    g = grpo.GRPOSettings(prompts_per_step=1, group_size=2, keep_routing=False)
    prompts = [[3, 4]] * 2
    rollouts = _fake_rollouts([[5, EOS_ID], [6, EOS_ID]], prompts)
    rollouts.kept_ids = [np.zeros((2, 0), np.int32)] * 2
    rollouts.kept_valid = [np.zeros((2, 0), bool)] * 2
    batch, stats = grpo.build_batch(g, 8, _problems()[:1], prompts, rollouts, np.array([True]), grpo.default_reward)
    assert "kept_ids" not in batch and "expert_ids" not in batch
    assert stats.mean_reward == 0.0 and stats.signal_groups == 0.0 and stats.skipped_groups == 0


def test_step_stats_of_several_processes_add_up_to_the_stats_of_all_their_prompts():
    """Each process scores its own prompts; adding their `totals` gives the statistics of the whole step."""
    g = grpo.GRPOSettings(prompts_per_step=2, group_size=2, max_new_tokens=8, keep_routing=False)
    problems = _problems()[:2]
    prompts = [[11, 12, 13]] * 2 + [[21, 22]] * 2
    completions = [_answer_tokens("Answer: 2"), _answer_tokens("Answer: 7"), _answer_tokens("Answer: 4"),
                   _answer_tokens("Answer: 4") + [5]]
    _, whole = grpo.build_batch(g, 24, problems, prompts, _fake_rollouts(completions, prompts), np.ones(2, bool),
                                grpo.default_reward)
    one = grpo.GRPOSettings(prompts_per_step=1, group_size=2, max_new_tokens=8, keep_routing=False)
    shares = [grpo.build_batch(one, 24, problems[i:i + 1], prompts[2 * i:2 * i + 2],
                               _fake_rollouts(completions[2 * i:2 * i + 2], prompts[2 * i:2 * i + 2]),
                               np.ones(1, bool), grpo.default_reward)[1] for i in range(2)]
    added = grpo.StepStats.from_totals(shares[0].totals() + shares[1].totals())
    assert added.record() == pytest.approx(whole.record())
    assert whole.mean_reward == 0.5 and whole.reward_std == pytest.approx(0.5)  # text after EOS: no parse
    assert whole.signal_groups == 1.0 and whole.mean_length == pytest.approx(np.mean([len(c) for c in completions]))


def test_all_groups_skipped_gives_an_empty_loss_not_an_error():
    g = grpo.GRPOSettings(prompts_per_step=2, group_size=2)
    batch, stats = grpo.build_batch(g, 8, _problems()[:2], [], None, np.array([False, False]), grpo.default_reward)
    assert stats.skipped_groups == 2 and batch["loss_weights"].sum() == 0 and batch["segment_ids"].sum() == 0


def test_length_penalty_is_per_mode():
    g = grpo.GRPOSettings(prompts_per_step=1, group_size=2, max_new_tokens=8, length_penalty=(0.5, 0.0, 0.0),
                          top_k=KEPT)
    prompts = [[3, 4]] * 2
    short, long = _answer_tokens("Answer: 2"), _answer_tokens("Answer:   2")
    batch, _ = grpo.build_batch(g, 24, _problems()[:1], prompts, _fake_rollouts([short, long], prompts),
                                np.array([True]), grpo.default_reward)
    gap = 0.5 * (len(long) - len(short)) / 8  # both right: only the length penalty tells them apart
    assert batch["advantages"][0, 0] == pytest.approx(gap / 2) and batch["advantages"][1, 0] == pytest.approx(-gap / 2)
    g = grpo.GRPOSettings(prompts_per_step=1, group_size=2, max_new_tokens=8, length_penalty=(0.5, 0.0, 0.0),
                          mode="think-high", top_k=KEPT)
    batch, _ = grpo.build_batch(g, 24, _problems()[:1], prompts, _fake_rollouts([short, long], prompts),
                                np.array([True]), grpo.default_reward)
    assert batch["advantages"].max() == 0.0  # another mode's coefficient (and the answer does not parse there)


def test_step_problems_are_seeded_by_seed_and_step():
    a = grpo.step_problems("string", 4, seed=1, step=3)
    assert a == grpo.step_problems("string", 4, seed=1, step=3)
    assert a != grpo.step_problems("string", 4, seed=1, step=4) and a != grpo.step_problems("string", 4, 2, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(task="chess"), "unknown task"), (dict(mode="think-low"), "unknown chat mode"),
    (dict(group_size=0), "--group_size must be >= 1"), (dict(top_p=0.0), "0 < --top_p <= 1"),
    (dict(init="a", hf_dir="b"), "not both"), (dict(length_penalty=(0.1, 0.1)), "one coefficient"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        grpo.GRPOSettings(**kwargs)
    assert "\n" not in str(e.value)


def test_prompt_tokens_are_the_chat_generation_prompt():
    problem = grpo.step_problems("arithmetic", 1, 0, 0)[0]
    ids = chat.token_ids(verifiable_tasks.prompt_messages(problem), "non-think")
    assert chat.encode(verifiable_tasks.prompt_messages(problem), "non-think").endswith(chat.ASSISTANT + chat.THINK_END)
    assert int(ids[0]) == 0 and int(ids[-1]) == chat.SPECIAL_TOKEN_IDS[chat.THINK_END]
