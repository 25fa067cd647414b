"""The one home of device and precision choices, for the loader, its backends and every trainer job.

torch is imported inside the functions: `trainer.config` takes `Precision` from here and must load without torch.
A user's choice that cannot work is a ConfigError naming the flag or argument it came from (`--device` on the
command line, `device` for the loader's keyword argument).
"""
from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Literal

from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["Precision", "PRECISIONS", "resolve_device", "precision_dtype", "precision_name", "check_dtype"]

Precision = Literal["auto", "bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def _dtypes() -> dict[str, "torch.dtype"]:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _named(flag: str, value: object, quote: bool = False) -> str:
    """`--device cuda` (quote: `--device 'cuda'`) for a CLI flag, `device='cuda'` for a keyword argument."""
    if not flag.startswith("-"):
        return f"{flag}={str(value)!r}"
    return f"{flag} {str(value)!r}" if quote else f"{flag} {value}"


def resolve_device(name: "str | torch.device | None", flag: str = "--device") -> "torch.device":
    """auto (or None) -> the CUDA device when there is one, else the CPU; a CUDA device without CUDA, or a name
    that is no device, is a ConfigError naming `flag`."""
    import torch

    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{_named(flag, name, quote=True)} is not a device (auto, cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{_named(flag, name)} asked for, but CUDA is not available here; "
                          f"use {_named(flag, 'cpu')}")
    return device


def precision_dtype(name: str, device: "torch.device", flag: str = "precision") -> "torch.dtype":
    """The compute dtype of a precision name. auto: bf16 on CUDA (no GradScaler needed), fp32 on the CPU
    (CPU autocast is slower than fp32 there)."""
    import torch

    if name not in PRECISIONS:
        raise ConfigError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _dtypes()[name]


def precision_name(dtype: "torch.dtype") -> str:
    """bf16 | fp16 | fp32 (the name recorded in fingerprints and reports)."""
    return next(k for k, v in _dtypes().items() if v == dtype)


def check_dtype(dtype: "torch.dtype | None", flag: str = "dtype") -> "torch.dtype":
    """The loader's output dtype: float32 when None, else one of the precisions' dtypes (ConfigError otherwise)."""
    import torch

    if dtype is None:
        return torch.float32
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    if dtype not in allowed:
        raise ConfigError(f"{flag} must be one of {allowed}, got {dtype}")
    return dtype
