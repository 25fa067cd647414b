"""Click options generated from the config dataclasses (trainer/config.py), and config files.

Every field becomes one option: its flag (the field name with dashes, or the `flag` metadata; nested
dataclasses are flattened: loss.alpha is --alpha), its type and choices (int, float, str, bool as
--x/--no-x, Literal (or `choices=`, read from a registry when used) as a choice, tuple[str, ...] as a
comma-separated list, tuple[float, float] or tuple[int, int] as two numbers (--crop-scale 0.9 1.0, --size 64 64),
paths checked for existence;
url=True on a path field also accepts a URL), its help and displayed default from the metadata. Every
generated option defaults to None ("not given"), so a command can layer: dataclass defaults < --mode preset
< --config FILE (or a run's config.json) < the flags actually given.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import click

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One generated option: the field's path in the nested config, its flag and click parameter name."""

    path: tuple[str, ...]
    flag: str
    param: str
    field: dataclasses.Field
    hint: Any


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def fields_of(cls: type, prefix: tuple[str, ...] = ()) -> list[Option]:
    """The options of a config dataclass, nested dataclasses flattened (fields with cli=False left out)."""
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += fields_of(hint, prefix + (f.name,))
            continue
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        out.append(Option(prefix + (f.name,), flag, flag.lstrip("-").replace("-", "_"), f, hint))
    flags = [o.flag for o in out]
    dupes = {x for x in flags if flags.count(x) > 1}
    if dupes:
        raise RuntimeError(f"{cls.__name__}: generated flags collide: {sorted(dupes)}; set metadata flag=")
    return out


def _default_text(o: Option) -> str | None:
    f = o.field
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    if f.metadata.get("preset"):
        return "the --mode preset's"
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return None
    if isinstance(value, bool):
        return None  # click shows the on/off pair; the help says which is the default
    if isinstance(value, tuple):
        return (" " if _is_pair(o.hint) else ",").join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return None if value is None else str(value)


class PathOrURL(click.Path):
    """An existing local path, or a URL / pipe: spec passed through as is (read remotely: pipeline/core/remote.py)."""

    def convert(self, value, param, ctx):
        from pipeline.core.remote import is_url

        return value if is_url(value) else super().convert(value, param, ctx)


class LazyChoice(click.Choice):
    """A click.Choice whose values come from a registry when used, so a backend registered after the CLI was
    built is accepted too."""

    def __init__(self, values: Callable[[], Any]):
        self._values = values
        super().__init__(tuple(values()))

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._values())

    @choices.setter
    def choices(self, _: Any) -> None:  # click.Choice.__init__ assigns it; the registry stays the source
        pass


def _is_pair(hint: Any) -> bool:
    """tuple[float, float] or tuple[int, int]: an option that takes two numbers (LO HI, or height width)."""
    return typing.get_origin(hint) is tuple and typing.get_args(hint) in ((float, float), (int, int))


def _click_type(o: Option) -> tuple[Any, bool]:
    """(click type, is_flag_pair)."""
    hint, _ = _unwrap_optional(o.hint)
    meta = o.field.metadata
    if hint is bool:
        return None, True
    if _is_pair(hint):
        return click.Tuple(list(typing.get_args(hint))), False
    if meta.get("choices") is not None:
        return LazyChoice(meta["choices"]), False
    if typing.get_origin(hint) is Literal:
        return click.Choice([str(a) for a in typing.get_args(hint)]), False
    if hint is int:
        lo, hi = meta.get("min"), meta.get("max")
        return (click.IntRange(lo, hi) if lo is not None or hi is not None else int), False
    if hint is float:
        return float, False
    kind = meta.get("path")
    local = PathOrURL if meta.get("url") else click.Path  # url=True: a URL passes unchecked (read remotely)
    if kind == "dir":
        return local(exists=True, file_okay=False), False
    if kind == "file":
        return click.Path(exists=True, dir_okay=False), False
    if kind == "any":
        return local(exists=True), False
    if kind == "out":
        return click.Path(file_okay=False), False
    return str, False


def add_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable:
    """Decorator: one click option per field of `cls` (top-level names in `exclude` left out)."""
    opts = [o for o in fields_of(cls) if o.path[0] not in exclude]

    def decorate(fn: Callable) -> Callable:
        for o in reversed(opts):
            ctype, pair = _click_type(o)
            help_ = o.field.metadata.get("help", "")
            if o.field.metadata.get("required"):
                help_ += "  [required]"
            elif pair and isinstance(o.field.default, bool):
                help_ += f"  [default: {'on' if o.field.default else 'off'}]"
            elif _default_text(o):
                help_ += f"  [default: {_default_text(o)}]"
            if pair:
                name = o.flag.lstrip("-")
                fn = click.option(f"--{name}/--no-{name}", o.param, default=None, help=help_)(fn)
            else:
                metavar = o.field.metadata.get("metavar") or ("LO HI" if _is_pair(o.hint) else None)
                fn = click.option(o.flag, o.param, type=ctype, default=None, help=help_, metavar=metavar)(fn)
        return fn

    return decorate


def given(cls: type, params: dict[str, Any]) -> dict[str, Any]:
    """The flags actually given (not None), as a nested dict keyed like the config (paths as str, lists
    split at commas)."""
    out: dict[str, Any] = {}
    for o in fields_of(cls):
        value = params.get(o.param)
        if value is None:
            continue
        hint, _ = _unwrap_optional(o.hint)
        if _is_pair(hint):
            value = tuple(typing.get_args(hint)[0](x) for x in value)
        elif typing.get_origin(hint) is tuple:
            value = tuple(x.strip() for x in str(value).split(",") if x.strip())
        elif isinstance(value, Path):
            value = str(value)
        node = out
        for key in o.path[:-1]:
            node = node.setdefault(key, {})
        node[o.path[-1]] = value
    return out


def flag_of(cls: type, path: tuple[str, ...]) -> str:
    """The CLI flag of a config field (for messages that name what the user typed)."""
    for o in fields_of(cls):
        if o.path == path:
            return o.flag
    return ".".join(path)


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts layered left to right: a later layer's value wins, sub-dicts merge."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(d: dict[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def read_config_file(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """A config file: the JSON a run wrote (config.json) or a TOML file with the same keys (nested tables
    [loss], [optim]). The `runtime` section of a run's config.json (facts of that run) is dropped."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e})") from e
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise ConfigError(f"{what} {path}: TOML files need Python 3.11 or newer; use JSON") from None
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, RecursionError) as e:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ConfigError(f"{what} {path}: not valid {kind} ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected an object/table of config keys")
    data.pop("runtime", None)
    return data
