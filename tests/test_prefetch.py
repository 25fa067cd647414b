"""Batches made ahead in a thread (pipeline/reader/prefetch.py) and where the torch backend decodes (loader)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipeline.core.batch import Batch
from pipeline.core.errors import ConfigError, CorruptSampleError
from pipeline.reader.loader import CPU_DECODE_MIN_CORES, ImageNet100Loader, choose_decode_device
from pipeline.reader.prefetch import prefetch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "kdpipe-prefetch"]


def test_yields_the_same_items_in_order_and_depth_zero_is_the_iterator_itself():
    items = [Batch(torch.full((2, 3, 4, 4), k), torch.tensor([k, k]), torch.tensor([2 * k, 2 * k + 1]), 0)
             for k in range(7)]
    got = list(prefetch(iter(items), CPU, depth=2))
    assert [int(b.labels[0]) for b in got] == list(range(7)) and all(a is b for a, b in zip(got, items))
    it = iter(items)
    assert prefetch(it, CPU, depth=0) is it
    assert not _threads()


def test_an_error_reaches_the_consumer_after_the_items_before_it():
    def source():
        yield 1
        yield 2
        raise CorruptSampleError("train sample 7 in shard s.tar: bad")

    seen = []
    with pytest.raises(CorruptSampleError, match="train sample 7 in shard s.tar: bad"):
        for x in prefetch(source(), CPU, depth=3):
            seen.append(x)
    assert seen == [1, 2]
    assert not _threads()  # the generator joins its thread before the error leaves it


def test_closing_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def endless():
        try:
            k = 0
            while True:
                yield k
                k += 1
        finally:
            closed.set()

    gen = prefetch(endless(), CPU, depth=2)
    assert [next(gen) for _ in range(3)] == [0, 1, 2]
    gen.close()
    assert closed.wait(2.0) and not _threads()


def test_decode_device_choice():
    assert choose_decode_device("auto", CPU, 64) == "cpu"
    assert choose_decode_device("cpu", CPU, 2) == "cpu"
    with pytest.raises(ConfigError, match="decode_device 'cuda' needs a CUDA output device"):
        choose_decode_device("cuda", CPU, 2)
    with pytest.raises(ConfigError, match="decode_device must be one of auto, cpu, cuda"):
        choose_decode_device("gpu", CUDA, 2)
    assert choose_decode_device("auto", CUDA, CPU_DECODE_MIN_CORES) == "cpu"
    assert choose_decode_device("auto", CUDA, CPU_DECODE_MIN_CORES - 1) == "cuda"
    assert choose_decode_device("cuda", CUDA, 64) == "cuda"
    # the hardware JPEG engines only when asked (not yet measured on a GPU), and only for a CUDA output
    assert choose_decode_device("cuda-hw", CUDA, 2) == "cuda-hw"
    assert {choose_decode_device("auto", CUDA, n) for n in (1, 64)} == {"cpu", "cuda"}
    with pytest.raises(ConfigError, match="decode_device 'cuda-hw' needs a CUDA output device"):
        choose_decode_device("cuda-hw", CPU, 2)


@pytest.fixture(scope="module")
def shards(shared_shards):
    return shared_shards(wnids=["n02869837", "n01749939", "n02488291"], train_per_class=5, val_per_class=1,
                         size=(40, 56), shard_size=6)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_with_prefetch_on_the_cpu_gives_exactly_the_batches_without(shards, workers):
    """The overlapped iterator degenerates to the plain one on the CPU: same ids, labels, pixels, resume."""
    def epoch(prefetch_depth, epoch=1, start=1):
        lo = ImageNet100Loader(shards, "train", 4, seed=3, backend="torch", device="cpu", num_workers=workers,
                               prefetch=prefetch_depth)
        lo.set_epoch(epoch, start_step=start)
        it = iter(lo)
        lo.set_epoch(0)  # state is read when iteration starts, not later in the thread
        return [(b.ids.tolist(), b.labels.tolist(), b.images.clone(), b.epoch) for b in it]

    plain, ahead = epoch(0), epoch(2)
    assert len(plain) == len(ahead) == 2
    for (i0, l0, x0, e0), (i1, l1, x1, e1) in zip(plain, ahead):
        assert i0 == i1 and l0 == l1 and e0 == e1 == 1 and torch.equal(x0, x1)
    assert ImageNet100Loader(shards, "train", 4, backend="torch", device="cpu", num_workers=0).prefetch == 0
    with pytest.raises(ConfigError, match="prefetch must be >= 0"):
        ImageNet100Loader(shards, "train", 4, backend="torch", device="cpu", num_workers=0, prefetch=-1)


def test_iter_views_with_prefetch_matches(shards):
    lo = ImageNet100Loader(shards, "train", 4, seed=3, backend="torch", device="cpu", num_workers=0, prefetch=2)
    ids = np.array([5, 0, 9, 3, 11], dtype=np.int64)
    got = [b for b in lo.iter_views(ids, 2)]
    lo.prefetch = 0
    ref = [b for b in lo.iter_views(ids, 2)]
    assert [b.ids.tolist() for b in got] == [[5, 0, 9, 3], [11]] == [b.ids.tolist() for b in ref]
    assert all(torch.equal(a.images, b.images) for a, b in zip(got, ref))


def test_a_second_pass_ends_the_first_one_loudly(shards):
    """The kept worker pool serves one pass at a time: reading on from an abandoned pass is an error, never
    batches of the newer pass."""
    lo = ImageNet100Loader(shards, "train", 4, seed=3, backend="torch", device="cpu", num_workers=1)
    lo.set_epoch(0)
    first = iter(lo)
    next(first)
    lo.set_epoch(1)
    second = [b.ids.tolist() for b in lo]
    assert len(second) == len(lo)
    with pytest.raises(RuntimeError, match="one pass at a time"):
        next(first)
