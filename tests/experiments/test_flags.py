"""Flags are generated from the dataclasses: one per field, typed. Config: unset = the preset's value; settings:
the field's default and description."""

import dataclasses

import pytest
from absl import flags

from deepseek_v4 import config as config_lib
from deepseek_v4 import train
from experiments import flags as flag_gen
from experiments import run as run_lib


@pytest.fixture()
def fv():
    values = flags.FlagValues()
    flag_gen.define_config_flags(values)
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
    assert flag_gen.config_from_flags(fv) == config_lib.NANO  # no flags: the default preset


def test_overrides_apply_on_top_of_the_preset(fv):
    fv(["prog", "--config=tiny", "--hidden_size=32", "--compress_ratios=0,4,16,4,16,4,0", "--rope_theta=5000"])
    cfg = flag_gen.config_from_flags(fv)
    assert cfg == config_lib.get_config("tiny", hidden_size=32, rope_theta=5000.0)
    assert flag_gen.config_overrides(fv) == {"hidden_size": 32, "rope_theta": 5000.0,
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
        flag_gen.config_from_flags(fv)
    assert "\n" not in str(e.value)


def test_unknown_preset_is_rejected_by_the_parser(fv):
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["prog", "--config=huge"])


# ---- settings dataclasses -----------------------------------------------------------------------------------


@pytest.fixture()
def settings_fv():
    values = flags.FlagValues()
    flag_gen.define_settings_flags(train.TrainSettings, values)
    flag_gen.define_settings_flags(run_lib.RunSettings, values)
    return values


@pytest.mark.parametrize("cls", [train.TrainSettings, run_lib.RunSettings])
def test_one_flag_per_settings_field_with_its_default_and_help(settings_fv, cls):
    settings_fv(["prog"])
    for field in dataclasses.fields(cls):
        flag = settings_fv[field.name]
        assert field.metadata["help"] in flag.help, field.name
    assert flag_gen.settings_from_flags(cls, settings_fv) == cls()  # no flags: the dataclass defaults
    assert settings_fv["optimizer"].flag_type() == "string enum" and settings_fv["learning_rate"].flag_type() == "float"


def test_no_flags_is_the_nano_quick_start(settings_fv):
    settings_fv(["prog"])
    s = flag_gen.settings_from_flags(train.TrainSettings, settings_fv)
    assert s.steps == 40 and s.warmup_steps == 4  # warmup unset: 10% of the steps
    assert train.TrainSettings(steps=200).warmup_steps == 20 and train.TrainSettings(steps=1).warmup_steps == 0
    assert train.TrainSettings(steps=200, warmup_steps=7).warmup_steps == 7


def test_settings_flags_convert_to_the_field_types(settings_fv):
    settings_fv(["prog", "--steps=12", "--warmup_steps=3", "--schedule=cosine", "--data_weights=1,2.5",
                 "--debug_nan_at_steps=2,4", "--noplot", "--progress=false", "--peak_flops=1e12"])
    s = flag_gen.settings_from_flags(train.TrainSettings, settings_fv)
    assert (s.steps, s.warmup_steps, s.schedule) == (12, 3, "cosine")
    opts = flag_gen.settings_from_flags(run_lib.RunSettings, settings_fv)
    assert opts.data_weights == (1.0, 2.5) and opts.debug_nan_at_steps == (2, 4)
    assert opts.plot is False and opts.progress is False and opts.peak_flops == 1e12


@pytest.mark.parametrize("argv, message", [
    (["--batch_size=0"], "--batch_size must be >= 1"),
    (["--data_weights=1,x"], "--data_weights takes comma-separated numbers"),
    (["--debug_nan_at_steps=two"], "--debug_nan_at_steps takes comma-separated integers"),
    (["--peak_flops=0"], "--peak_flops must be positive"),
])
def test_bad_run_settings_are_one_line_errors(settings_fv, argv, message):
    settings_fv(["prog", *argv])
    with pytest.raises(ValueError, match=message) as e:
        flag_gen.settings_from_flags(run_lib.RunSettings, settings_fv)
    assert "\n" not in str(e.value)


def test_a_tool_can_take_some_fields_with_its_own_defaults():
    values = flags.FlagValues()
    names = flag_gen.define_settings_flags(run_lib.RunSettings, values, names=("batch_size", "seq_len"),
                                           defaults={"seq_len": 4096, "batch_size": None})
    values(["prog", "--batch_size=16"])
    assert names == ["batch_size", "seq_len"] and "mesh" not in values
    assert flag_gen.settings_values(run_lib.RunSettings, values, names=names) == {"batch_size": 16, "seq_len": 4096}
