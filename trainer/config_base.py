"""What every command config shares: `opt` (a dataclass field with its CLI help and the options generator's
hints) and building a config dataclass from a nested dict (a config file, flags given), checked field by field.

Its own module so the command configs can live in several modules (trainer/config.py, trainer/config_commands.py)
without importing each other. No torch, no PIL.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any, Literal

from pipeline.core.errors import ConfigError


def opt(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:
    """A dataclass field with its CLI help (and options-generator hints: flag=, path=, cli=False, required=,
    preset=, min=, choices= a zero-argument callable giving the accepted values, read when used, default_text=
    what the help shows as the default, metavar=). `default` may be a zero-argument callable for a mutable default."""
    kw: dict[str, Any] = {"metadata": {"help": help, **meta}}
    if callable(default):
        kw["default_factory"] = default
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return field(**kw)


def _get(d: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def missing_required(cls: type, d: dict) -> list[str]:
    """Flags of required fields that a nested config dict (files and flags combined) leaves empty."""
    from trainer.options import fields_of

    out = []
    for o in fields_of(cls):
        if not o.field.metadata.get("required"):
            continue
        value = _get(d, o.path)
        if value is None:
            value = None if o.field.default is dataclasses.MISSING else o.field.default
        if value in (None, ""):
            out.append(o.flag)
    return out


def command_config(cls: type, given: dict, file: dict | None = None) -> Any:
    """A command's config from a --config file and the flags given (flags win); required fields checked. (Not for
    `train`: trainer.config.resolve_train layers presets and checks the whole TrainConfig.)"""
    from trainer.options import merge

    d = merge(file or {}, given)
    missing = missing_required(cls, d)
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    return build(cls, d)


def build(cls: type, d: dict, where: str = "") -> Any:
    """Instantiate dataclass `cls` from a nested dict, checking names, and coercing lists to tuples."""
    if not isinstance(d, dict):
        raise ConfigError(f"config section {where.rstrip('.') or cls.__name__} must be a table/object, got "
                          f"{type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = _unknown_keys(cls, d, where)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    kw = {}
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kw[name] = build(hint, value, f"{where}{name}.")
        else:
            key = _key(where + name, fields[name])
            kw[name] = _checked(tuple(value) if isinstance(value, list) else value, hint, key)
            choices = fields[name].metadata.get("choices")
            if choices is not None and kw[name] is not None and kw[name] not in choices():
                raise ConfigError(f"{key}: {kw[name]!r} is not one of {', '.join(choices())}")
            lo, hi = fields[name].metadata.get("min"), fields[name].metadata.get("max")
            if kw[name] is not None and ((lo is not None and kw[name] < lo) or (hi is not None and kw[name] > hi)):
                bound = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"in [{lo}, {hi}]"
                raise ConfigError(f"{key}: {kw[name]!r} must be {bound}")
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config {where or cls.__name__}: {e}") from e


def _unknown_keys(cls: type, d: dict, where: str) -> list[str]:
    """Every key of `d` (and of its sections) that no field of `cls` takes, so one message lists them all."""
    hints = typing.get_type_hints(cls)
    out = []
    for k, v in d.items():
        if k not in hints:
            out.append(where + k)
        elif dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            out += _unknown_keys(hints[k], v, f"{where}{k}.")
    return sorted(out)


def _key(path: str, f: dataclasses.Field) -> str:
    """How messages name a field: its config key and, where it has one, the flag the user may have typed."""
    if not f.metadata.get("cli", True):
        return f"config key {path}"
    return f"config key {path} ({f.metadata.get('flag') or '--' + f.name.replace('_', '-')})"


def _checked(value: Any, hint: Any, name: str) -> Any:
    """`value` if it fits the field's type (Literal choices, int/float/bool/str, tuples, optional), else a
    ConfigError naming the key (`name`, as _key writes it): config files are not checked by click, and click
    takes `inf` and `nan` for a float."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _checked(value, inner[0], name) if len(inner) == 1 else value
    if typing.get_origin(hint) is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if typing.get_origin(hint) is tuple and args == (float, float):  # a LO HI pair
        if not isinstance(value, tuple) or len(value) != 2 or not all(_is_number(x) for x in value):
            raise ConfigError(f"{name}: expected two finite numbers [LO, HI], got {value!r}")
        return tuple(float(x) for x in value)
    if typing.get_origin(hint) is tuple and args == (int, int):  # e.g. an image's height and width
        if not isinstance(value, tuple) or len(value) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in value):
            raise ConfigError(f"{name}: expected two integers, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{name}: expected a list of names, got {value!r}")
        return value
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), str: lambda v: isinstance(v, str)}
    if hint in ok and not ok[hint](value):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    return float(value) if hint is float else value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
