"""The teacher cache's identity: what its views and logits depend on, recorded in the store and compared on use.

A cache is valid only for the aug spec, seed, shards, class list, image size, normalisation and teacher it was
made with; the trainer refuses a mismatch naming each differing field (docs/cache.md "Refusals").
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

FORMAT = "kdpipe-teacher-cache"
LAYOUT_VERSION = 2  # 2: per-unit checksums. Version 1 stores (no checksums) are refused: they cannot be verified


def _jsonable(value: Any) -> Any:
    """Normalise to what a JSON round trip gives (tuples -> lists), so stored and fresh values compare equal."""
    return json.loads(json.dumps(value))


def normalization() -> dict[str, list[float]]:
    """The teacher's input normalisation (0..255 units): part of the fingerprint, since logits depend on it."""
    from pipeline.core.batch import IMAGENET_MEAN_255, IMAGENET_STD_255

    return {"mean": list(IMAGENET_MEAN_255), "std": list(IMAGENET_STD_255)}


def view_fingerprint(*, manifest_sha256: str, wnids: list[str], spec: Any, seed: int) -> dict[str, Any]:
    """The fields that decide which view (pixels) a sample gets: what a trainer must match to use a cache."""
    return _jsonable({
        "manifest_sha256": manifest_sha256,
        "wnids": list(wnids),
        "aug_spec": dataclasses.asdict(spec),
        "aug_fingerprint": spec.fingerprint(),
        "seed": int(seed),
        "image_size": int(spec.image_size),
        "normalization": normalization(),
        "layout_version": LAYOUT_VERSION,
    })


def cache_fingerprint(*, manifest_sha256: str, wnids: list[str], spec: Any, seed: int, teacher: str,
                      weights_sha256: str, precision: str, backend: str, topk: int = 0,
                      kdpipe_version: str | None = None, decode_device: str | None = None) -> dict[str, Any]:
    """Everything the cached views and logits depend on. `spec` is the AugSpec (a dataclass with .fingerprint()).
    decode_device (torch backend): where JPEGs were decoded; a training loader left at 'auto' decodes there too."""
    from pipeline.core.version import __version__

    extra = {} if decode_device is None else {"decode_device": decode_device}
    return _jsonable({
        **extra,
        **view_fingerprint(manifest_sha256=manifest_sha256, wnids=wnids, spec=spec, seed=seed),
        "teacher": teacher,
        "weights_sha256": weights_sha256,
        "precision": precision,
        "backend": backend,
        "topk": int(topk),
        "kdpipe_version": kdpipe_version or __version__,
    })


def fingerprint_diff(actual: dict[str, Any], expected: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Fields of `expected` whose value differs in `actual`, and one readable line per difference."""
    fields, lines = [], []
    for key, want in expected.items():
        have = actual.get(key, "<missing>")
        if _jsonable(have) != _jsonable(want):
            fields.append(key)
            if isinstance(have, dict) and isinstance(want, dict):  # name the sub-fields: aug_spec.image_size
                lines += [f"{key}.{line}" for line in fingerprint_diff(have, want)[1]]
                lines += [f"{key}.{k}: cache has {_short(v)}, expected nothing" for k, v in have.items()
                          if k not in want]
            else:
                lines.append(f"{key}: cache has {_short(have)}, expected {_short(want)}")
    return fields, lines


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
