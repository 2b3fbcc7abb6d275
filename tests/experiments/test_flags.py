"""Config flags are generated from the dataclass: one per field, typed, unset = the preset's value."""

import dataclasses

import pytest
from absl import flags

from deepseek_v4 import config as config_lib
from experiments import flags as config_flags


@pytest.fixture()
def fv():
    values = flags.FlagValues()
    config_flags.define_config_flags(values)
    return values


def test_one_flag_per_field_with_the_field_type(fv):
    names = [f.name for f in dataclasses.fields(config_lib.Config)]
    for name in names:
        assert name in fv, name
    fv(["prog"])
    assert fv["hidden_size"].flag_type() == "int"
    assert fv["rope_theta"].flag_type() == "float"
    assert fv["dtype"].flag_type() == "string"
    assert "list" in fv["compress_ratios"].flag_type()
    assert config_flags.config_from_flags(fv) == config_lib.NANO  # no flags: the default preset


def test_overrides_apply_on_top_of_the_preset(fv):
    fv(["prog", "--config=tiny", "--hidden_size=32", "--compress_ratios=0,4,16,4,16,4,0", "--rope_theta=5000"])
    cfg = config_flags.config_from_flags(fv)
    assert cfg == config_lib.get_config("tiny", hidden_size=32, rope_theta=5000.0)
    assert config_flags.config_overrides(fv) == {"hidden_size": 32, "rope_theta": 5000.0,
                                                 "compress_ratios": (0, 4, 16, 4, 16, 4, 0)}


@pytest.mark.parametrize("argv, message", [
    (["--hidden_size=-4"], "hidden_size must be positive"),
    (["--compress_ratios=0,x"], "comma-separated integers"),
    (["--compress_ratios=0,4"], "compress_ratios needs"),
    (["--dtype=float16"], "dtype must be"),
])
def test_bad_values_are_one_line_errors(fv, argv, message):
    fv(["prog", *argv])
    with pytest.raises(ValueError, match=message) as e:
        config_flags.config_from_flags(fv)
    assert "\n" not in str(e.value)


def test_unknown_preset_is_rejected_by_the_parser(fv):
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["prog", "--config=huge"])
