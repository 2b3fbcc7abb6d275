"""SFT data: checks, loss masks, packing and the resumable iterator (deepseek_v4/sft_data.py), and the toy tasks."""

import json

import numpy as np
import pytest

from deepseek_v4 import chat, sft_data, verifiable_tasks
from deepseek_v4.tokenizer import Tokenizer

Q = {"role": "user", "content": "What is 2 + 3?"}
A = {"role": "assistant", "content": "Answer: 5", "reasoning_content": "2 + 3 = 5."}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _decode(tok, ids):
    return tok._tok.decode([int(i) for i in ids], skip_special_tokens=False)


@pytest.mark.parametrize("mode,include_reasoning,trained", [
    ("non-think", True, "Answer: 5" + chat.EOS),
    ("think-high", True, "2 + 3 = 5." + chat.THINK_END + "Answer: 5" + chat.EOS),
    ("think-max", False, "Answer: 5" + chat.EOS),
])
def test_loss_weights_cover_exactly_the_assistant_tokens(tok, mode, include_reasoning, trained):
    docs, skipped = sft_data.encode_examples([{"messages": [Q, A], "mode": mode}], 512,
                                             include_reasoning=include_reasoning)
    assert skipped.total == 0
    doc = docs[0]
    np.testing.assert_array_equal(doc.tokens[1:], doc.targets[:-1])  # targets are the next tokens
    weighted = doc.targets[doc.loss_weights > 0]
    assert _decode(tok, weighted) == trained
    assert set(np.unique(doc.loss_weights)) <= {0.0, 1.0}
    # The weighted targets are one run at the end: the prompt, the assistant prefix and <think> carry no loss.
    first = int(np.argmax(doc.loss_weights > 0))
    assert doc.loss_weights[first:].all()
    assert _decode(tok, doc.tokens[:first + 1]) + trained == chat.encode([Q, A], mode)


