"""tools.eval_tasks: greedy accuracy on a verifiable task (the generation is stubbed: only the scoring is tested
here; tests/experiments/test_distill.py and the post-training recipe run it on real models)."""

import numpy as np
import pytest

from deepseek_v4 import chat, verifiable_tasks
from deepseek_v4.tokenizer import get_tokenizer
from tools import eval_tasks


def test_accuracy_counts_exact_answers_in_the_chat_format(monkeypatch):
    rng = np.random.default_rng(1000)
    answers = [verifiable_tasks.make_problem("string", rng).answer for _ in range(5)]
    tok = get_tokenizer()
    eos = chat.SPECIAL_TOKEN_IDS[chat.EOS]

    def fake_generate(model, prompts, max_new_tokens, greedy):
        assert greedy and len(prompts) <= 2 and all(p[0] == 0 for p in prompts)
        out = []
        for _ in prompts:
            i = len(fake_generate.seen)
            fake_generate.seen.append(i)
            text = f"Answer: {answers[i]}" if i in (0, 3) else ("Answer: wrong" if i == 1 else "no answer")
            out.append(tok.encode(text).tolist() + ([eos] if i != 4 else []))
        return out

    fake_generate.seen = []
    monkeypatch.setattr(eval_tasks.inference, "generate", fake_generate)
    got = eval_tasks.evaluate(object(), "string", 5, batch=2)
    assert got == {"task": "string", "mode": "non-think", "n": 5, "correct": 2, "accuracy": 0.4, "parsed": 0.8}
    with pytest.raises(ValueError, match="must be >= 1"):
        eval_tasks.evaluate(object(), "string", 0)
    with pytest.raises(ValueError, match="unknown chat mode"):
        eval_tasks.evaluate(object(), "string", 1, mode="fast")
