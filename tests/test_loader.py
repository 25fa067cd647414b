"""ImageNet100Loader: determinism, exactly-once epochs over ranks, resume, teacher cache, bad input."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from pipeline.core.augment import AugSpec
from pipeline.core.batch import normalize_images
from pipeline.core.errors import CorruptSampleError
from pipeline.reader.loader import ImageNet100Loader

SPEC = AugSpec(image_size=32, val_resize=36)  # small views keep the tests fast


@pytest.fixture(scope="module")
def shards(shared_shards):
    return shared_shards(wnids=["n02869837", "n01749939", "n02488291", "n02107142"], train_per_class=6,
                         val_per_class=2, size=(40, 70, 40, 70), shard_size=7)


def make(shards, split="train", **kw):
    kw = {"spec": SPEC, "num_workers": 0, "normalize": False, "backend": "torch", "device": "cpu"} | kw
    return ImageNet100Loader(shards, split, **kw)


def views(loader, epoch=0, start_step=0) -> dict[int, np.ndarray]:
    """id -> image of one epoch (uint8 HWC)."""
    loader.set_epoch(epoch, start_step)
    out = {}
    for b in loader:
        assert b.images.is_contiguous(memory_format=torch.channels_last) and b.epoch == epoch
        assert b.labels.dtype == torch.int64 and b.ids.dtype == torch.int64
        for i, img in zip(b.ids.tolist(), b.images.permute(0, 2, 3, 1).numpy()):
            out.setdefault(i, img)
    return out


def test_same_pixels_across_batch_sizes_workers_and_ranks(shards):
    base = views(make(shards, batch_size=5, drop_last=False))
    assert len(base) == 24
    other = views(make(shards, batch_size=7, num_workers=2, drop_last=False))
    ranks = {}
    for r in range(3):
        ranks |= views(make(shards, batch_size=3, rank=r, world_size=3, drop_last=False))
    for i in range(24):
        np.testing.assert_array_equal(base[i], other[i])
        np.testing.assert_array_equal(base[i], ranks[i])


def test_same_pixels_whatever_the_order(shards):
    loader = make(shards, batch_size=4)
    ids = np.arange(24)
    rev = [(i, x) for x_b, _, i_b in loader.backend.iter_batches(ids[::-1].copy(), 0, 5)
           for i, x in zip(i_b.tolist(), x_b)]
    assert [i for i, _ in rev] == list(range(23, -1, -1))  # exactly the order asked for
    fwd = {i: x for x_b, _, i_b in loader.backend.iter_batches(ids, 0, 24) for i, x in zip(i_b.tolist(), x_b)}
    for i, x in rev:
        assert torch.equal(x, fwd[i])


def test_iter_views_gives_the_training_pixels_of_chosen_ids(shards):
    loader = make(shards, batch_size=5, drop_last=False)
    train = views(loader, epoch=3)
    chosen = [17, 2, 9, 2]
    got = [(i, x) for b in loader.iter_views(chosen, 3, batch_size=3) for i, x in
           zip(b.ids.tolist(), b.images.permute(0, 2, 3, 1).numpy())]
    assert [i for i, _ in got] == chosen
    for i, x in got:
        np.testing.assert_array_equal(x, train[i])
    with pytest.raises(IndexError):
        next(loader.iter_views([24], 0))


def test_epochs_differ_and_orders_are_seeded(shards):
    loader = make(shards, batch_size=4)
    e0, e1 = views(loader, 0), views(loader, 1)
    assert sum(not np.array_equal(e0[i], e1[i]) for i in e0) >= 20
    loader.set_epoch(0)
    o0 = [b.ids.tolist() for b in loader]
    loader.set_epoch(1)
    assert o0 != [b.ids.tolist() for b in loader]
    assert all(len(x) == 4 for x in o0) and len(o0) == len(loader) == 6


@pytest.mark.parametrize("world", [1, 3, 4, 5])
def test_every_sample_once_per_epoch_over_ranks(shards, world):
    val = [make(shards, "val", batch_size=2, rank=r, world_size=world) for r in range(world)]
    ids = [i for ld in val for b in ld for i in b.ids.tolist()]
    assert sorted(ids) == list(range(8)) and sum(len(ld) for ld in val) == sum(len(list(ld)) for ld in val)
    train = [make(shards, batch_size=1, rank=r, world_size=world) for r in range(world)]
    per_rank = [[i for b in ld for i in b.ids.tolist()] for ld in train]
    assert len({len(p) for p in per_rank}) == 1  # equal counts: padded by wrapping the permutation
    flat = sum(per_rank, [])
    assert set(flat) == set(range(24)) and len(flat) - 24 == (-24) % world
    if 24 % world == 0:
        assert sorted(flat) == list(range(24))  # no remainder: exactly once


def test_drop_last_and_len(shards):
    assert len(make(shards, batch_size=5)) == 4 and len(list(make(shards, batch_size=5))) == 4
    assert len(make(shards, batch_size=5, drop_last=False)) == 5
    assert [len(b) for b in make(shards, "val", batch_size=3)] == [3, 3, 2]


def test_resume_at_a_step(shards):
    loader = make(shards, batch_size=4)
    loader.set_epoch(2)
    full = [(b.ids.clone(), b.images.clone()) for b in loader]
    loader.set_epoch(2, start_step=4)
    tail = [(b.ids, b.images) for b in loader]
    assert len(tail) == 2
    for (i1, x1), (i2, x2) in zip(full[4:], tail):
        assert torch.equal(i1, i2) and torch.equal(x1, x2)
    assert len(list(loader)) == 6  # start_step applies to one iteration only
    with pytest.raises(ValueError, match="start_step"):
        loader.set_epoch(0, start_step=7)


def test_normalised_output_is_normalize_of_uint8(shards):
    u = next(iter(make(shards, batch_size=4)))
    f = next(iter(make(shards, batch_size=4, normalize=True, num_workers=1)))
    assert f.images.dtype == torch.float32 and f.images.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(f.images, normalize_images(u.images), atol=1e-5, rtol=0)
    h = next(iter(make(shards, batch_size=4, normalize=True, dtype=torch.bfloat16)))
    assert h.images.dtype == torch.bfloat16 and h.images.shape == (4, 3, 32, 32)


class FakeCache:
    """Two augmentation epochs; logits encode (epoch, id) so the test can check the gather."""

    epochs = 2
    num_samples = 24

    def lookup(self, epoch, ids):
        ids = np.asarray(ids)
        logits = np.stack([np.full(len(ids), epoch), ids], 1).astype(np.float16)
        return logits, (ids / 100).astype(np.float32)


def test_teacher_cache_epochs_wrap(shards):
    loader = make(shards, batch_size=4, teacher_cache=FakeCache())
    e0, e2 = views(loader, 0), views(loader, 2)  # epoch 2 reuses augmentation epoch 0
    assert all(np.array_equal(e0[i], e2[i]) for i in e0)
    loader.set_epoch(3)
    for b in loader:
        assert b.teacher_logits.dtype == torch.float32 and b.teacher_weight.dtype == torch.float32
        assert (b.teacher_logits[:, 0] == 1).all() and torch.equal(b.teacher_logits[:, 1].long(), b.ids)
        torch.testing.assert_close(b.teacher_weight, b.ids.float() / 100)


def test_invalid_arguments_fail_fast(shards):
    for kw, msg in [(dict(batch_size=0), "batch_size"), (dict(rank=2, world_size=2), "rank"),
                    (dict(backend="fast"), "backend"), (dict(dtype=torch.int32), "dtype"),
                    (dict(num_workers=-1), "num_workers")]:
        with pytest.raises(ValueError, match=msg):
            make(shards, **{"batch_size": 4} | kw)
    with pytest.raises(ValueError, match="teacher_cache"):
        make(shards, "val", batch_size=4, teacher_cache=FakeCache())
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        make(shards, "test", batch_size=4)
    with pytest.raises(FileNotFoundError, match="manifest"):
        make(shards.parent / "nothing", batch_size=4)


def _corrupt_copy(shards, tmp_path, how: str):
    """A copy of the shards with shard 1 truncated, removed, or one JPEG's bytes overwritten."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    rows = np.load(out / "train.index.npy")
    victim = int(np.flatnonzero(rows["shard"] == 1)[2])
    tar = out / "train-000001.tar"
    if how == "truncate":
        data = tar.read_bytes()
        tar.write_bytes(data[: int(rows["offset"][victim]) + 10])
    elif how == "remove":
        tar.unlink()
    else:
        with open(tar, "r+b") as f:
            f.seek(int(rows["offset"][victim]))
            f.write(b"\0" * int(rows["size"][victim]))
    return out, victim


