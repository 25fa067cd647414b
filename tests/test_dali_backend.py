"""DALI backend (CPU-only mode here): batch contract, determinism, closeness to the torch backend and
torchvision, normalisation, bad input. Pure helpers are tested without DALI."""
from __future__ import annotations

import io
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.augment import AugSpec, val_geometry
from pipeline.reader.backends.dali_backend import INSTALL_HINT, import_dali, saturation_matrices, val_rois
from pipeline.core.batch import normalize_images
from pipeline.core.errors import ConfigError
from pipeline.reader.index import ShardIndex
from pipeline.shards.writer import ShardOptions, build_shards
from pipeline.sources.synthetic import make_imagenet_tree

SPEC = AugSpec(image_size=32, val_resize=36)
NO_COLOUR = AugSpec(image_size=32, val_resize=36, flip_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0)


@pytest.fixture(scope="module")
def shards(shared_shards):
    """A small shard directory: 4 classes, 24 train + 8 val JPEGs of 40..72 px sides."""
    return shared_shards(wnids=["n02869837", "n01749939", "n02488291", "n02107142"], train_per_class=6,
                         val_per_class=2, size=(40, 72, 40, 72), seed=1, shard_size=10)


def dali(shards, split="train", spec=SPEC, normalize=False, dtype=torch.uint8, **kw):
    from pipeline.reader.backends.dali_backend import DaliBackend

    kw.setdefault("skip_corrupt", False)
    return DaliBackend(ShardIndex(shards, split), spec=spec, seed=7, train=split == "train",
                       device=torch.device("cpu"), normalize=normalize, dtype=dtype, num_workers=1, **kw)


def collect(backend, ids, epoch=0, batch_size=5):
    """All batches concatenated: (images, labels, ids) and the batch sizes seen."""
    batches = list(backend.iter_batches(np.asarray(ids, dtype=np.int64), epoch, batch_size))
    return tuple(torch.cat([b[k] for b in batches]) for k in range(3)), [len(b[2]) for b in batches]


def by_id(images, ids):
    return {int(i): images[j] for j, i in enumerate(ids.tolist())}


# ---- pure helpers


def test_import_error_names_the_install_command(monkeypatch):
    import importlib

    import pipeline.reader.backends.dali_backend as mod

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    importlib.reload(mod)  # importing the module still works without DALI
    with pytest.raises(ImportError, match=r"pip install -e '\.\[dali\]'"):
        import_dali()
    assert "pip install -e '.[dali]'" in INSTALL_HINT


def test_saturation_matrix_is_the_blend_with_grey():
    x = np.array([200.0, 50.0, 10.0])
    grey = 0.299 * 200 + 0.587 * 50 + 0.114 * 10
    for s in (0.0, 0.6, 1.0, 1.4):
        m = saturation_matrices(np.array([s]))[0]
        np.testing.assert_allclose(m @ x, s * x + (1 - s) * grey, rtol=1e-5)
    np.testing.assert_allclose(saturation_matrices(np.array([0.7]))[0] @ np.full(3, 90.0), 90.0, rtol=1e-6)


def test_val_roi_is_the_centre_crop_in_source_pixels():
    spec = AugSpec(image_size=224, val_resize=256)
    start, end = val_rois(spec, np.array([375, 500, 300]), np.array([500, 375, 300]))
    for i, (h, w) in enumerate([(375, 500), (500, 375), (300, 300)]):
        rh, rw, (top, left, ch, cw) = val_geometry(spec, h, w)
        np.testing.assert_allclose(start[i], [top * h / rh, left * w / rw], rtol=1e-6)
        np.testing.assert_allclose(end[i] - start[i], [ch * h / rh, cw * w / rw], rtol=1e-6)  # same scale


# ---- the backend (DALI CPU-only mode)


