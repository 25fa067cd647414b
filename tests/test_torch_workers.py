"""The torch backend's DataLoader workers exit with the main process, even after a kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.shards.writer import ShardOptions, build_shards
from pipeline.sources.synthetic import make_imagenet_tree

CHILD = textwrap.dedent("""
    import os, sys, threading, time
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    loader = ImageNet100Loader(sys.argv[1], "train", 2, backend="torch", device="cpu", num_workers=2,
                               spec=AugSpec(image_size=16), normalize=False)
    iterators = []

    def start():
        iterators.append(iter(loader))
        next(iterators[0])  # both workers are up

    if sys.argv[2] == "thread":  # forked by a thread that ends at once: the workers must outlive it
        t = threading.Thread(target=start)
        t.start()
        t.join()
    else:
        start()
    kids = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
            kids.update(f.read().split())
    print(" ".join(sorted(kids)), flush=True)
    time.sleep(600)  # the workers idle on their queues, the iterator alive: only the kill ends this
""")


def _two_class_shards(tmp_path: Path) -> dict:
    """16 small train images in two shards at tmp_path/shards; the environment a child Python needs."""
    wnids = ["n02869837", "n01749939"]
    make_imagenet_tree(tmp_path / "tree", wnids, train_per_class=8, val_per_class=0, val_layout=None,
                       size=(24, 32, 24, 32))
    build_shards(tmp_path / "tree", tmp_path / "shards", classes=wnids, options=ShardOptions(shard_size=8),
                 workers=1, progress=False)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path))


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow  # a fresh Python with torch, ~5-10 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("forked_by", ["main", "thread"])
def test_workers_exit_within_a_second_or_two_of_a_kill_9(tmp_path, forked_by):
    env = _two_class_shards(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "shards"), forked_by],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(w) for w in workers), workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 2.0  # torch's own watchdog would take up to 5 s
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_alive(w) for w in workers), [w for w in workers if _alive(w)]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("normalize", [False, True])
def test_batches_held_by_the_caller_are_never_overwritten(tmp_path, normalize):
    """Workers write into a ring of shared batches; every batch handed out is a copy, so holding more
    batches than the ring has slots keeps them all intact (and equal to the in-process path)."""
    import torch

    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    wnids = ["n02869837", "n01749939"]
    make_imagenet_tree(tmp_path / "tree", wnids, train_per_class=13, val_per_class=0, val_layout=None,
                       size=(24, 40, 24, 40))
    build_shards(tmp_path / "tree", tmp_path / "shards", classes=wnids, options=ShardOptions(shard_size=9),
                 workers=1, progress=False)

    def run(workers):
        loader = ImageNet100Loader(tmp_path / "shards", "train", 2, backend="torch", device="cpu",
                                   num_workers=workers, spec=AugSpec(image_size=16), normalize=normalize)
        return list(loader)  # 13 batches held at once: more than the 2 * 4 + 2 slots of the ring

    held, ref = run(2), run(0)
    assert len(held) == 13
    for a, b in zip(held, ref):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.images, b.images)
        assert a.images.is_contiguous(memory_format=torch.channels_last)


AFTER_ERROR = textwrap.dedent("""
    import sys
    from pipeline.core.augment import AugSpec
    from pipeline.core.errors import CorruptSampleError
    from pipeline.reader.loader import ImageNet100Loader

    def epoch(**kw):
        loader = ImageNet100Loader(sys.argv[1], "train", 4, backend="torch", device="cpu", num_workers=2,
                                   spec=AugSpec(image_size=16), **kw)
        return [len(b.ids) for b in loader]

    for _ in range(2):  # new workers are forked while failed loaders await the garbage collector
        try:
            epoch()
        except CorruptSampleError:
            print("named", flush=True)
        print(sum(epoch(skip_corrupt=True)), flush=True)
""")


@pytest.mark.slow  # a fresh Python with torch, ~5-10 s
def test_a_loader_that_failed_leaves_no_worker_behind_to_print_tracebacks(tmp_path):
    from conftest import flip_jpeg_byte

    env = _two_class_shards(tmp_path)
    flip_jpeg_byte(tmp_path / "shards", 5)
    res = subprocess.run([sys.executable, "-c", AFTER_ERROR, str(tmp_path / "shards")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.split() == ["named", "15"] * 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "can only test a child process" not in res.stderr, res.stderr


def test_a_loader_first_iterated_in_a_thread_that_ended_keeps_its_workers(tmp_path):
    import threading

    import numpy as np
    import torch

    from pipeline.core.augment import AugSpec
    from pipeline.core.errors import ConfigError
    from pipeline.reader.loader import ImageNet100Loader

    _two_class_shards(tmp_path)
    kw = dict(backend="torch", device="cpu", spec=AugSpec(image_size=16), normalize=False)
    loader = ImageNet100Loader(tmp_path / "shards", "train", 4, num_workers=2, **kw)
    first = []
    t = threading.Thread(target=lambda: first.extend(b.images for b in loader))
    t.start()
    t.join()
    again = [b.images for b in loader]  # the workers outlive the thread that forked them
    assert len(first) == len(again) == 4 and all(torch.equal(a, b) for a, b in zip(first, again))
    # numpy integers are the same seed and epoch as Python's
    plain = ImageNet100Loader(tmp_path / "shards", "train", 4, seed=3, num_workers=0, **kw)
    numpy = ImageNet100Loader(tmp_path / "shards", "train", 4, seed=np.int64(3), num_workers=0, **kw)
    plain.set_epoch(1)
    numpy.set_epoch(np.int64(1))
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, numpy))
    for call in (lambda: list(plain.iter_views([1, 2], 0, batch_size=-1)),
                 lambda: list(plain.iter_views([1.7, 2.2], 0)), lambda: plain.set_epoch(1.5)):
        with pytest.raises(ConfigError):
            call()
