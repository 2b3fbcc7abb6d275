"""Recipes as data: the published V4 numbers in the tables, stage resolution in steps, overrides and bad input."""

import dataclasses

import pytest

from deepseek_v4 import recipes, train


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_stages_tile_the_run_and_give_valid_settings(name):
    r = recipes.get_recipe(name)
    s = recipes.resolve(r)
    first, step, token = s.stages[0], 0, 0
    assert first.first_step == 0 and first.first_token == 0
    for st in s.stages:  # contiguous in steps and tokens, each stage reaching its `until`
        assert (st.first_step, st.first_token) == (step, token)
        step, token = st.end_step, st.end_token
        assert st.end_token >= r.stages[st.index].until
        assert st.end_token - st.tokens_per_step < r.stages[st.index].until
    assert s.steps == step == s.settings["steps"]
    settings = train.TrainSettings(**s.settings)
    # the indexer warm-up stages are the trainer's warm-up, right before the first sparse stage; the main
    # optimizer (and with it the LR schedule and the decay start) does not count their steps
    warmup = [st for st in s.stages if st.attention == "indexer_warmup"]
    assert settings.indexer_warmup_steps == sum(st.steps for st in warmup)
    assert train.decay_steps(settings) == settings.optimizer_steps - settings.decay_start
    decay_step = settings.decay_start + settings.indexer_warmup_steps  # the decay comes after the warm-up
    # the decay starts where the token count reaches the last decay_tokens
    assert s.tokens_at(decay_step) >= r.tokens - r.decay_tokens
    assert s.tokens_at(decay_step - 1) < r.tokens - r.decay_tokens
    sparse = [st for st in s.stages if st.attention == "sparse"]
    assert settings.sparse_attention_after == sparse[0].first_step
    for st in warmup:
        assert {train.csa_phase(settings, i) for i in range(st.first_step, st.end_step)} == {"warmup"}
    assert not train.sparse_at(settings, sparse[0].first_step - 1) and train.sparse_at(settings, sparse[0].first_step)


@pytest.mark.parametrize("name, peak, tokens_per_step, total", [("flash", 2.7e-4, 75.5e6, 32e12),
                                                                ("pro", 2.0e-4, 94.4e6, 33e12)])
def test_v4_tables_hold_the_published_numbers(name, peak, tokens_per_step, total):
    r = recipes.get_recipe(name)
    assert r.learning_rate == peak and r.final_lr_fraction == 0.1 and r.warmup_steps == 2000
    assert (r.mtp_weight, r.mtp_weight_after_decay, r.bias_speed, r.balance_weight) == (0.3, 0.1, 1e-3, 1e-4)
    assert round(r.stages[-1].batch_tokens / 1e5) == round(tokens_per_step / 1e5)
    assert r.tokens == total
    assert sorted({st.seq_len for st in r.stages}) == [4096, 16384, 65536, 1048576]
    first_sparse = next(st for st in r.stages if st.attention == "sparse")
    assert first_sparse.seq_len == 65536  # sparse from the 64K stage
    dense_end = max(st.until for st in r.stages if st.attention == "dense")
    assert dense_end >= 1e12  # dense for (at least) the first 1T tokens
    assert all("chosen" in st.source for st in r.stages)  # V4 does not publish the stage budgets
    assert "chosen" in r.sources["decay_tokens"] and r.sources["learning_rate"] == recipes.PAPER


def test_nano_crosses_every_kind_of_boundary():
    s = recipes.resolve(recipes.NANO)
    kinds = set()
    for a, b in zip(s.stages, s.stages[1:]):
        kinds.add("batch" if a.seq_len == b.seq_len and a.batch_size != b.batch_size else
                  "seq_len" if a.seq_len != b.seq_len else "attention")
    assert kinds == {"batch", "seq_len", "attention"}
    assert [st.attention for st in s.stages].count("indexer_warmup") == 1


def test_stage_at_and_tokens_at():
    s = recipes.resolve(recipes.NANO)
    for st in s.stages:
        assert s.stage_at(st.first_step) is st and s.stage_at(st.end_step - 1) is st
        assert s.tokens_at(st.first_step) == st.first_token and s.tokens_at(st.end_step) == st.end_token
    assert s.stage_at(s.steps) is s.stages[-1]


def test_flags_override_recipe_fields_and_are_reported():
    s = recipes.resolve(recipes.NANO, {"learning_rate": 1e-3, "bias_speed": 1e-3, "grad_accum": 2})
    assert s.settings["learning_rate"] == 1e-3
    assert s.overrides == {"learning_rate": (3e-3, 1e-3)}  # the same value is no override
    assert "--learning_rate=0.001 (recipe 0.003)" in s.table()
    assert {st.grad_accum for st in s.stages} == {2}


@pytest.mark.parametrize("given, match", [
    ({"seq_len": 128}, "--seq_len=128 contradicts --recipe=nano, whose stages give seq_len 128, 256, 512, 1024"),
    ({"batch_size": 3}, "--batch_size=3 contradicts"),
    ({"steps": 10}, "--steps=10 contradicts --recipe=nano, whose stages give steps 52"),
    ({"sparse_attention_after": 0}, "--sparse_attention_after=0 contradicts"),
])
def test_a_flag_contradicting_a_stage_is_a_one_line_error(given, match):
    with pytest.raises(ValueError, match=match) as e:
        recipes.resolve(recipes.NANO, given)
    assert "\n" not in str(e.value)


def _with_stages(*stages):
    return dataclasses.replace(recipes.NANO, stages=tuple(stages), decay_tokens=128)


@pytest.mark.parametrize("recipe, match", [
    (_with_stages(recipes.Stage("a", 4096, 128, 512, "dense", ""), recipes.Stage("b", 2048, 128, 512, "dense", "")),
     "stage 'b': stages out of order"),
    (_with_stages(recipes.Stage("a", 4096, 128, 512, "sparse", ""), recipes.Stage("b", 8192, 128, 512, "dense", "")),
     "attention goes back to 'dense'"),
    (_with_stages(recipes.Stage("a", 4096, 128, 500, "dense", "")), "not a positive multiple of seq_len"),
    (_with_stages(recipes.Stage("a", 4096, 128, 512, "local", "")), "attention 'local' is not one of"),
])
def test_bad_tables_are_one_line_errors(recipe, match):
    with pytest.raises(ValueError, match=match) as e:
        recipes.resolve(recipe)
    assert "\n" not in str(e.value)


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown recipe 'huge'; choose one of nano, flash, pro"):
        recipes.get_recipe("huge")


def test_schedule_round_trips_to_json():
    import json

    s = recipes.resolve(recipes.FLASH)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["settings"]["steps"] == s.steps and len(d["stages"]) == len(s.stages)
    assert len(s.table().splitlines()) == len(s.stages) + 4