@pytest.mark.parametrize("how", ["truncate", "remove", "garbage"])
def test_bad_input_names_shard_and_sample(shards, tmp_path, how):
    bad, victim = _corrupt_copy(shards, tmp_path, how)
    loader = make(bad, batch_size=4, num_workers=2, drop_last=False)
    in_shard1 = set(np.flatnonzero(np.load(bad / "train.index.npy")["shard"] == 1).tolist())
    with pytest.raises(CorruptSampleError, match=r"^train sample \d+ in shard .*train-000001\.tar") as err:
        list(loader)  # raised in a worker, re-raised here as itself: the same class, the one-line message
    assert int(str(err.value).split("train sample ")[1].split()[0]) in in_shard1
    loader = make(bad, batch_size=4, num_workers=1, drop_last=False, skip_corrupt=True)
    seen = [i for b in loader for i in b.ids.tolist()]
    dropped = {i for i, _ in loader.skipped}
    assert victim in dropped and dropped <= in_shard1
    assert set(seen) | dropped == set(range(24)) and not set(seen) & dropped
    assert len(seen) == 24 - len(dropped)


def _mean_abs_diff(a: ImageNet100Loader, b: ImageNet100Loader) -> float:
    diffs = []
    for x, y in zip(a, b):
        assert torch.equal(x.ids.cpu(), y.ids.cpu()) and torch.equal(x.labels.cpu(), y.labels.cpu())
        diffs.append((x.images.cpu().float() - y.images.cpu().float()).abs().mean().item())
    assert diffs
    return float(np.mean(diffs))


