import json

import pytest

from deepseek_v4.config import PRESETS, Config, get_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    cfg = get_config(name)
    assert Config.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["compress_ratios"] == list(cfg.compress_ratios)


def test_flash_and_pro_published_values():
    flash, pro = get_config("flash"), get_config("pro")
    assert (flash.hidden_size, flash.num_hidden_layers, flash.num_attention_heads, flash.q_lora_rank) == (4096, 43, 64,
                                                                                                        1024)
    assert (pro.hidden_size, pro.num_hidden_layers, pro.num_attention_heads, pro.q_lora_rank) == (7168, 61, 128, 1536)
    assert len(flash.compress_ratios) == 44 and len(pro.compress_ratios) == 62
    assert flash.compress_ratios[:4] == (0, 0, 4, 128) and flash.compress_ratios[-2:] == (4, 0)
    assert pro.compress_ratios[:4] == (128, 128, 4, 128) and pro.compress_ratios[-2:] == (4, 0)
    assert [flash.layer_ratios.count(r) for r in (0, 4, 128)] == [2, 21, 20]
    assert [pro.layer_ratios.count(r) for r in (0, 4, 128)] == [0, 30, 31]
    assert (flash.index_topk, pro.index_topk, flash.n_routed_experts, pro.n_routed_experts) == (512, 1024, 256, 384)
    assert (flash.routed_scaling_factor, pro.routed_scaling_factor) == (1.5, 2.5)
    assert flash.compress_rope_theta == 160000 and flash.rope_scaling_factor == 16


def test_tiny_and_nano_keep_the_real_vocabulary():
    assert get_config("tiny").vocab_size == get_config("nano").vocab_size == 129280


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("nope", {}, "unknown config preset"),
        ("tiny", {"hidden_sise": 3}, "unknown config field"),
        ("tiny", {"num_experts_per_tok": 9}, "cannot exceed n_routed_experts"),
        ("tiny", {"o_groups": 3}, "divisible by o_groups"),
        ("tiny", {"num_hidden_layers": 5}, "compress_ratios needs"),
        ("tiny", {"compress_ratios": (0, 4, 16, 4, 16, 4, 4)}, "MTP layers are sliding"),
        ("tiny", {"compress_ratios": (0, 4, 8, 4, 16, 4, 0)}, "compress_ratios entries"),
        ("tiny", {"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
        ("tiny", {"dtype": "float16"}, "dtype"),
        ("tiny", {"hidden_size": 0}, "hidden_size must be positive"),
    ],
)
def test_bad_values_raise_one_line_errors(name, overrides, message):
    with pytest.raises(ValueError, match=message) as e:
        get_config(name, **overrides)
    assert "\n" not in str(e.value)
