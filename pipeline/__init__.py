"""kdpipe's data library: ImageNet-100 shards, replayable augmentation, fast loaders, teacher cache.

Usable on its own; never imports `trainer`. The public names load lazily, so `import pipeline` stays
light (no torch, no DALI) until one is used:

    from pipeline import ImageNet100Loader, Batch, AugSpec, sample_params, epoch_order, build_shards

The packages (map and import rules: docs/CONTRACTS.md): `core` (errors, atomic writes, augmentation
parameters, batches, class lists, URLs), `sources` (ImageNet trees, image folders, synthetic and learnable
data), `shards` (the writer), `reader` (manifest, index, loader, backends), `cache` (the teacher cache).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline.core.version import __version__

_EXPORTS = {
    "ImageNet100Loader": "pipeline.reader.loader",
    "Batch": "pipeline.core.batch",
    "AugSpec": "pipeline.core.augment",
    "AugParams": "pipeline.core.augment",
    "sample_params": "pipeline.core.augment",
    "epoch_order": "pipeline.core.augment",
    "build_shards": "pipeline.shards.writer",
    "verify_shards": "pipeline.shards.writer",
    "ShardOptions": "pipeline.shards.options",
    "ShardIndex": "pipeline.reader.index",
    "read_manifest": "pipeline.reader.index",
    "manifest_sha256": "pipeline.reader.index",
    "TeacherCache": "pipeline.cache.store",
    "imagenet100_wnids": "pipeline.core.classes",
    "make_imagenet_tree": "pipeline.sources.synthetic",
    "make_learnable_tree": "pipeline.sources.learnable",
    "CorruptSampleError": "pipeline.core.errors",  # raised by every backend for a bad sample
    "KdpipeError": "pipeline.core.errors",  # base of every user or data error
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pipeline.core.errors import CorruptSampleError, KdpipeError
    from pipeline.core.augment import AugParams, AugSpec, epoch_order, sample_params
    from pipeline.core.batch import Batch
    from pipeline.reader.loader import ImageNet100Loader
    from pipeline.cache.store import TeacherCache
    from pipeline.core.classes import imagenet100_wnids
    from pipeline.reader.index import ShardIndex, manifest_sha256, read_manifest
    from pipeline.shards.options import ShardOptions
    from pipeline.shards.writer import build_shards, verify_shards
    from pipeline.sources.learnable import make_learnable_tree
    from pipeline.sources.synthetic import make_imagenet_tree


def __getattr__(name: str) -> Any:
    """Import the module of a public name on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
