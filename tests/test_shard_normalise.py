"""Issue 18, invariant 3: every image as verify sees it. `kdpipe shard` applies the acceptance rule of `verify` and
of every backend (`pipeline.shards.image.jpeg_problem`), so no backend reads a stored file differently; a resumed
`shard` notices sources that changed; every file it writes stays parseable whatever the file names hold."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps

from pipeline.core.augment import AugSpec
from pipeline.reader.index import ShardIndex, read_manifest
from pipeline.core.names import read_tsv
from pipeline.sources.synthetic import synth_image
from trainer.cli import main

from clitools import cli

CLASSES = ["cat", "dog"]
SPEC = AugSpec(image_size=24, val_resize=28, flip_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
ROTATED = {"train": "train/cat/r.jpg", "val": "val/dog/r.jpg"}


def save(path: Path, img: Image.Image, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def rotated_jpeg(seed: int) -> tuple[bytes, Image.Image]:
    """A 40x48 (h x w) JPEG whose EXIF says Orientation=6: viewers (and DALI) show it 48x40."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(synth_image(np.random.default_rng(seed), 40, 48)).save(buf, "JPEG", quality=90,
                                                                           exif=exif.tobytes())
    return buf.getvalue(), ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue())))


def tree_with_rotated(root: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for k, c in enumerate(CLASSES):
            for i in range(n):
                img = Image.fromarray(synth_image(np.random.default_rng(100 * k + i + 7 * n), 40, 48))
                save(root / split / c / f"{i}.jpg", img, format="JPEG", quality=90)
    for split, rel in ROTATED.items():
        (root / rel).write_bytes(rotated_jpeg(5)[0])
    return root


@pytest.fixture(scope="module")
def rotated(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("orient")
    tree_with_rotated(root / "tree")
    cli("shard", "--imagefolder", root / "tree", "--out", root / "shards", "--shard-size", "4", "--workers", "1")
    return root / "shards"


def sample_of(shards: Path, split: str, rel: str) -> int:
    """The sample id that holds source `rel` (from its .json)."""
    idx = ShardIndex(shards, split)
    for path in sorted({idx.shard_path(i) for i in range(len(idx))}):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json") and json.loads(tar.extractfile(m).read())["source"] == rel:
                    return int(m.name[:8])
    raise AssertionError(rel)


def views(backend_name: str, shards: Path, split: str) -> torch.Tensor:
    from pipeline.reader.backends.dali_backend import DaliBackend
    from pipeline.reader.backends.torch_backend import TorchBackend

    cls = DaliBackend if backend_name == "dali" else TorchBackend
    idx = ShardIndex(shards, split)
    backend = cls(idx, spec=SPEC, seed=7, train=split == "train", device=torch.device("cpu"), normalize=False,
                  dtype=torch.uint8, num_workers=1 if backend_name == "dali" else 0, skip_corrupt=False)
    return torch.cat([b[0] for b in backend.iter_batches(np.arange(len(idx)), 2, 4)])


def test_an_exif_rotated_jpeg_is_stored_upright_and_verify_accepts_it(rotated):
    for split, rel in ROTATED.items():
        idx = ShardIndex(rotated, split)
        i = sample_of(rotated, split, rel)
        stored = Image.open(io.BytesIO(idx.read(i)))
        assert stored.size == (40, 48) and (idx.heights[i], idx.widths[i]) == (48, 40)  # upright: 48 high
        assert 0x0112 not in stored.getexif() and not stored.info.get("progressive")
        others = [j for j in range(len(idx)) if j != i]
        assert all((idx.heights[j], idx.widths[j]) == (40, 48) for j in others)  # normal files pass through
    # the pixels are the upright picture (re-encoded at quality 95: a few grey levels of loss on this noisy image)
    pixels = np.asarray(stored.convert("RGB"), dtype=np.float64)
    upright = rotated_jpeg(5)[1].convert("RGB")
    assert np.abs(pixels - np.asarray(upright, dtype=np.float64)).mean() < 3.0
    assert np.abs(pixels - np.asarray(upright.transpose(Image.ROTATE_180), dtype=np.float64)).mean() > 20.0
    assert f"{rotated}: 4 shards, 12 samples OK" in cli("verify", "--shards", rotated, "--workers", "1")


@pytest.mark.dali
@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_and_torch_read_a_rotated_jpeg_alike(rotated, split):
    """Issue 18: DALI applied the EXIF rotation, torch did not: 'The cropping window ... is not valid for image
    dimensions [48 x 40]' (train) and 39 grey levels apart (val). Now the same crop windows, and the same small
    difference as on normal files."""
    t, d = views("torch", rotated, split), views("dali", rotated, split)
    assert t.shape == d.shape
    diff = (d.float() - t.float()).abs().mean(dim=(1, 2, 3))
    i = sample_of(rotated, split, ROTATED[split])
    normal = torch.cat([diff[:i], diff[i + 1:]])
    assert diff[i] < 1.0 and diff[i] < 3 * normal.max() + 0.2, (diff[i], normal)


@pytest.mark.dali
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_training_through_the_cli_reads_the_rotated_shards_with_either_backend(rotated, tmp_path, backend):
    out = cli("train", "--shards", rotated, "--out", tmp_path / "run", "--mode", "hard", "--students", "tiny_cnn",
              "--epochs", "1", "--image-size", "24", "--batch-size", "4", "--backend", backend, "--device", "cpu",
              "--num-workers", "1")
    assert "(5 validation images)" in out


def test_verify_names_a_stored_jpeg_that_backends_would_read_differently(tmp_path, monkeypatch):
    """Shards written before the rule (simulated: the rule switched off while writing) are flagged by verify."""
    import pipeline.shards.image as si
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.imagefolder import discover_imagefolder

    tree = tree_with_rotated(tmp_path / "tree")
    monkeypatch.setattr(si, "jpeg_problem", lambda frame: "")
    build_shards(discover_imagefolder(tree), tmp_path / "old", options=ShardOptions(shard_size=4), workers=1,
                 progress=False)
    monkeypatch.undo()
    out = cli("verify", "--shards", tmp_path / "old", "--workers", "1", code=1)
    flagged = [ln for ln in out.splitlines() if "EXIF orientation 6" in ln]
    assert len(flagged) == 2 and "rewrite the shards with `kdpipe shard --overwrite`" in flagged[0]
    assert "Error: 2 problems in" in out


def test_sixteen_bit_png_and_the_pixel_limit(tmp_path, monkeypatch):
    import pipeline.shards.image as si

    ramp = (np.arange(32 * 40, dtype=np.uint32).reshape(32, 40) * 50).astype(np.uint16)  # 0 .. 63950
    save(tmp_path / "deep.png", Image.fromarray(ramp))
    p = si.prepare_image(tmp_path / "deep.png")
    assert p.reencoded and p.reason == ""
    grey = np.asarray(Image.open(io.BytesIO(p.data)).convert("L"), dtype=np.float64)
    assert abs(grey.mean() - ramp.mean() / 257) < 2.0  # scaled to 8 bits, not clipped to white

    save(tmp_path / "a.jpg", Image.fromarray(synth_image(np.random.default_rng(0), 40, 48)), format="JPEG")
    monkeypatch.setattr(si, "MAX_PIXELS", 1000)
    p = si.prepare_image(tmp_path / "a.jpg")
    assert p.reason.startswith("40x48 pixels, over the limit of 1000") and "--max-side" in p.reason
    p = si.prepare_image(tmp_path / "a.jpg", max_side=24)
    assert p.reason == "" and (p.height, p.width) == (20, 24)


def test_an_image_over_twice_pils_bound_is_named_by_its_size_and_max_side_downscales_it(tmp_path, monkeypatch):
    """PIL refuses images over twice its bound at open ("not an image") and warns above it; kdpipe names the size,
    and --max-side decodes such a JPEG at a reduced scale instead."""
    import warnings

    import pipeline.shards.image as si

    save(tmp_path / "a.jpg", Image.fromarray(synth_image(np.random.default_rng(0), 96, 128)), format="JPEG")
    save(tmp_path / "a.png", Image.fromarray(synth_image(np.random.default_rng(0), 96, 128)))
    monkeypatch.setattr(si, "MAX_PIXELS", 1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 96 x 128 is over twice PIL's bound too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning reaches the user
        p = si.prepare_image(tmp_path / "a.jpg")
        assert p.reason.startswith("96x128 pixels, over the limit of 1000") and "--max-side" in p.reason
        p = si.prepare_image(tmp_path / "a.jpg", max_side=24)
        assert p.reason == "" and (p.height, p.width) == (18, 24) and p.reencoded == "downscaled"
        assert si.prepare_image(tmp_path / "a.png", max_side=24).reason.endswith("--max-side downscales only "
                                                                                 "JPEGs over 2000 pixels (decoded "
                                                                                 "at a reduced scale)")
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's own bound is back for everyone else


# ---------------------------------------------------------------- resume after a source changed


def killed_after(shards: Path, keep: int) -> None:
    """What a `shard` killed after writing `keep` train shards leaves (like tests/test_faults.py `_killed`)."""
    state = shards / ".kdpipe-shard"
    for p in [shards / "manifest.json", *shards.glob("*.index.npy"), shards / "rejected.tsv",
              *shards.glob("val-*"), *state.glob("val-*")]:
        p.unlink()
    for k in range(keep, 10):
        for p in [*shards.glob(f"train-{k:06d}.*"), *state.glob(f"train-{k:06d}.tar.json")]:
            p.unlink()


def rewrite(path: Path, seed: int, hw=(40, 48)) -> None:
    st = path.stat()
    save(path, Image.fromarray(synth_image(np.random.default_rng(seed), *hw)), format="JPEG", quality=80)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def source_in_shard(shards: Path, k: int) -> str:
    with tarfile.open(shards / f"train-{k:06d}.tar") as tar:
        return next(json.loads(tar.extractfile(m).read())["source"] for m in tar if m.name.endswith(".json"))


def test_a_resumed_shard_run_writes_again_a_finished_shard_whose_source_changed(tmp_path):
    tree = tree_with_rotated(tmp_path / "tree")
    args = ["--imagefolder", tree, "--shard-size", "2", "--workers", "1"]
    cli("shard", *args, "--out", tmp_path / "a")
    killed_after(tmp_path / "a", keep=2)
    rel = source_in_shard(tmp_path / "a", 0)
    rewrite(tree / rel, seed=99)
    kept = (tmp_path / "a" / "train-000001.tar").stat().st_ino
    res = CliRunner().invoke(main, ["shard", *map(str, args), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert f"train-000000.tar: written again: its source {rel} changed since the earlier run" in res.stderr
    assert (tmp_path / "a" / "train-000001.tar").stat().st_ino == kept  # an unchanged finished shard is kept
    cli("shard", *args, "--out", tmp_path / "b")  # a clean run over today's files: the same bytes
    for name in ["manifest.json", "train.index.npy", "val.index.npy", "train-000000.tar"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "samples OK" in cli("verify", "--shards", tmp_path / "a", "--workers", "1")


def test_a_change_that_shifts_later_finished_shards_writes_them_again(tmp_path):
    tree = tree_with_rotated(tmp_path / "tree")
    args = ["--imagefolder", tree, "--shard-size", "2", "--workers", "1"]
    cli("shard", *args, "--out", tmp_path / "a")
    killed_after(tmp_path / "a", keep=3)
    (tree / source_in_shard(tmp_path / "a", 0)).write_bytes(b"no longer an image")  # shard 0: one sample less
    res = CliRunner().invoke(main, ["shard", *map(str, args), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "train-000001.tar and the shards after it: written again" in res.stderr
    cli("shard", *args, "--out", tmp_path / "b")  # a clean run over today's files: the same bytes
    names = sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_file())
    assert names == sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_file())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "samples OK" in cli("verify", "--shards", tmp_path / "a", "--workers", "1")


def test_the_shifted_shards_are_found_before_any_of_them_is_touched(tmp_path, monkeypatch):
    """Killed right after the changed shard was written again: the rerun finds the shift on the next
    shard, and a finished run's output again equals a clean one's."""
    from pipeline.shards import writer

    tree = tree_with_rotated(tmp_path / "tree")
    args = ["--imagefolder", tree, "--shard-size", "2", "--workers", "1"]
    cli("shard", *args, "--out", tmp_path / "a")
    (tree / source_in_shard(tmp_path / "a", 0)).write_bytes(b"no longer an image")
    real = writer._write_pass

    def killed_in_second_pass(*a, **k):
        metas, shifted = real(*a, **k)
        if shifted is not None:
            raise KeyboardInterrupt
        return metas, shifted

    monkeypatch.setattr(writer, "_write_pass", killed_in_second_pass)
    assert CliRunner().invoke(main, ["shard", *map(str, args), "--out", str(tmp_path / "a")]).exit_code != 0
    monkeypatch.setattr(writer, "_write_pass", real)
    res = CliRunner().invoke(main, ["shard", *map(str, args), "--out", str(tmp_path / "a")])
    assert res.exit_code == 0 and "train-000001.tar and the shards after it: written again" in res.stderr
    cli("shard", *args, "--out", tmp_path / "b")
    for name in ["manifest.json", "train.index.npy", "train-000001.tar", "train-000002.tar"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ---------------------------------------------------------------- names with tabs, newlines, non-UTF-8 bytes


def test_names_with_a_tab_a_newline_and_a_non_utf8_byte_keep_every_file_parseable(tmp_path):
    from trainer.engine.rundir import RunDir

    tree = tree_with_rotated(tmp_path / "tree")
    odd = ["a\tb\nc.jpg", os.fsdecode(b"caf\xe9 \\x41.jpg")]
    for name in odd:
        shutil.copy(tree / "train/cat/0.jpg", tree / "train/cat" / name)  # accepted: its name goes into a .json
        (tree / "train/dog" / name).write_bytes(b"not an image")  # rejected: its name goes into rejected.tsv
    res = CliRunner().invoke(main, ["shard", "--imagefolder", str(tree), "--out",
                                                    str(tmp_path / "s"), "--workers", "1"])
    assert res.exit_code == 0, res.output
    listed = [ln for ln in res.stderr.splitlines() if ln.startswith("  train\t")]
    assert len(listed) == 2 and all(len(ln.split("\t")) == 3 for ln in listed)
    assert "train/dog/a\\tb\\nc.jpg" in res.stderr and "caf\\xe9 \\\\x41.jpg" in res.stderr

    text = (tmp_path / "s" / "rejected.tsv").read_bytes().decode("utf-8")  # strict UTF-8
    rows = read_tsv(text)
    assert rows[0] == ["split", "source", "reason"] and all(len(r) == 3 for r in rows)
    assert sorted(r[1] for r in rows[1:]) == sorted(f"train/dog/{n}" for n in odd)  # exactly the names on disk

    raw = (tmp_path / "s" / "manifest.json").read_bytes()
    assert raw.isascii() and read_manifest(tmp_path / "s")["splits"]["train"]["count"] == 9
    for side in (tmp_path / "s" / ".kdpipe-shard").glob("*.json"):
        assert side.read_bytes().isascii() and json.loads(side.read_bytes())
    sources = []
    for tar_path in (tmp_path / "s").glob("train-*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    data = tar.extractfile(m).read()
                    assert data.isascii()
                    sources.append(json.loads(data)["source"])
    assert {f"train/cat/{n}" for n in odd} <= set(sources)

    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.record_skipped(0, [(3, f"shard {tmp_path / odd[1]}: bad\tbytes\nhere")])
    rows = read_tsv((run.path / "skipped.tsv").read_bytes().decode("utf-8"))
    assert rows == [["epoch", "sample_id", "reason"], ["0", "3", f"shard {tmp_path / odd[1]}: bad bytes here"]]