@pytest.mark.dali
def test_batches_follow_the_given_ids_and_the_contract(shards):
    backend = dali(shards)
    index = ShardIndex(shards, "train")
    ids = np.random.default_rng(0).permutation(len(index))[:17]
    (images, labels, got), sizes = collect(backend, ids, batch_size=5)
    assert sizes == [5, 5, 5, 2]  # the last partial batch is delivered, not padded
    assert got.tolist() == ids.tolist() and labels.tolist() == index.labels[ids].tolist()
    assert images.shape == (17, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and got.dtype == torch.int64
    first = next(iter(backend.iter_batches(ids, 0, 5)))[0]
    assert first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    assert list(backend.iter_batches(np.array([], np.int64), 0, 5)) == []


@pytest.mark.dali
def test_same_id_same_pixels_across_batch_sizes_orders_and_instances(shards):
    ids = np.arange(len(ShardIndex(shards, "train")))
    (a, _, ia), _ = collect(dali(shards), ids, epoch=3, batch_size=4)
    backend = dali(shards)
    (b, _, ib), _ = collect(backend, ids[::-1], epoch=3, batch_size=7)
    (c, _, ic), _ = collect(backend, np.random.default_rng(1).permutation(ids), epoch=3, batch_size=24)
    ra, rb, rc = by_id(a, ia), by_id(b, ib), by_id(c, ic)
    assert all(torch.equal(ra[i], rb[i]) and torch.equal(ra[i], rc[i]) for i in ids.tolist())
    (d, _, _), _ = collect(backend, ids, epoch=4, batch_size=4)
    assert (d != a).float().mean() > 0.5  # another epoch is another view


@pytest.mark.dali
def test_an_abandoned_iteration_does_not_disturb_the_next(shards):
    backend = dali(shards)
    ids = np.arange(20)
    (ref, _, _), _ = collect(backend, ids, batch_size=4)
    it = backend.iter_batches(ids, 0, 4)
    next(it)
    (again, _, got), _ = collect(backend, ids, batch_size=4)  # while `it` is still suspended
    assert torch.equal(again, ref) and got.tolist() == ids.tolist()
    assert torch.equal(torch.cat([b[0] for b in it]), ref[4:])  # and the first one finishes correctly


@pytest.mark.dali
def test_geometry_matches_the_torch_backend(shards):
    """Same crop boxes; only the decoders and resamplers differ (measured: about 0.2 grey levels)."""
    from pipeline.reader.backends.torch_backend import TorchBackend

    ids = np.arange(len(ShardIndex(shards, "train")))
    torch_backend = TorchBackend(ShardIndex(shards, "train"), spec=NO_COLOUR, seed=7, train=True, device=torch.device("cpu"),
                                 normalize=False, dtype=torch.uint8, num_workers=0, skip_corrupt=False)
    (t, _, _), _ = collect(torch_backend, ids, epoch=2, batch_size=8)
    (d, _, _), _ = collect(dali(shards, spec=NO_COLOUR), ids, epoch=2, batch_size=8)
    diff = (d.float() - t.float()).abs()
    assert diff.mean() < 0.5 and diff.max() <= 12, (diff.mean(), diff.max())


@pytest.mark.dali
def test_full_augmentation_close_to_the_torch_backend(shards):
    """Flip and the colour definition of docs/loader.md; DALI rounds y1 and y2 to uint8."""
    from pipeline.reader.backends.torch_backend import TorchBackend

    ids = np.arange(len(ShardIndex(shards, "train")))
    torch_backend = TorchBackend(ShardIndex(shards, "train"), spec=SPEC, seed=7, train=True, device=torch.device("cpu"),
                                 normalize=False, dtype=torch.uint8, num_workers=0, skip_corrupt=False)
    (t, _, _), _ = collect(torch_backend, ids, epoch=5, batch_size=8)
    (d, _, _), _ = collect(dali(shards), ids, epoch=5, batch_size=8)
    diff = (d.float() - t.float()).abs()
    assert diff.mean() < 0.8 and (diff > 4).float().mean() < 0.01, (diff.mean(), (diff > 4).float().mean())
    (mirrored, _, _), _ = collect(dali(shards, spec=AugSpec(image_size=32, val_resize=36, flip_p=1.0,
                                                            brightness=0, contrast=0, saturation=0)), ids[:4])
    (plain, _, _), _ = collect(dali(shards, spec=NO_COLOUR), ids[:4])
    assert torch.equal(mirrored, plain.flip(-1))


@pytest.mark.dali
def test_validation_matches_torchvision_resize_centre_crop(shards):
    from torchvision import transforms as T

    index = ShardIndex(shards, "val")
    ids = np.arange(len(index))
    (d, _, _), _ = collect(dali(shards, "val"), ids, batch_size=3)
    tv = T.Compose([T.Resize(SPEC.val_resize), T.CenterCrop(SPEC.image_size), T.PILToTensor()])
    ref = torch.stack([tv(Image.open(io.BytesIO(index.read(i))).convert("RGB")) for i in ids.tolist()])
    diff = (d.float() - ref.float()).abs()
    assert diff.mean() < 0.5 and diff.max() <= 2, (diff.mean(), diff.max())  # measured: 0.15 and 1


@pytest.mark.dali
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalised_output_is_the_normalised_uint8_output(shards, dtype):
    ids = np.arange(12)
    (u8, _, _), _ = collect(dali(shards), ids)
    backend = dali(shards, normalize=True, dtype=dtype)
    (x, _, _), _ = collect(backend, ids)
    first = next(iter(backend.iter_batches(ids, 0, 5)))[0]
    assert x.dtype == dtype and first.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(x.float(), normalize_images(u8, dtype).float(), atol=tol, rtol=tol)


def corrupt_copy(shards, tmp_path, sample_id, how):
    """A copy of the shard directory with one train sample's JPEG bytes broken in place."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    index = ShardIndex(out, "train")
    row = index.rows[sample_id]
    with open(index.shard_path(sample_id), "r+b") as f:
        if how == "garbage":  # same length, so the tar and the index stay valid
            f.seek(int(row["offset"]))
            f.write(b"\x00not a jpeg" + b"\x55" * (int(row["size"]) - 11))
        else:  # the shard ends inside this sample
            f.truncate(int(row["offset"]) + 10)
    return out


@pytest.mark.dali
@pytest.mark.parametrize("how", ["garbage", "truncated_shard"])
def test_a_bad_sample_is_named_or_skipped(shards, tmp_path, how):
    from pipeline.reader.backends.torch_backend import CorruptSampleError

    bad = 13
    broken = corrupt_copy(shards, tmp_path, bad, how)
    shard = ShardIndex(broken, "train").shard_path(bad)
    ids = np.arange(20)
    with pytest.raises(CorruptSampleError, match=re.escape(f"sample {bad} in shard {shard}")):
        collect(dali(broken), ids, batch_size=4)
    skipping = dali(broken, skip_corrupt=True)
    (images, _, got), _ = collect(skipping, ids, batch_size=4)
    keep = ids != bad
    if how == "truncated_shard":  # the rest of that shard is gone as well
        keep &= (ids < bad) | (ShardIndex(broken, "train").rows["shard"][ids] != ShardIndex(broken, "train").rows["shard"][bad])
    assert got.tolist() == ids[keep].tolist()
    assert [i for i, _ in skipping.skipped] == ids[~keep].tolist()
    assert str(shard) in skipping.skipped[0][1]
    (ref, _, ref_ids), _ = collect(dali(shards), ids, batch_size=4)
    assert torch.equal(images, ref[torch.from_numpy(keep)])  # the good samples are untouched


@pytest.mark.dali
def test_gpu_form_of_the_contrast_step_agrees_on_the_cpu(shards):
    """The GPU graph blends contrast arithmetically; run that form here against brightness_contrast."""
    ids = np.arange(16)
    (ref, _, _), _ = collect(dali(shards), ids)
    blended = dali(shards)
    blended.blend_contrast = True
    assert b"Cast" in blended._build(4, lambda: None).serialize()  # the arithmetic form is in the graph
    (got, _, _), _ = collect(blended, ids)
    diff = (got.int() - ref.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())  # measured: equal


@pytest.mark.dali
def test_batches_handed_out_stay_intact(shards):
    """Output memory is shared with DALI (no copy): later batches and a dead pipeline must not touch it."""
    import gc

    backend = dali(shards, normalize=True, dtype=torch.float32)
    held = [(b[0], b[0].clone()) for b in backend.iter_batches(np.arange(24), 0, 4)]
    list(backend.iter_batches(np.arange(24), 1, 4))
    del backend
    gc.collect()
    list(dali(shards, normalize=True, dtype=torch.float32).iter_batches(np.arange(24), 2, 4))
    assert all(torch.equal(a, b) for a, b in held)


@pytest.mark.dali
def test_the_copying_path_of_the_static_executor_gives_the_same_batches(shards):
    ids = np.arange(13)
    (ref, _, _), _ = collect(dali(shards), ids)
    static = dali(shards)
    static.exec_dynamic = False  # DALI reuses output buffers: the backend must copy
    batches = list(static.iter_batches(ids, 0, 5))
    assert torch.equal(torch.cat([b[0] for b in batches]), ref)


@pytest.mark.dali
@pytest.mark.gpu
def test_gpu_mixed_decode_is_deterministic_and_close_to_the_cpu_graph(shards):
    """The "mixed" (nvJPEG) graph: on the GPU, channels_last, same pixels across batch sizes, close to CPU."""
    from pipeline.reader.backends.dali_backend import DaliBackend

    ids = np.arange(len(ShardIndex(shards, "train")))

    def gpu(**kw):
        return DaliBackend(ShardIndex(shards, "train"), spec=SPEC, seed=7, train=True, device=torch.device("cuda"),
                           num_workers=2, skip_corrupt=False, **kw)

    (a, labels, got), _ = collect(gpu(normalize=False, dtype=torch.uint8), ids, batch_size=4)
    (b, _, _), _ = collect(gpu(normalize=False, dtype=torch.uint8), ids[::-1], batch_size=7)
    assert a.is_cuda and labels.is_cuda and got.tolist() == ids.tolist()
    assert torch.equal(a, b.flip(0))
    (cpu, _, _), _ = collect(dali(shards), ids, batch_size=4)
    assert (a.cpu().float() - cpu.float()).abs().mean() < 1.5
    x = next(iter(gpu(normalize=True, dtype=torch.bfloat16).iter_batches(ids, 0, 8)))[0]
    assert x.is_cuda and x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.dali
def test_greyscale_and_reencoded_oddities_decode_like_the_torch_backend(tmp_path, small_wnids):
    """Greyscale JPEGs come out as 3 equal channels; CMYK and PNG-as-JPEG arrive re-encoded by the writer."""
    from pipeline.reader.backends.torch_backend import TorchBackend

    tree = make_imagenet_tree(tmp_path / "tree", small_wnids, train_per_class=2, val_per_class=0, val_layout=None,
                              size=(48, 64), oddities=True)
    build_shards(tree.root, tmp_path / "shards", classes=small_wnids, options=ShardOptions(shard_size=16),
                 workers=1, progress=False)
    index = ShardIndex(tmp_path / "shards", "train")
    ids = np.arange(len(index))
    (d, _, _), _ = collect(dali(tmp_path / "shards", spec=NO_COLOUR), ids, batch_size=4)
    torch_backend = TorchBackend(index, spec=NO_COLOUR, seed=7, train=True, device=torch.device("cpu"),
                                 normalize=False, dtype=torch.uint8, num_workers=0, skip_corrupt=False)
    (t, _, _), _ = collect(torch_backend, ids, batch_size=4)
    assert d.shape == t.shape == (len(ids), 3, 32, 32)
    assert (d.float() - t.float()).abs().mean() < 0.5
    grey = [j for j, i in enumerate(ids.tolist()) if Image.open(io.BytesIO(index.read(i))).mode == "L"]
    assert grey and all(torch.equal(d[j][0], d[j][1]) and torch.equal(d[j][1], d[j][2]) for j in grey)


@pytest.mark.dali
def test_invalid_arguments_fail_fast(shards):
    with pytest.raises(ValueError, match="batch_size"):
        next(dali(shards).iter_batches(np.arange(4), 0, 0))
    with pytest.raises(ConfigError, match=r"dtype must be one of .*got torch.uint8"):  # the loader's own check
        dali(shards, normalize=True, dtype=torch.uint8)
    if not torch.cuda.is_available():
        from pipeline.reader.backends.dali_backend import DaliBackend

        with pytest.raises(ConfigError, match="CUDA is not available"):
            DaliBackend(ShardIndex(shards, "train"), spec=SPEC, seed=0, train=True, device=torch.device("cuda"))


@pytest.mark.dali
def test_a_batch_whose_every_sample_is_skipped_comes_out_empty_like_the_torch_backends(shards, tmp_path):
    """len(loader) batches on every backend: training counts its steps (and resumes) by them."""
    broken = corrupt_copy(shards, tmp_path, 13, "garbage")
    ids = np.arange(20)
    for last in (13, 19):  # the empty batch last, then inside the epoch
        batches = list(dali(broken, skip_corrupt=True).iter_batches(ids[:last + 1], 0, 1))
        assert len(batches) == last + 1 and [len(b[2]) for b in batches].count(0) == 1
        images, labels, got = batches[13]
        assert images.shape == (0, 3, SPEC.image_size, SPEC.image_size) and images.dtype == torch.uint8
        assert len(labels) == len(got) == 0 and batches[12][2].tolist() == [12]