@pytest.mark.parametrize("messages,error", [
    ([], "non-empty"),
    ([Q, Q, A], "do not alternate"),
    ([Q, A, A], "do not alternate"),
    ([A], "do not alternate"),
    ([Q], "end with an assistant"),
    ([Q, A, {"role": "system", "content": "x"}, Q, A], "system message after"),
    ([Q, {"role": "tool", "content": "1"}, A], "tool message must follow"),
    ([Q, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "no results"),
])
def test_turns_that_do_not_alternate_are_rejected(messages, error):
    with pytest.raises(sft_data.BadExample, match=error):
        sft_data.check_turns(messages)


def test_tool_turns_and_reminders_are_accepted():
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    sft_data.check_turns([{"role": "system", "content": "s"}, {"role": "latest_reminder", "content": "d"}, Q, call,
                          {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, A, Q, A])


def test_bad_lines_are_counted_skips_and_all_bad_is_one_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": [Q, A], "mode": "think-high", "extra": 1}
    lines = [json.dumps(good), "{not json", "", json.dumps({"messages": [Q, A], "mode": "thinking"}),
             json.dumps({"messages": [Q, Q, A], "mode": "non-think"}), json.dumps({"messages": [Q, A], "mode": "x"}),
             json.dumps({"messages": [Q, {"role": "assistant", "content": 3}], "mode": "non-think"})]
    path.write_text("\n".join(lines) + "\n")
    examples, skipped = sft_data.read_chat_jsonl([str(path)])
    docs, skipped = sft_data.encode_examples(examples, 512, skipped=skipped)
    assert len(docs) == 1 and skipped.total == 5
    assert skipped.counts["unknown mode"] == 2 and skipped.counts["not a JSON object"] == 1
    assert "chat.jsonl:2" in skipped.summary() and "\n" not in skipped.summary()
    with pytest.raises(ValueError, match="1 longer than --seq_len"):
        sft_data.encode_examples([good], 5)
    with pytest.raises(ValueError, match="no usable chat example") as e:
        sft_data.encode_examples([{"messages": [Q], "mode": "non-think"}], 512)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        sft_data.read_chat_jsonl([str(tmp_path / "missing.jsonl")])


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [sft_data.Document(tokens=rng.integers(2, 100, n).astype(np.int32),
                              targets=rng.integers(2, 100, n).astype(np.int32),
                              loss_weights=(rng.random(n) < 0.5).astype(np.float32)) for n in lengths]


def _segments(batch):
    """Every (row, segment) of a batch as its (tokens, targets, weights, positions)."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s == 0:
                continue
            sel = batch["segment_ids"][r] == s
            assert np.all(np.diff(np.flatnonzero(sel)) == 1)  # one contiguous run
            out.append(tuple(batch[k][r, sel] for k in ("tokens", "targets", "loss_weights", "positions")))
    return out


def test_packed_rows_hold_each_document_whole_with_its_own_positions():
    docs = _docs([5, 9, 3, 16, 7, 1, 12])
    batch = sft_data.pack(docs, 16)
    segs = _segments(batch)
    assert len(segs) == len(docs)
    for d, (t, y, w, p) in zip(docs, segs):
        np.testing.assert_array_equal(t, d.tokens)
        np.testing.assert_array_equal(y, d.targets)
        np.testing.assert_array_equal(w, d.loss_weights)
        np.testing.assert_array_equal(p, np.arange(len(d)))
    assert np.all(batch["loss_weights"][batch["segment_ids"] == 0] == 0)


def test_iterator_visits_every_document_once_per_epoch_and_resumes():
    docs = _docs([5, 9, 3, 16, 7, 1, 12, 4])
    it = sft_data.SFTIterator(docs, batch_size=2, seq_len=16, seed=3)
    seen = []
    while it.epoch == 0:
        seen += [len(s[0]) for s in _segments(next(it))]
    assert sorted(seen[:len(docs)]) == sorted(len(d) for d in docs)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(3)]
    again = sft_data.SFTIterator(docs, batch_size=2, seq_len=16, seed=3)
    again.set_state(state)
    for a, b in zip(want, [next(again) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="seed was 3, is 4"):
        sft_data.SFTIterator(docs, batch_size=2, seq_len=16, seed=4).set_state(state)
    # Two processes split each global batch.
    whole = next(sft_data.SFTIterator(docs, 4, 16, 0))
    parts = [next(sft_data.SFTIterator(docs, 4, 16, 0, process_index=i, process_count=2)) for i in range(2)]
    for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_toy_tasks_are_seeded_and_their_answers_score_one():
    a = verifiable_tasks.make_chat_set(12, seed=5)
    assert a == verifiable_tasks.make_chat_set(12, seed=5) and a != verifiable_tasks.make_chat_set(12, seed=6)
    assert {ex["mode"] for ex in a} == set(chat.MODES) and {ex["task"] for ex in a} == set(verifiable_tasks.TASKS)
    for ex in a:
        sft_data.check_turns(ex["messages"])
        reply = ex["messages"][-1]
        completion = chat.encode(ex["messages"], ex["mode"]).split(chat.ASSISTANT, 1)[1]
        completion = completion[len(chat.THINK_START if ex["mode"] != "non-think" else chat.THINK_END):]
        assert verifiable_tasks.answer_reward(ex["answer"], completion, ex["mode"]) == 1.0, completion
        assert verifiable_tasks.parse_answer(reply["content"]) == ex["answer"]
    assert verifiable_tasks.answer_reward("5", "Answer: 6" + chat.EOS, "non-think") == 0.0
    assert verifiable_tasks.answer_reward("5", "Answer: 5", "non-think") == 0.0  # truncated: no EOS
    with pytest.raises(ValueError, match="unknown task"):
        verifiable_tasks.make_chat_set(3, 0, tasks=("poetry",))


def test_a_reward_function_that_raises_is_a_counted_skip():
    def reward(x):
        if x == "boom":
            raise RuntimeError("judge\nunavailable")
        return float("nan") if x == "nan" else 1.0

    got = verifiable_tasks.score_group(reward, ["a", "boom", "nan", "b"])
    np.testing.assert_array_equal(got.valid, [True, False, False, True])
    np.testing.assert_array_equal(got.rewards, [1.0, 0.0, 0.0, 1.0])
    assert got.skipped == 2 and got.errors[0] == "sample 1: RuntimeError: judge"


def test_the_written_chat_set_reads_back_as_training_data(tmp_path):
    from tools.make_chat_data import write_chat_set

    path = str(tmp_path / "chat.jsonl")
    write_chat_set(path, verifiable_tasks.make_chat_set(6, seed=0))
    examples, skipped = sft_data.read_chat_jsonl([path])
    docs, skipped = sft_data.encode_examples(examples, 256, skipped=skipped)
    assert len(docs) == 6 and skipped.total == 0


def test_next_letter_and_larger_are_exact_and_cover_their_small_problem_spaces():
    rng = np.random.default_rng(0)
    letters = [verifiable_tasks.make_problem("next_letter", rng) for _ in range(400)]
    assert {p.question for p in letters} == {f"What letter comes after '{c}' in the alphabet?"
                                             for c in "abcdefghijklmnopqrstuvwxy"}
    assert all(p.answer == chr(ord(p.question.split("'")[1]) + 1) for p in letters)
    larger = [verifiable_tasks.make_problem("larger", rng) for _ in range(1000)]
    pairs = {tuple(int(x) for x in p.question[len("Which is larger, "):-1].split(" or ")) for p in larger}
    assert len(pairs) == 90 and all(a != b for a, b in pairs)
    assert all(p.answer == str(max(int(x) for x in p.question[len("Which is larger, "):-1].split(" or ")))
               for p in larger)
