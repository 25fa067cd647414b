"""Any class-folder dataset (`kdpipe shard --imagefolder`) and the shard faults of issue 10: file names that
are not UTF-8, symlink loops, a class list with a bad byte. Downstream stages on 3 non-wnid classes."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.core.errors import ConfigError, TreeLayoutError
from pipeline.sources.imagefolder import carve_val, discover_imagefolder
from pipeline.sources.imagenet import SourceFile, discover
from pipeline.reader.index import ShardIndex, read_manifest
from pipeline.shards.writer import ShardOptions, build_shards
from pipeline.sources.synthetic import make_imagenet_tree, synth_image

CLASSES = ["zebra crossing", "cat", "Dog"]  # not wnids; sorted order is Dog, cat, zebra crossing
LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # a name that is not valid UTF-8 (surrogate-escaped str)


def image_file(path: Path, seed: int, fmt: str, size=(36, 44)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(synth_image(np.random.default_rng(seed), *size)).save(buf, format=fmt)
    path.write_bytes(buf.getvalue())


def folder_tree(root: Path, per_class: int = 4, val: bool = True) -> Path:
    """ROOT/train/<class>/ with JPEGs and PNGs (one in a nested folder), ROOT/val/<class>/ if val."""
    for k, c in enumerate(CLASSES):
        for i in range(per_class):
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            sub = "more/" if i == per_class - 1 else ""
            image_file(root / "train" / c / f"{sub}{i}.{ext}", 100 * k + i, fmt)
        if val:
            image_file(root / "val" / c / "v.jpg", 1000 + k, "JPEG")
    (root / "train" / "README.txt").write_text("not a class\n")
    return root


def kdpipe(*args, cwd=None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: what a user sees, exit code and all."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


# ---------------------------------------------------------------- discovery

def test_classes_are_sorted_folder_names_and_images_are_found_below_them(tmp_path):
    tree = discover_imagefolder(folder_tree(tmp_path))
    assert tree.classes == sorted(CLASSES) == ["Dog", "cat", "zebra crossing"]
    assert tree.val_layout == "folders" and tree.dataset == {"layout": "imagefolder", "val_share": None}
    train = tree.splits["train"]
    assert len(train) == 12 and len(tree.splits["val"]) == 3
    assert "train/cat/more/3.png" in {f.rel for f in train}  # nested folders, like torchvision's ImageFolder
    for f in train + tree.splits["val"]:
        assert f.rel.split("/")[1] == f.wnid and tree.classes[f.label] == f.wnid
    assert tree.rejected == []  # README.txt is ignored, like any non-image file


def test_val_share_is_stratified_seeded_and_disjoint(tmp_path):
    root = folder_tree(tmp_path, per_class=10, val=False)
    a = discover_imagefolder(root, val_share=0.2, seed=0)
    assert a.val_layout == "carved"
    val = [f.rel for f in a.splits["val"]]
    assert sorted(f.wnid for f in a.splits["val"]) == sorted(CLASSES * 2)  # 2 of 10 per class
    assert not set(val) & {f.rel for f in a.splits["train"]} and len(a.splits["train"]) == 24
    assert [f.rel for f in discover_imagefolder(root, val_share=0.2, seed=0).splits["val"]] == val
    assert [f.rel for f in discover_imagefolder(root, val_share=0.2, seed=1).splits["val"]] != val
    # a tiny class keeps one image for train and gives one to val; a single image stays in train
    two = [SourceFile(f"train/c/{i}.jpg", "c", 0) for i in range(2)]
    assert [len(x) for x in carve_val(two, 0.01, 0)] == [1, 1]
    assert [len(x) for x in carve_val(two[:1], 0.5, 0)] == [1, 0]


def test_layout_errors_name_the_folder(tmp_path):
    root = folder_tree(tmp_path)
    with pytest.raises(ConfigError, match="val"):
        discover_imagefolder(root, val_share=0.1)  # val/ exists
    with pytest.raises(ConfigError, match="between 0 and 1"):
        discover_imagefolder(root, val_share=1.5)
    (root / "val" / "horse").mkdir()
    with pytest.raises(TreeLayoutError, match="horse"):
        discover_imagefolder(root)
    (root / "val" / "horse").rmdir()
    (root / "train" / "empty").mkdir()
    with pytest.raises(TreeLayoutError, match="empty"):
        discover_imagefolder(root)


# ---------------------------------------------------------------- sharding

def test_shards_of_a_folder_tree_carry_its_classes(tmp_path):
    root = folder_tree(tmp_path / "tree")
    report = build_shards(discover_imagefolder(root), tmp_path / "out", options=ShardOptions(shard_size=5),
                          workers=1, progress=False)
    m = read_manifest(tmp_path / "out")
    assert [(c["label"], c["wnid"], c["name"]) for c in m["classes"]] == \
        [(0, "Dog", "Dog"), (1, "cat", "cat"), (2, "zebra crossing", "zebra crossing")]
    assert m["dataset"] == {"layout": "imagefolder", "val_share": None}
    assert m["splits"]["train"]["count"] == 12 and m["splits"]["train"]["reencoded"] == 6  # the PNGs
    assert report.rejected == []
    idx = ShardIndex(tmp_path / "out", "train")
    assert idx.classes == ["Dog", "cat", "zebra crossing"] and sorted(np.bincount(idx.labels)) == [4, 4, 4]
    # a rerun finds everything finished; another val share is a different input and is refused
    again = build_shards(discover_imagefolder(root), tmp_path / "out", options=ShardOptions(shard_size=5),
                         workers=1, progress=False)
    assert again.written == [] and len(again.reused) == len(report.written)


def test_loader_over_folder_shards_gives_three_class_batches(tmp_path):
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    root = folder_tree(tmp_path / "tree")
    build_shards(discover_imagefolder(root), tmp_path / "out", options=ShardOptions(shard_size=5), workers=1,
                 progress=False)
    loader = ImageNet100Loader(tmp_path / "out", "val", 8, backend="torch", device="cpu", num_workers=0,
                               spec=AugSpec(image_size=32, val_resize=36))
    batch = next(iter(loader))
    assert loader.num_classes == 3 and batch.images.shape == (3, 3, 32, 32)
    assert batch.labels.tolist() == [0, 1, 2]


# ---------------------------------------------------------------- issue 10: names and links

def test_non_utf8_name_is_sharded_and_hashes_by_its_bytes(tmp_path, small_wnids):
    t = make_imagenet_tree(tmp_path / "tree", small_wnids[:1], train_per_class=2, val_layout=None, size=(32, 32))
    first = t.root / t.train[small_wnids[0]][0]
    (first.parent / LATIN1).write_bytes(first.read_bytes())
    tree = discover(t.root, small_wnids[:1])
    assert f"train/{small_wnids[0]}/{LATIN1}" in {f.rel for f in tree.splits["train"]}
    fp = tree.fingerprint("train")
    assert fp == discover(t.root, small_wnids[:1]).fingerprint("train")
    report = build_shards(t.root, tmp_path / "out", classes=small_wnids[:1], workers=1, progress=False)
    assert report.manifest["splits"]["train"]["count"] == 3 and report.rejected == []
    assert report.manifest["inputs"]["train"]["list_sha256"] == fp


def test_symlink_loops_and_dead_links_are_listed_not_fatal(tmp_path):
    root = folder_tree(tmp_path / "tree")
    cat = root / "train" / "cat"
    os.symlink("a.jpg", cat / "a.jpg")  # a.jpg -> a.jpg
    os.symlink(".", cat / "again")  # a folder that contains itself
    os.symlink("..", cat / "more" / "up")  # ... two levels up
    os.symlink("ghost", root / "train" / "ghost")  # a class folder that links to itself
    os.symlink("missing.jpg", cat / "dead.jpg")
    os.symlink("..", cat / "split")  # train/: the other classes' images, again, as cats
    os.symlink("../Dog", cat / "dogs")  # another class folder
    tree = discover_imagefolder(root)
    escape = "symlink to the tree's root, a split or another class folder"
    assert {r[1] for r in tree.rejected if r[2].startswith(escape)} == {"train/cat/split", "train/cat/dogs"}
    assert ("train", "train/cat/again", "symlink loop: this folder contains itself") in tree.rejected
    assert ("train", "train/cat/more/up", "symlink loop: this folder contains itself") in tree.rejected
    assert any(r[1] == "train/ghost" for r in tree.rejected) and tree.classes == sorted(CLASSES)
    report = build_shards(tree, tmp_path / "out", workers=1, progress=False)
    rows = (tmp_path / "out" / "rejected.tsv").read_text().splitlines()
    reasons = {r.split("\t")[1]: r.split("\t")[2] for r in rows[1:]}
    assert "Too many levels of symbolic links" in reasons["train/cat/a.jpg"]
    assert "No such file" in reasons["train/cat/dead.jpg"]
    assert {"train/cat/again", "train/cat/more/up", "train/ghost", "train/cat/split"} <= set(reasons)
    assert report.manifest["rejected"] == len(rows) - 1 == 7
    assert report.manifest["splits"]["train"]["count"] == 12


@pytest.mark.slow
def test_cli_shard_faults_end_in_one_line_or_a_listed_file(tmp_path, small_wnids):
    t = make_imagenet_tree(tmp_path / "tree", small_wnids[:2], train_per_class=2, val_per_class=1, size=(32, 32))
    cls_dir = t.root / "train" / small_wnids[0]
    os.symlink("loop.JPEG", cls_dir / "loop.JPEG")
    (cls_dir / LATIN1).write_bytes(b"not a jpeg")  # rejected, with a name that is not UTF-8
    (tmp_path / "classes.txt").write_text("\n".join(small_wnids[:2]) + "\n")
    res = kdpipe("shard", "--imagenet", t.root, "--out", tmp_path / "out", "--classes", tmp_path / "classes.txt",
                 "--workers", "1")
    assert res.returncode == 0 and "Traceback" not in res.stdout + res.stderr, res.stderr
    assert "caf\\xe9.jpg" in res.stderr and "loop.JPEG" in res.stderr
    tsv = (tmp_path / "out" / "rejected.tsv").read_bytes()  # UTF-8: the byte is written \xe9 (pipeline/core/names.py)
    assert b"caf\\xe9.jpg\tnot an image" in tsv and b"loop.JPEG\tunreadable: Too many levels" in tsv

    bad = tmp_path / "bad.txt"
    bad.write_bytes(small_wnids[0].encode() + b"\n\xffn01440764\n")
    res = kdpipe("shard", "--imagenet", t.root, "--out", tmp_path / "out2", "--classes", bad)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and "Traceback" not in res.stderr and len(lines) == 1
    assert str(bad) in lines[0] and "not UTF-8" in lines[0] and ":2:" in lines[0]

    res = kdpipe("shard", "--imagefolder", folder_tree(tmp_path / "ftree"), "--out", tmp_path / "fout",
                 "--val-share", "0.5", "--workers", "1")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "--val-share" in res.stderr.splitlines()[-1]


# ---------------------------------------------------------------- downstream, 3 classes

@pytest.mark.slow
def test_train_cache_teacher_eval_and_report_on_three_classes(tmp_path):
    from trainer.cli import main

    def cli(*args):
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    root = folder_tree(tmp_path / "tree", per_class=8, val=False)
    cli("shard", "--imagefolder", root, "--out", tmp_path / "shards", "--val-share", "0.25", "--workers", "1",
        "--shard-size", "8")
    common = ["--image-size", "32", "--batch-size", "6", "--backend", "torch", "--num-workers", "0",
              "--device", "cpu"]
    cli("train", "--shards", tmp_path / "shards", "--out", tmp_path / "teacher", "--mode", "hard",
        "--students", "tiny_cnn", "--epochs", "1", *common)
    weights = tmp_path / "teacher" / "student0-tiny_cnn.pt"
    cli("cache-teacher", "--shards", tmp_path / "shards", "--teacher", "tiny_cnn", "--teacher-weights", weights,
        "--out", tmp_path / "t.zarr", "--image-size", "32", "--batch-size", "6", "--chunk", "6",
        "--backend", "torch", "--num-workers", "0", "--device", "cpu", "--topk", "2")
    cli("train", "--shards", tmp_path / "shards", "--out", tmp_path / "dual", "--students", "tiny_cnn,tiny_mobilenet",
        "--teacher-cache", tmp_path / "t.zarr", "--epochs", "1", *common)
    out = cli("eval", "--run", tmp_path / "dual")
    assert "(6 validation images)" in out  # 2 of 8 per class carved into val
    cli("report", tmp_path / "teacher", tmp_path / "dual", "--out", tmp_path / "report")
    assert (tmp_path / "report" / "report.md").is_file()
