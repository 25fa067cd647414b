"""What every backend shares: the Backend protocol, the corrupt-sample error and its skip log, the
colour constants and saturation maths of the pixel definition (docs/loader.md), the decoded-size check.

Kept here so the torch and DALI backends cannot drift apart on what a bad sample looks like or on
the numbers of the colour definition.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np

from ..errors import CorruptSampleError

if TYPE_CHECKING:
    import torch

    from ..augment import AugSpec
    from ..index import ShardIndex

GREY = (0.299, 0.587, 0.114)  # luma weights of the colour definition (PIL's; torchvision's 0.2989 rounded)


class Backend(Protocol):
    """Turns sample ids into pixels; the loader owns order, ranks, resume, drop_last and teacher logits."""

    name: str
    skipped: list[tuple[int, str]]  # (sample id, reason) of every sample dropped with skip_corrupt

    def __init__(self, index: ShardIndex, *, spec: AugSpec, seed: int, train: bool, device: torch.device,
                 normalize: bool, dtype: torch.dtype, num_workers: int, skip_corrupt: bool) -> None: ...

    def iter_batches(self, ids: np.ndarray, aug_epoch: int, batch_size: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images NCHW channels_last, labels int64, ids int64) for `ids` in exactly this order,
        `batch_size` at a time, minus skipped corrupt samples."""
        ...


def sample_error(index: ShardIndex, sample_id: int, reason: object) -> CorruptSampleError:
    """The error for one bad sample, naming where it lives so the user can find and fix it."""
    try:
        where = str(index.shard_path(sample_id))
    except (IndexError, KeyError) as e:
        where = f"(no shard: {e})"
    text = " ".join(str(reason).split())[:300]
    return CorruptSampleError(f"{index.split} sample {int(sample_id)} in shard {where}: {text} "
                              f"(--skip-corrupt, or skip_corrupt=True, drops such samples and counts them)")


class SkipLog:
    """skip_corrupt in one place: raise the sample's error, or record (id, reason) and carry on."""

    def __init__(self, skip_corrupt: bool):
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped: list[tuple[int, str]] = []

    def bad(self, index: ShardIndex, sample_id: int, reason: object) -> None:
        self.record(sample_error(index, sample_id, reason), sample_id)

    def record(self, err: CorruptSampleError, sample_id: int) -> None:
        if not self.skip_corrupt:
            raise err
        self.skipped.append((int(sample_id), str(err)))


def size_mismatch(expected: tuple[int, int], got: tuple[int, int]) -> str | None:
    """Why an image of size `got` cannot be used where the index says `expected`, or None
    (crops are computed from the index's height and width, so the two must agree)."""
    if tuple(int(v) for v in got) == tuple(int(v) for v in expected):
        return None
    return f"decoded {int(got[0])}x{int(got[1])} but the index says {int(expected[0])}x{int(expected[1])}"


def saturation_matrices(saturation: np.ndarray) -> np.ndarray:
    """Per sample, the 3x3 map y3 = s*y2 + (1-s)*grey(y2) (column vectors: y3 = M @ y2): (n, 3, 3) float32."""
    s = np.asarray(saturation, dtype=np.float64).reshape(-1, 1, 1)
    w = np.asarray(GREY, dtype=np.float64).reshape(1, 1, 3)
    return (s * np.eye(3) + (1.0 - s) * np.ones((1, 3, 1)) * w).astype(np.float32)
