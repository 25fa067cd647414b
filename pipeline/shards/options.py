"""The options of `kdpipe shard` that change the bytes of its output. Apart from the writer so that
`trainer.config` (torch-free, PIL-free) can build the CLI from them without importing the writer."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShardOptions:
    """Every option that changes the bytes of the output (recorded in the manifest)."""

    shard_size: int = field(default=1000, metadata={"help": "samples per shard (~110 MB of ImageNet JPEGs)", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the train shuffle"})
    quality: int = field(default=95, metadata={"help": "JPEG quality of re-encoded images (CMYK, PNG, --max-side)",
                                               "min": 1, "max": 100})
    max_side: int | None = field(default=None, metadata={
        "help": "re-encode images whose longer side exceeds this many pixels (default: off, bytes pass through)",
        "min": 1})
