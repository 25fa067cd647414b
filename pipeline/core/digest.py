"""The one sha256 (hex) of a file or of bytes in memory: manifests, indexes, teacher weights, cache fingerprints."""
from __future__ import annotations

import hashlib
from pathlib import Path

HASH_BLOCK = 1 << 20


def file_sha256(path: Path, block: int = HASH_BLOCK) -> str:
    """sha256 of a file in 1 MiB reads (big blocks: hashlib releases the GIL while it hashes them)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """sha256 (hex) of bytes already in memory (an index being written, a manifest read from a URL)."""
    return hashlib.sha256(data).hexdigest()
