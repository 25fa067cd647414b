"""The loader's backends by name: adding one is its module plus one `register(...)` line below.

Torch-free and DALI-free on import (each entry names its class as "module:Class", imported on first use), so
the CLI (trainer.config) takes its `--backend` choices from here without loading either. What the loader,
`auto` and the report need to know about a backend is a field of its entry, not an `if name == ...` elsewhere.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.core.errors import ConfigError

AUTO = "auto"  # not a backend: the loader's choice among the entries with `auto_rank`


def dali_available() -> bool:
    """True when nvidia.dali can be imported (checked without importing it)."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


@dataclass(frozen=True)
class BackendEntry:
    """One backend. `cls` is the class or "module:Class" (imported lazily: optional backends stay optional)."""

    name: str
    cls: Any
    available: Callable[[], bool] = lambda: True  # installed here (checked without importing it)
    auto_rank: int | None = None  # `auto` takes the lowest rank that is available and fits the device; None: never
    cuda_only: bool = False  # `auto` picks it only for a CUDA device
    decode_device: bool = False  # takes the loader's decode_device (cpu workers or nvJPEG) as a keyword
    stand_in: str | None = None  # what draws its views (report) where it is not installed
    stand_in_note: str = ""  # said in the report when the stand-in draws

    def load(self) -> type:
        """The backend class (imported now when given as "module:Class")."""
        if not isinstance(self.cls, str):
            return self.cls
        module, _, attr = self.cls.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> BackendEntry:
    """Add a backend (its name becomes a `--backend` choice); a taken name is a programming error."""
    if entry.name == AUTO or entry.name in _REGISTRY:
        raise ValueError(f"backend name {entry.name!r} is taken")
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove a backend added with `register` (tests add toy backends and take them away again)."""
    _REGISTRY.pop(name)


def backend_names() -> tuple[str, ...]:
    """The registered backends, in registration order."""
    return tuple(_REGISTRY)


def backend_choices() -> tuple[str, ...]:
    """What `--backend` accepts: "auto" and every registered backend."""
    return (AUTO, *_REGISTRY)


def backend_entry(name: str) -> BackendEntry:
    """The entry of a registered backend; a ConfigError naming the choices otherwise (the name is a user's)."""
    if name not in _REGISTRY:
        raise ConfigError(f"backend must be one of {', '.join(backend_choices())}, got {name!r}")
    return _REGISTRY[name]


def choose(name: str, cuda: bool) -> str:
    """A concrete backend for `name`: itself, or for "auto" the available entry of lowest auto_rank that fits
    the device (cuda: the output device is a CUDA GPU that is there)."""
    if name != AUTO:
        return backend_entry(name).name
    fits = [e for e in _REGISTRY.values() if e.auto_rank is not None and (cuda or not e.cuda_only) and e.available()]
    if not fits:
        raise ConfigError("no registered backend can be chosen by 'auto'")
    return min(fits, key=lambda e: e.auto_rank).name


# The built-in backends: a new one is its module plus one line here.
# DALI has no auto_rank: its GPU graph has never executed on a GPU (docs/dali.md "Speed"), while the torch backend
# ran and was measured on an H200; `auto` moves to DALI (auto_rank=0) only once a GPU run shows it correct and
# faster. `--backend dali` chooses it explicitly.
register(BackendEntry("dali", "pipeline.reader.backends.dali_backend:DaliBackend", available=dali_available,
                      auto_rank=None, cuda_only=True, stand_in="torch",
                      stand_in_note="The cache was made with DALI, which is not installed: drawn with the torch "
                                    "backend (same crops and flips, colours within a few grey levels)."))
register(BackendEntry("torch", "pipeline.reader.backends.torch_backend:TorchBackend", auto_rank=100,
                      decode_device=True))