@pytest.mark.gpu
@pytest.mark.parametrize("decode", ["cuda", "cpu"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_cuda_output_close_to_cpu_workers(shards, split, decode):
    """On CUDA the torch backend decodes on the GPU (batched, in the prefetch thread) or in CPU workers with the
    crops copied over: same ids, close pixels, on the device in channels_last."""
    gpu = make(shards, split, batch_size=5, device="cuda", decode_device=decode, num_workers=1)
    assert gpu.prefetch == 2 and gpu.decode_device == decode
    cpu = make(shards, split, batch_size=5)
    assert _mean_abs_diff(gpu, cpu) < 2.0
    f = next(iter(make(shards, split, batch_size=5, device="cuda", normalize=True, dtype=torch.bfloat16,
                       decode_device=decode, num_workers=1)))
    assert f.images.is_cuda and f.images.dtype == torch.bfloat16 and f.labels.is_cuda
    assert f.images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_backend_through_the_loader(shards, split):
    """backend='dali' (CPU-only mode here) gives the same ids and labels in the same order, close pixels."""
    dali = make(shards, split, batch_size=5, backend="dali")
    assert dali.backend_name == "dali"
    assert _mean_abs_diff(dali, make(shards, split, batch_size=5)) < 2.5


@pytest.mark.parametrize("split", ["train", "val"])
def test_device_decode_path_on_the_cpu(shards, split):
    """The CUDA path's code (batched decode_jpeg on a list, torch-op augmentation) run with the CPU
    decoder: same ids in the same order, pixels close to the worker path, same output contract."""
    dev = make(shards, split, batch_size=5, drop_last=False)
    dev.backend.device_decode = True
    assert _mean_abs_diff(dev, make(shards, split, batch_size=5, drop_last=False)) < 1.0
    dev = make(shards, split, batch_size=5, normalize=True, dtype=torch.float16)
    dev.backend.device_decode = True
    b = next(iter(dev))
    assert b.images.dtype == torch.float16 and b.images.is_contiguous(memory_format=torch.channels_last)


def test_device_decode_path_bad_input(shards, tmp_path):
    bad, victim = _corrupt_copy(shards, tmp_path, "garbage")
    loader = make(bad, batch_size=4, drop_last=False)
    loader.backend.device_decode = True
    with pytest.raises(RuntimeError, match=rf"train sample {victim} in shard .*train-000001\.tar"):
        list(loader)
    loader = make(bad, batch_size=4, drop_last=False, skip_corrupt=True)
    loader.backend.device_decode = True
    assert len([i for b in loader for i in b.ids.tolist()]) == 23 and [i for i, _ in loader.skipped] == [victim]


def _hw_on_the_cpu(loader):
    """The cuda-hw path's code (gpu_jpeg.HardwareJpegDecoder, then the torch-op augmentation) on nvImageCodec's
    CPU backend."""
    from pipeline.reader.backends.gpu_jpeg import HardwareJpegDecoder

    loader.backend.device_decode = True
    loader.backend.hw_decoder = HardwareJpegDecoder(torch.device("cpu"), backends=("cpu",))
    return loader


@pytest.mark.parametrize("split", ["train", "val"])
def test_hardware_decode_path_on_the_cpu(shards, split):
    pytest.importorskip("nvidia.nvimgcodec")
    hw = _hw_on_the_cpu(make(shards, split, batch_size=5, drop_last=False))
    assert _mean_abs_diff(hw, make(shards, split, batch_size=5, drop_last=False)) < 1.0
    tv = make(shards, split, batch_size=5, drop_last=False)
    tv.backend.device_decode = True  # torchvision's decoder through the same augmentation: libjpeg-turbo both
    assert _mean_abs_diff(_hw_on_the_cpu(make(shards, split, batch_size=5, drop_last=False)), tv) == 0.0


def test_hardware_decode_path_bad_input(shards, tmp_path):
    pytest.importorskip("nvidia.nvimgcodec")
    bad, victim = _corrupt_copy(shards, tmp_path, "garbage")
    with pytest.raises(CorruptSampleError, match=rf"train sample {victim} in shard .*train-000001\.tar"):
        list(_hw_on_the_cpu(make(bad, batch_size=4, drop_last=False)))
    loader = _hw_on_the_cpu(make(bad, batch_size=4, drop_last=False, skip_corrupt=True))
    assert len([i for b in loader for i in b.ids.tolist()]) == 23 and [i for i, _ in loader.skipped] == [victim]


def test_hardware_decoder_falls_back_per_image_and_keeps_the_order(shards):
    """What the first backend refuses goes to the next; the result is in the order of the input."""
    pytest.importorskip("nvidia.nvimgcodec")
    from pipeline.reader.backends.gpu_jpeg import HardwareJpegDecoder
    from pipeline.reader.index import ShardIndex

    index = ShardIndex(shards, "train")
    datas = [index.read(i) for i in range(6)] + [b"not a jpeg"]
    dec = HardwareJpegDecoder(torch.device("cpu"), backends=("cpu", "cpu"))
    whole = dec(datas)
    first, calls = dec.decoders[0], []

    class Picky:  # refuses every other image, as the hardware engines refuse progressive JPEGs
        def decode(self, streams, **kw):
            calls.append(len(streams))
            return [img if k % 2 == 0 else None for k, img in enumerate(first.decode(streams, **kw))]

    dec.decoders[0] = Picky()
    mixed = dec(datas)
    assert calls == [7] and whole[6] is None and mixed[6] is None  # the non-JPEG: None from every backend
    for a, b in zip(whole[:6], mixed[:6]):
        assert torch.equal(a, b) and a.shape[0] == 3


@pytest.mark.gpu
def test_hardware_decode_on_the_gpu_is_close_and_independent_of_the_batch(shards):
    """decode_device='cuda-hw': close to the CPU workers' pixels, and a sample's pixels do not depend on the
    batch it came in (each image's decoder is chosen by its bytes, never by its position)."""
    pytest.importorskip("nvidia.nvimgcodec")
    hw = make(shards, batch_size=5, device="cuda", decode_device="cuda-hw", drop_last=False)
    assert hw.decode_device == "cuda-hw" and hw.backend.hw_decoder is not None
    assert _mean_abs_diff(hw, make(shards, batch_size=5, drop_last=False)) < 2.5
    a = {i: x for b in hw for i, x in zip(b.ids.tolist(), b.images.cpu())}
    other = make(shards, batch_size=3, device="cuda", decode_device="cuda-hw", drop_last=False)
    b = {i: x for batch in other for i, x in zip(batch.ids.tolist(), batch.images.cpu())}
    assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)


def test_import_pipeline_stays_light():
    import subprocess
    import sys

    code = "import sys, pipeline; assert 'torch' not in sys.modules and 'numpy' not in sys.modules; pipeline.AugSpec"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_teacher_cache_from_a_store_path(shards, tmp_path):
    """A real Zarr store given by path: each batch carries the rows of exactly its ids and aug epoch."""
    from pipeline.cache.store import CacheLayout, TeacherCacheWriter

    layout = CacheLayout(epochs=2, num_samples=24, num_classes=4, chunk_n=8)
    writer = TeacherCacheWriter.create(tmp_path / "cache", layout, {"test": 1})
    table = np.random.default_rng(0).normal(size=(2, 24, 4)).astype(np.float32)
    for e, c in layout.units():
        lo, hi = layout.id_range(c)
        writer.write_unit(e, c, table[e, lo:hi])
    loader = make(shards, batch_size=6, teacher_cache=str(tmp_path / "cache"))
    loader.set_epoch(3)  # augmentation epoch 1
    for b in loader:
        expect = torch.from_numpy(table[1, b.ids.numpy()]).half().float()  # stored as float16
        torch.testing.assert_close(b.teacher_logits, expect)
        assert b.teacher_weight.shape == (6,) and ((b.teacher_weight >= 0) & (b.teacher_weight <= 1)).all()
