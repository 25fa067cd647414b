"""What every backend shares: the Backend protocol, the corrupt-sample error and its skip log, the
colour constants and saturation maths of the pixel definition (docs/loader.md), the decoded-size check.

Kept here so the torch and DALI backends cannot drift apart on what a bad sample looks like or on
the numbers of the colour definition.
"""
from __future__ import annotations

import pickle
import traceback
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import numpy as np

from pipeline.core.errors import CorruptSampleError, KdpipeError

if TYPE_CHECKING:
    import torch

    from pipeline.core.augment import AugSpec
    from pipeline.reader.index import ShardIndex

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


class WorkerTraceback(Exception):
    """Where a carried error was raised in its worker process (the cause `--debug` shows)."""


class CarryErrors:
    """A DataLoader worker's dataset whose user and data errors travel back as data.

    PyTorch re-raises a worker's exception as "Caught X in DataLoader worker process 0. Original Traceback
    ...": a many-line message, and an error class whose constructor takes more than one string (e.g.
    CacheMismatchError) comes back as a RuntimeError. Here a KdpipeError becomes the item
    {"error": (class, message, attributes, traceback)} and `raise_carried` in the main process raises the
    same class with the same one-line message. Anything else (a programming error) stays PyTorch's."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        try:
            return self.dataset[item]
        except KdpipeError as e:
            attrs = {k: v for k, v in vars(e).items() if _picklable(v)}
            return {"error": (type(e), str(e), attrs, traceback.format_exc())}


def raise_carried(item: Any) -> Any:
    """`item` as it came from a CarryErrors dataset; an error it carries is raised here, as it was raised there."""
    if not (isinstance(item, dict) and "error" in item):
        return item
    cls, message, attrs, where = item["error"]
    err = cls.__new__(cls, message)  # not cls(message): some classes' constructors take other arguments
    err.args = (message,)
    err.__dict__.update(attrs)
    raise err from WorkerTraceback(f"raised in a DataLoader worker process:\n{where}")


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # any failure to pickle: the attribute stays behind, the message still travels
        return False


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
