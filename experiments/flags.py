"""absl flags generated from dataclasses: one flag per field, so each setting is declared once.

`define_config_flags` gives `--config=PRESET` plus one flag per `Config` field whose default is "unset": the
preset's value stands unless the flag is given. `define_settings_flags` gives one flag per field of a settings
dataclass (`TrainSettings`, `RunSettings`), its default the field's default and its help the field's
`metadata["help"]` (`metadata["choices"]` makes it an enum). Adding a field adds its flag.

Field types: int, float, str, bool, `X | None`, and tuples of int or float (comma lists).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

from absl import flags

from deepseek_v4 import config as config_lib

CONFIG_FLAG = "config"


def _field_type(cls: type, name: str) -> Any:
    """The field's type with `| None` removed."""
    kind = typing.get_type_hints(cls)[name]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _tuple_item(kind: Any) -> type | None:
    """int or float for tuple[int, ...] / tuple[float, ...], else None."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if item in (int, float):
            return item
    return None


def _parse_tuple(name: str, item: type, values: list[str]) -> tuple:
    try:
        return tuple(item(v) for v in values)
    except ValueError:
        what = "integers" if item is int else "numbers"
        raise ValueError(f"--{name} takes comma-separated {what}, got {','.join(values)!r}") from None


def _define(cls: type, field: dataclasses.Field, default: Any, help_text: str, flag_values: flags.FlagValues) -> None:
    kind = _field_type(cls, field.name)
    choices = field.metadata.get("choices")
    if choices is not None and kind is str:
        flags.DEFINE_enum(field.name, default, list(choices), help_text, flag_values=flag_values)
    elif kind is bool:
        flags.DEFINE_bool(field.name, default, help_text, flag_values=flag_values)
    elif kind is int:
        flags.DEFINE_integer(field.name, default, help_text, flag_values=flag_values)
    elif kind is float:
        flags.DEFINE_float(field.name, default, help_text, flag_values=flag_values)
    elif kind is str:
        flags.DEFINE_string(field.name, default, help_text, flag_values=flag_values)
    elif _tuple_item(kind) is not None:
        listed = None if default is None else [str(v) for v in default]
        word = "integers" if _tuple_item(kind) is int else "numbers"
        flags.DEFINE_list(field.name, listed, f"{help_text} Comma-separated {word}.", flag_values=flag_values)
    else:
        raise TypeError(f"no flag type for {cls.__name__}.{field.name}: {kind}")


def _value(cls: type, name: str, flag_values: flags.FlagValues) -> Any:
    """The flag's value converted to the field type (comma lists to tuples)."""
    value = flag_values[name].value
    item = _tuple_item(_field_type(cls, name))
    if value is not None and item is not None:
        value = _parse_tuple(name, item, value)
    return value


def _selected(cls: type, names: Iterable[str] | None) -> list[dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if names is None:
        return list(fields.values())
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return [fields[n] for n in names]


# ---- settings dataclasses -------------------------------------------------------------------------------


def define_settings_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS, *,
                          names: Iterable[str] | None = None, defaults: dict[str, Any] | None = None) -> list[str]:
    """Define one flag per field of the dataclass `cls` (or of the fields in `names`); returns the names.

    The flag's default is the field's default; `defaults` replaces it for a tool whose typical run differs
    (e.g. the memory planner's sequence length). The help is `metadata["help"]`.

    Raises:
      TypeError: a field has a type this generator does not know (add it here), or `names` has an unknown one.
    """
    defaults = defaults or {}
    out = []
    for field in _selected(cls, names):
        default = defaults.get(field.name, field.default)
        if default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{field.name} has no default to give its flag")
        help_text = field.metadata.get("help", f"{cls.__name__}.{field.name}.")
        _define(cls, field, default, help_text, flag_values)
        out.append(field.name)
    return out


def settings_values(cls: type, flag_values: flags.FlagValues = flags.FLAGS, *,
                    names: Iterable[str] | None = None) -> dict[str, Any]:
    """Every field flag of `cls` (or those in `names`) as {field: value}, converted to the field types.

    Raises:
      ValueError: a one-line message for a comma list that does not parse.
    """
    return {f.name: _value(cls, f.name, flag_values) for f in _selected(cls, names)}


def settings_from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS) -> Any:
    """`cls(**settings_values(cls))`: the dataclass validates (one-line ValueError)."""
    return cls(**settings_values(cls, flag_values))


# ---- the model config -----------------------------------------------------------------------------------


def define_config_flags(flag_values: flags.FlagValues = flags.FLAGS, *, default_preset: str = "nano") -> list[str]:
    """Define `--config` and one flag per `Config` field (unset: the preset's value); returns the field names.

    Raises:
      TypeError: a field has a type this generator does not know (add it here).
    """
    flags.DEFINE_enum(CONFIG_FLAG, default_preset, list(config_lib.PRESETS), "Model preset; field flags override it.",
                      flag_values=flag_values)
    names = []
    for field in dataclasses.fields(config_lib.Config):
        preset_default = getattr(config_lib.PRESETS[default_preset], field.name)
        help_text = f"Config.{field.name} (unset: the preset's value; {default_preset}: {preset_default})."
        _define(config_lib.Config, field, None, help_text, flag_values)
        names.append(field.name)
    return names


def config_overrides(flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """The `Config` fields given on the command line, converted to the field types."""
    out = {}
    for field in dataclasses.fields(config_lib.Config):
        value = _value(config_lib.Config, field.name, flag_values)
        if value is not None:
            out[field.name] = value
    return out


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> config_lib.Config:
    """The preset named by `--config` with every given field flag applied (validated by `Config`).

    Raises:
      ValueError: a one-line message naming the bad value.
    """
    return config_lib.get_config(flag_values[CONFIG_FLAG].value, **config_overrides(flag_values))
