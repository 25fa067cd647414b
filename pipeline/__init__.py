"""kdpipe's data library: ImageNet-100 shards, replayable augmentation, fast loaders, teacher cache.

Usable on its own; never imports `trainer`. The public names load lazily, so `import pipeline` stays
light (no torch, no DALI) until one is used:

    from pipeline import ImageNet100Loader, Batch, AugSpec, sample_params, epoch_order, build_shards
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "ImageNet100Loader": "pipeline.loader",
    "Batch": "pipeline.batch",
    "AugSpec": "pipeline.augment",
    "AugParams": "pipeline.augment",
    "sample_params": "pipeline.augment",
    "epoch_order": "pipeline.augment",
    "build_shards": "pipeline.shards",
    "CorruptSampleError": "pipeline.errors",  # raised by every backend for a bad sample
    "KdpipeError": "pipeline.errors",  # base of every user or data error
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .errors import CorruptSampleError, KdpipeError
    from .augment import AugParams, AugSpec, epoch_order, sample_params
    from .batch import Batch
    from .loader import ImageNet100Loader
    from .shards import build_shards


def __getattr__(name: str) -> Any:
    """Import the module of a public name on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
