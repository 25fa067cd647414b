"""Faults a user meets (issue 10, the data-integrity items), end to end through the `kdpipe` CLI on tiny data.

Each fault ends in a correct result or in one line naming the culprit: the exit code, the line, no traceback,
and nothing lost (finished shards and cache units are intact and reused by the rerun that repairs the rest).
"""
from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from clitools import cli, error_line
from conftest import flip_jpeg_byte

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
TRAIN = ["--students", "tiny_cnn", "--epochs", "1", "--image-size", "32", "--batch-size", "8", "--backend", "torch",
         "--num-workers", "0", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def built(shared_shards) -> Path:
    """The shared tiny set's root: `tree` and `shards` (read-only: `shards` below is a private copy)."""
    return shared_shards(wnids=WNIDS, train_per_class=8, val_per_class=2, size=(40, 56), shard_size=8).parent


@pytest.fixture
def shards(built, tmp_path) -> Path:
    """A private copy of the finished shards, free to damage."""
    return Path(shutil.copytree(built / "shards", tmp_path / "shards", symlinks=True))


# ---------------------------------------------------------------- item 3: a flipped byte in a JPEG


def test_a_flipped_jpeg_byte_stops_training_naming_the_sample_and_verify_lists_it(shards, tmp_path):
    path = flip_jpeg_byte(shards, 13)
    line = error_line(cli("train", "--shards", shards, "--out", tmp_path / "run", "--mode", "hard", *TRAIN, code=1))
    assert f"train sample 13 in shard {path}: its JPEG bytes fail their crc32 check" in line
    out = cli("verify", "--shards", shards, "--workers", "1", code=1)
    assert f"{path.name}: sample 13: .jpg bytes differ from the crc32 in the index" in out
    assert f"{path.name}: sample 13: .jpg bytes differ from the checksum in its .json" in out

    from pipeline.reader.loader import ImageNet100Loader

    for workers in (0, 2):  # the same record whether a worker process or this one dropped the sample
        loader = ImageNet100Loader(shards, "train", 8, backend="torch", device="cpu", num_workers=workers,
                                   drop_last=False, skip_corrupt=True)
        seen = torch.cat([b.ids for b in loader]).tolist()
        assert sorted(seen) == [i for i in range(32) if i != 13] and [i for i, _ in loader.skipped] == [13]
        assert type(loader.skipped[0]) is tuple and "crc32" in loader.skipped[0][1]


# ---------------------------------------------------------------- items 4, 5 and verify: damage never crashes


def _cut_manifest(d: Path) -> None:
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text[: len(text) // 2])


def _edit_manifest(d: Path, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _killed(d: Path) -> None:
    """What a `kdpipe shard` killed while writing train shard 2 leaves: shards 0-1 and their sidecars, no
    manifest, no index files (written last), nothing of val."""
    for p in [d / "manifest.json", d / "train.index.npy", d / "val.index.npy", d / "rejected.tsv",
              *d.glob("train-00000[23].*"), *d.glob("val-*"), *(d / ".kdpipe-shard").glob("[tv]*-00000[23].tar.json"),
              *(d / ".kdpipe-shard").glob("val-*")]:
        p.unlink()


def _empty(d: Path) -> None:
    shutil.rmtree(d)
    d.mkdir()


DAMAGE = {  # name -> (damage, the line naming the culprit)
    "empty dir": (_empty, "manifest.json: no manifest; is"),
    "killed shard run": (_killed, "manifest.json: no manifest; is"),
    "manifest cut": (_cut_manifest, "manifest.json: not valid JSON (JSONDecodeError"),
    "manifest count 10^13": (lambda d: _edit_manifest(d, lambda m: m["splits"]["train"].update(count=10 ** 13)),
                             "splits.train.count: 10000000000000, but its shards hold 32 samples"),
    "name with ..": (lambda d: _edit_manifest(d, lambda m: m["splits"]["train"]["shards"][1].update(
        name="../../etc/hostname")), "shards[1].name: shard name '../../etc/hostname' is not a plain file name"),
    "absolute name": (lambda d: _edit_manifest(d, lambda m: m["splits"]["val"]["shards"][0].update(
        name="/etc/hostname")), "shard name '/etc/hostname' is not a plain file name"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_verify_and_train_refuse_an_unusable_manifest_in_one_line(shards, tmp_path, kind):
    damage, expect = DAMAGE[kind]
    damage(shards)
    for args in (["verify", "--shards", shards, "--workers", "1"],
                 ["train", "--shards", shards, "--out", tmp_path / "run", "--mode", "hard", *TRAIN]):
        assert expect in error_line(cli(*args, code=1)), args


def test_a_killed_shard_run_resumes_keeping_its_finished_shards(shards, built):
    from pipeline.shards.writer import ShardOptions, build_shards

    _killed(shards)
    before = {p.name: p.stat().st_ino for p in shards.glob("train-*.tar")}
    report = build_shards(built / "tree", shards, classes=WNIDS, options=ShardOptions(shard_size=8), workers=1,
                          progress=False)
    assert report.reused == ["train-000000.tar", "train-000001.tar"]
    assert all(before[n] == (shards / n).stat().st_ino for n in before)
    assert f"{shards}: 5 shards, 40 samples OK" in cli("verify", "--shards", shards, "--workers", "1", code=0)


def test_verify_lists_a_missing_index_once_and_checks_the_shards_anyway(shards):
    (shards / "train.index.npy").unlink()
    with open(shards / "train-000002.tar", "r+b") as f:  # damage verify must still find without the index
        f.seek(512 * 3)
        f.write(b"\xff")
    res = subprocess.run([sys.executable, "-m", "trainer.cli", "verify", "--shards", str(shards), "--workers", "2"],
                         capture_output=True, text=True)
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("verify: ")]  # not the progress bar
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith(f"{shards / 'train.index.npy'}: index file missing; rerun `kdpipe shard`")
    assert any(ln.startswith("train-000002.tar: sha256 differs") for ln in lines)
    assert len(lines) < 8, res.stderr  # not one line per sample
    assert lines[-1] == f"Error: {len(lines) - 1} problems in {shards}"


def test_verify_names_a_bad_index_a_symlink_escape_and_a_bomb_json_and_goes_on(shards, tmp_path):
    np.save(shards / "val.index.npy", np.array([{"x": 1}] * 8, dtype=object), allow_pickle=True)
    outside = tmp_path / "elsewhere.tar"
    shutil.move(shards / "train-000003.tar", outside)
    (shards / "train-000003.tar").symlink_to(outside)
    _bomb_json(shards / "train-000001.tar", sample_id=15)
    out = cli("verify", "--shards", shards, "--workers", "2", code=1)
    assert f"{shards / 'val.index.npy'}: not a readable index (Object arrays cannot be loaded" in out
    assert "splits.train.shards[3]: shard 'train-000003.tar' is a symlink to " in out
    assert "train-000001.tar: sample 15: .json unreadable (RecursionError" in out
    problems = [ln for ln in out.splitlines() if not ln.startswith("Error")]
    assert not [ln for ln in problems if ln.startswith(("train-000000", "train-000002", "val-000000"))], out
    line = error_line(cli("train", "--shards", shards, "--out", tmp_path / "run", "--mode", "hard", *TRAIN, code=1))
    assert "val.index.npy: not a readable index" in line


def _bomb_json(tar_path: Path, sample_id: int) -> None:
    """Rewrite a shard with one sample's .json nested 200,000 deep (the last sample: other offsets stay)."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name == f"{sample_id:08d}.json":
                data = b"[" * 200_000 + b"]" * 200_000
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))


def test_train_without_a_val_split_names_the_directory_and_its_splits(tmp_path):
    from pipeline.shards.writer import build_shards
    from pipeline.sources.synthetic import make_imagenet_tree

    make_imagenet_tree(tmp_path / "tree", WNIDS, train_per_class=2, val_layout=None, size=(40, 56))
    build_shards(tmp_path / "tree", tmp_path / "shards", classes=WNIDS, workers=1, progress=False)
    line = error_line(cli("train", "--shards", tmp_path / "shards", "--out", tmp_path / "run", "--mode", "hard",
                          *TRAIN, code=1))
    assert f"{tmp_path / 'shards'}: no 'val' split (it has: train)" in line


# ---------------------------------------------------------------- item 2: teacher cache damage


@pytest.fixture(scope="module")
def cached(built) -> dict:
    from trainer.jobs.cache_teacher import CacheTeacherConfig, cache_teacher
    from trainer.engine.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("tiny_resnet", len(WNIDS)).state_dict(), built / "teacher.pt")
    cfg = CacheTeacherConfig(shards=str(built / "shards"), out=str(built / "ref.zarr"),
                             teacher_weights=str(built / "teacher.pt"), teacher="tiny_resnet", epochs=1, seed=0,
                             image_size=32, batch_size=8, chunk_n=8, num_workers=0, device="cpu", progress=False)
    cache_teacher(cfg)
    return {"cfg": cfg, "store": built / "ref.zarr"}


def chunk_file(store: Path, name: str, coords: tuple) -> Path:
    return store / name / zarr.open_group(str(store), mode="r")[name].metadata.encode_chunk_key(coords)


@pytest.mark.slow
def test_cache_damage_is_listed_refused_by_train_and_repaired_by_rerunning_cache_teacher(cached, built, tmp_path):
    from trainer.jobs.cache_teacher import cache_teacher

    store = Path(shutil.copytree(cached["store"], tmp_path / "c.zarr"))
    names = ("logits", "weight", "entropy", "checksum", "done")
    ref = {n: zarr.open_group(str(store), mode="r")[n][:] for n in names}
    unit3 = [chunk_file(store, n, (0, 3, 0) if n in ("logits", "checksum") else (0, 3)) for n in names]
    kept = {p: p.stat().st_mtime_ns for p in unit3}  # unit (epoch 0, chunk 3): untouched, and must stay so

    chunk_file(store, "logits", (0, 1, 0)).unlink()  # lost: would read back as all-zero logits
    weight = chunk_file(store, "weight", (0, 2))
    data = bytearray(weight.read_bytes())
    data[len(data) // 2] ^= 0x10  # flipped inside the zstd frame
    weight.write_bytes(bytes(data))

    out = cli("verify", "--cache", store, code=1)
    assert f"{store}: epoch 0 chunk 1: logits fails its checksum: chunk file logits/c/0/1/0 is missing (ids 8..15)" in out
    assert f"{store}: epoch 0 chunk 2: weight " in out and "Error: 2 problems in" in out

    line = error_line(cli("train", "--shards", built / "shards", "--out", tmp_path / "run", "--mode", "kd",
                          "--teacher-cache", store, *TRAIN, code=1))
    assert f"teacher cache {store} is damaged: epoch 0 chunk 1: logits fails its checksum" in line
    assert "non-finite" not in line and "rerun `kdpipe cache-teacher` with the same options" in line

    with pytest.warns(UserWarning, match="recomputing 2 damaged units"):
        cache_teacher(dataclasses.replace(cached["cfg"], out=str(store)))  # the same command again
    again = zarr.open_group(str(store), mode="r")
    for n in names:
        np.testing.assert_array_equal(again[n][:], ref[n], err_msg=n)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert "every checksum OK" in cli("verify", "--cache", store, code=0)


def test_verify_cache_refuses_a_store_from_before_checksums(cached, tmp_path):
    store = Path(shutil.copytree(cached["store"], tmp_path / "old.zarr"))
    zarr.open_group(str(store), mode="r+").attrs["layout_version"] = 1
    line = error_line(cli("verify", "--cache", store, code=1))
    assert "layout_version 1 (written before per-unit checksums: its units cannot be verified)" in line
    assert "Error: give --shards DIR, --cache STORE, or both" in cli("verify", code=2)


# ---------------------------------------------------------------- synth: bad arguments


@pytest.mark.parametrize("args, expect", [
    (["--size", "0", "0"], "size (--size) (0, 0) is too small"),
    (["--train-per-class", "-1"], "need train_per_class (--train-per-class) >= 1"),
    (["--train-per-class", "0"], "need train_per_class (--train-per-class) >= 1"),
    (["--val-per-class", "-3"], "val_per_class (--val-per-class) >= 0"),
    (["--num-classes", "0"], "--num-classes 0: the class list (ImageNet-100) has 100 classes; give 1..100"),
    (["--num-classes", "101"], "--num-classes 101: the class list (ImageNet-100) has 100 classes"),
    (["--num-classes", "-2"], "--num-classes -2"),
    (["--learnable", "--num-classes", "1"], "need at least 2 classes (--num-classes), got 1"),
    (["--learnable", "--size", "8", "8"], "sides of 16..4096 px"),
    (["--size", "100000", "100000"], "(100000, 100000) is too small, too large or malformed"),
    (["--learnable", "--size", "64", "5000"], "sides of 16..4096 px"),
])
def test_synth_refuses_arguments_that_would_write_an_empty_or_truncated_tree(tmp_path, args, expect):
    line = error_line(cli("synth", "--out", tmp_path / "tree", *args, code=2))
    assert expect in line
    assert not (tmp_path / "tree").exists()


def test_synth_refuses_a_file_as_out(tmp_path):
    (tmp_path / "f").write_text("mine")
    for extra in ([], ["--learnable"]):
        assert "is a file, not a directory" in error_line(cli("synth", "--out", tmp_path / "f", *extra, code=2))
    assert (tmp_path / "f").read_text() == "mine"
