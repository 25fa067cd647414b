"""Writing shards: the plan, the tar writer, image preparation and verification.

The public names load lazily, so `import pipeline.shards.options` (what `trainer.config` needs) stays free of
PIL and of the writer.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"build_shards": "writer", "verify_shards": "writer", "ShardReport": "writer", "OptionsMismatch": "writer",
            "ShardOptions": "options", "read_manifest": "writer", "manifest_sha256": "writer"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the module of a public name on first use (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline.shards' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.shards.{_EXPORTS[name]}"), name)
