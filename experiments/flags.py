"""absl flags generated from the `Config` dataclass: `--config=PRESET` plus one flag per field.

Each field becomes a flag of the field's type (int, float, str, bool; tuples as comma lists) whose default
is "unset": the preset's value stands unless the flag is given. Adding a field to `Config` adds its flag.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from absl import flags

from deepseek_v4 import config as config_lib

CONFIG_FLAG = "config"


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(config_lib.Config)


def _parse_int_tuple(name: str, values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{name} takes comma-separated integers, got {','.join(values)!r}") from None


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """Define `--config` and one flag per `Config` field; returns the field names.

    Raises:
      TypeError: a field has a type this generator does not know (add it here).
    """
    flags.DEFINE_enum(CONFIG_FLAG, "nano", list(config_lib.PRESETS), "Model preset; field flags override it.",
                      flag_values=flag_values)
    names = []
    for field in dataclasses.fields(config_lib.Config):
        kind = _field_types()[field.name]
        preset_default = getattr(config_lib.PRESETS["nano"], field.name)
        help_text = f"Config.{field.name} (unset: the preset's value; nano: {preset_default})."
        if kind is bool:
            flags.DEFINE_bool(field.name, None, help_text, flag_values=flag_values)
        elif kind is int:
            flags.DEFINE_integer(field.name, None, help_text, flag_values=flag_values)
        elif kind is float:
            flags.DEFINE_float(field.name, None, help_text, flag_values=flag_values)
        elif kind is str:
            flags.DEFINE_string(field.name, None, help_text, flag_values=flag_values)
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[0] is int:
            flags.DEFINE_list(field.name, None, help_text + " Comma-separated integers.", flag_values=flag_values)
        else:
            raise TypeError(f"no flag type for Config.{field.name}: {kind}")
        names.append(field.name)
    return names


def config_overrides(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The `Config` fields given on the command line, converted to the field types."""
    out = {}
    for field in dataclasses.fields(config_lib.Config):
        value = flag_values[field.name].value
        if value is None:
            continue
        kind = _field_types()[field.name]
        if typing.get_origin(kind) is tuple:
            value = _parse_int_tuple(field.name, value)
        out[field.name] = value
    return out


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_lib.Config:
    """The preset named by `--config` with every given field flag applied (validated by `Config`).

    Raises:
      ValueError: a one-line message naming the bad value.
    """
    return config_lib.get_config(flag_values[CONFIG_FLAG].value, **config_overrides(flag_values))
