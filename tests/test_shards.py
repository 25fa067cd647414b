"""The shard writer: format of docs/CONTRACTS.md, oddities, rejections, shuffle, idempotence, options."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.reader.index import INDEX_DTYPE
from pipeline.core.errors import OptionsMismatch
from pipeline.shards.writer import ShardOptions, build_shards, manifest_sha256, read_manifest
from pipeline.sources.synthetic import make_imagenet_tree

OPTS = ShardOptions(shard_size=5)


@pytest.fixture
def odd_tree(tmp_path, small_wnids):
    return make_imagenet_tree(tmp_path / "tree", small_wnids, train_per_class=4, val_per_class=2,
                              size=(40, 56), oddities=True, broken=True)


def build(tree, out, workers=1, **kw):
    kw.setdefault("options", OPTS)
    return build_shards(tree.root, out, classes=tree.wnids, workers=workers, progress=False, **kw)


def read_tar(path):
    """(name, data offset, bytes) of every member, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, tar.extractfile(m).read()) for m in tar]


def test_format_matches_contract(tmp_path, odd_tree):
    out = tmp_path / "out"
    report = build(odd_tree, out, workers=2)
    m = read_manifest(out)
    assert m["format"] == "kdpipe-shards" and m["format_version"] == 1
    assert [c["wnid"] for c in m["classes"]] == sorted(odd_tree.wnids) and m["classes"][0]["name"]
    n_train = odd_tree.count("train")  # valid ones, oddities included
    assert m["splits"]["train"]["count"] == n_train and m["splits"]["val"]["count"] == odd_tree.count("val")
    assert m["rejected"] == 3 and m["options"]["shard_size"] == 5 and m["splits"]["train"]["reencoded"] == 2
    shards = m["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == [f"train-{k:06d}.tar" for k in range(len(shards))]
    assert len(shards) == -(-(n_train + 3) // 5)  # positions include rejected files
    idx = np.load(out / "train.index.npy")
    assert idx.dtype == INDEX_DTYPE and len(idx) == n_train
    sources = set()
    for k, s in enumerate(shards):
        assert s["bytes"] == (out / s["name"]).stat().st_size
        members = read_tar(out / s["name"])
        assert len(members) == 4 * s["count"]
        for j in range(s["count"]):
            sid = s["first_id"] + j
            (jn, joff, jpg), (cn, _, cls), (mn, _, meta), (iname, _, i64) = members[4 * j: 4 * j + 4]
            key = f"{sid:08d}"
            assert (jn, cn, mn, iname) == (f"{key}.jpg", f"{key}.cls", f"{key}.json", f"{key}.i64")
            row = idx[sid]
            assert (row["shard"], row["offset"], row["size"]) == (k, joff, len(jpg))
            meta = json.loads(meta)
            assert int(cls) == row["label"] == meta["label"] and struct.unpack("<q", i64)[0] == sid == meta["id"]
            assert m["classes"][meta["label"]]["wnid"] == meta["wnid"] == meta["source"].split("/")[1]
            with Image.open(io.BytesIO(jpg)) as im:
                im.load()
                assert im.format == "JPEG" and im.mode in ("RGB", "L")
                assert im.size == (row["width"], row["height"]) == (meta["width"], meta["height"])
            sources.add(meta["source"])
    assert sources == {r for rels in odd_tree.train.values() for r in rels}
    assert report.written and not report.reused


def test_passthrough_is_byte_exact_and_oddities_reencoded(tmp_path, odd_tree):
    out = tmp_path / "out"
    build(odd_tree, out)
    by_source = {}
    for s in read_manifest(out)["splits"]["train"]["shards"]:
        members = read_tar(out / s["name"])
        for j in range(0, len(members), 4):
            by_source[json.loads(members[j + 2][2])["source"]] = members[j][2]
    plain = odd_tree.train[odd_tree.wnids[1]][0]
    assert by_source[plain] == (odd_tree.root / plain).read_bytes()
    grey = odd_tree.oddities["greyscale"]
    assert by_source[grey] == (odd_tree.root / grey).read_bytes()
    for kind in ("cmyk", "png_as_jpeg"):
        with Image.open(io.BytesIO(by_source[odd_tree.oddities[kind]])) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (56, 40)


def test_rejections_reported(tmp_path, odd_tree):
    out = tmp_path / "out"
    report = build(odd_tree, out)
    lines = (out / "rejected.tsv").read_text().splitlines()
    assert lines[0] == "split\tsource\treason"
    rows = {src: reason for split, src, reason in (line.split("\t") for line in lines[1:])}
    assert set(rows) == set(odd_tree.broken.values()) == {src for _, src, _ in report.rejected}
    assert rows[odd_tree.broken["zero_byte"]] == "zero-byte file"
    assert "truncated" in rows[odd_tree.broken["truncated"]]
    assert "not an image" in rows[odd_tree.broken["not_an_image"]] and " at 0x" not in rows[odd_tree.broken["not_an_image"]]


def test_train_is_shuffled_val_sorted_and_seeded(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path / "t", small_wnids, train_per_class=6, val_per_class=3, size=(32, 32))
    build(tree, tmp_path / "a")
    build(tree, tmp_path / "b", options=ShardOptions(shard_size=5, seed=1))
    a = np.load(tmp_path / "a" / "train.index.npy")
    b = np.load(tmp_path / "b" / "train.index.npy")
    assert len(set(a["label"][:5].tolist())) > 1, "first shard should mix classes"
    assert not np.array_equal(a["label"], b["label"])
    assert sorted(a["label"]) == sorted(b["label"])
    val = np.load(tmp_path / "a" / "val.index.npy")
    assert list(val["label"]) == sorted(val["label"])


def test_idempotent_rerun_and_determinism(tmp_path, odd_tree):
    out = tmp_path / "out"
    build(odd_tree, out)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    state = {p.name: p.stat().st_mtime_ns for p in (out / ".kdpipe-shard").iterdir()}
    report = build(odd_tree, out, workers=2)
    assert {p.name: p.stat().st_mtime_ns for p in (out / ".kdpipe-shard").iterdir()} == state
    assert report.written == [] and len(report.reused) == len(read_manifest(out)["splits"]["train"]["shards"]) + 2
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    assert after == before  # nothing rewritten, not even touched
    build(odd_tree, tmp_path / "again", workers=2)
    for name in before:
        assert (tmp_path / "again" / name).read_bytes() == before[name][1], name
    assert manifest_sha256(out) == manifest_sha256(tmp_path / "again")


def test_option_mismatch_and_overwrite(tmp_path, odd_tree):
    out = tmp_path / "out"
    build(odd_tree, out)
    (out / "my-notes.txt").write_text("user data")
    with pytest.raises(OptionsMismatch, match=r"shard_size: 5 -> 7"):
        build(odd_tree, out, options=ShardOptions(shard_size=7))
    with pytest.raises(OptionsMismatch, match="classes"):
        build_shards(odd_tree.root, out, classes=odd_tree.wnids[:2], options=OPTS, workers=1, progress=False)
    report = build(odd_tree, out, options=ShardOptions(shard_size=7), overwrite=True)
    assert report.manifest["options"]["shard_size"] == 7 and not report.reused
    names = {p.name for p in out.iterdir()}
    assert "my-notes.txt" in names and "train-000004.tar" not in names  # old extra shards removed, user file kept


def test_dali_index_matches_wds2idx(tmp_path, odd_tree):
    # wds2idx is installed beside this interpreter (the venv's bin/, on PATH or not)
    wds2idx = shutil.which("wds2idx", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if wds2idx is None or shutil.which("tar") is None:
        pytest.skip("needs DALI's wds2idx and GNU tar")
    out = tmp_path / "out"
    build(odd_tree, out)
    for tar in sorted(out.glob("*.tar")):
        subprocess.run([wds2idx, str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert tar.with_suffix(".idx").read_text() == (tmp_path / "ref.idx").read_text(), tar.name


def test_max_side_downscales(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path / "t", small_wnids[:1], train_per_class=2, val_layout=None, size=(40, 80))
    report = build(tree, tmp_path / "out", options=ShardOptions(shard_size=5, max_side=32))
    idx = np.load(tmp_path / "out" / "train.index.npy")
    assert (idx["width"] == 32).all() and (idx["height"] == 16).all()
    assert report.manifest["splits"]["train"]["reencoded"] == 2


# ------------------------------------------------------------------ resume after kill -9, verify, CLI

KILL_SCRIPT = """
import os, signal, sys
import pipeline.shards.tar_io as io_, pipeline.shards.writer as sh
from pipeline.shards.writer import ShardOptions, build_shards
mode, root, out, wnids = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
if mode == "mid_tar":  # die while the third shard is half written (2 of its samples)
    add = io_.TarShardWriter.add_sample
    def dying_add(self, members):
        if self.path.name == "train-000002.tar" and len(self.members) == 8:
            os.kill(os.getpid(), signal.SIGKILL)
        return add(self, members)
    io_.TarShardWriter.add_sample = dying_add
else:  # die after train-000001.tar is renamed into place but before its sidecar exists
    write_json = sh.atomic_write_json
    def dying_write(path, obj):
        if path.name == "train-000001.tar.json":
            os.kill(os.getpid(), signal.SIGKILL)
        write_json(path, obj)
    sh.atomic_write_json = dying_write
build_shards(root, out, classes=wnids, options=ShardOptions(shard_size=5), workers=2, progress=False)
"""


@pytest.mark.parametrize("mode", ["mid_tar", "before_sidecar"])
def test_resume_after_kill9_gives_identical_output(tmp_path, odd_tree, mode):
    import signal
    import sys

    ref, out = tmp_path / "ref", tmp_path / "out"
    build(odd_tree, ref)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, mode, str(odd_tree.root), str(out),
                           ",".join(odd_tree.wnids)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (out / "manifest.json").exists()
    finished = {p.name for p in out.glob("train-*.tar")}
    assert finished <= {"train-000000.tar", "train-000001.tar"}  # shards finish in the background: timing varies
    if mode == "mid_tar":
        assert (out / ".train-000002.tar.tmp").exists()  # the partial shard never has a final name
    report = build(odd_tree, out, workers=2)
    # a shard whose sidecar was written before the kill is reused; the others are redone
    assert set(report.reused) <= {"train-000000.tar", "train-000001.tar"} and "train-000002.tar" in report.written
    assert sorted(report.reused + report.written) == sorted(p.name for p in ref.glob("*.tar"))
    if mode == "before_sidecar":  # killed while finishing shard 1: shard 0 was complete, shard 1 is redone
        assert report.reused == ["train-000000.tar"] and "train-000001.tar" in report.written
    ref_files = sorted(p.name for p in ref.iterdir() if p.is_file())
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ref_files  # no temp files left
    for name in ref_files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_verify_names_bad_shards_and_samples(tmp_path, odd_tree):
    from pipeline.shards.writer import verify_shards

    out = tmp_path / "out"
    build(odd_tree, out)
    assert verify_shards(out).ok
    idx = np.load(out / "train.index.npy")
    sid = 7  # in train-000001.tar; flip one byte in the middle of its JPEG data
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[idx[sid]["offset"] + idx[sid]["size"] // 2] ^= 0x55
    path.write_bytes(bytes(data))
    os_truncate = out / "val-000001.tar"
    os_truncate.write_bytes(os_truncate.read_bytes()[:3000])
    result = verify_shards(out, workers=2)
    text = "\n".join(result.problems)
    assert not result.ok
    assert "train-000001.tar: sha256 differs" in text and f"train-000001.tar: sample {sid}:" in text
    assert "val-000001.tar:" in text and "train-000000.tar" not in text
    assert "train-000002.tar" not in text


def test_cli_strict_summary_and_verify(tmp_path, odd_tree):
    from click.testing import CliRunner

    from trainer.cli import main

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(odd_tree.wnids) + "\n")
    args = ["shard", "--imagenet", str(odd_tree.root), "--out", str(tmp_path / "o"), "--classes", str(classes),
            "--shard-size", "5", "--workers", "1"]
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "rejected 3 files" in first.output and "zero-byte file" in first.output
    strict = runner.invoke(main, args + ["--strict"])
    assert strict.exit_code == 1 and "wrote 0 shards" in strict.output and "--strict" in strict.output
    mismatch = runner.invoke(main, args[:-4] + ["--shard-size", "6"])
    assert mismatch.exit_code == 1 and "shard_size: 5 -> 6" in mismatch.output
    ok = runner.invoke(main, ["verify", "--shards", str(tmp_path / "o"), "--workers", "1"])
    assert ok.exit_code == 0 and "samples OK" in ok.output
    (tmp_path / "o" / "train-000003.tar").unlink()
    bad = runner.invoke(main, ["verify", "--shards", str(tmp_path / "o"), "--workers", "1"])
    assert bad.exit_code == 1 and "train-000003.tar: missing" in bad.output


def test_flat_val_layout_shards(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path / "t", small_wnids, train_per_class=1, val_per_class=3, val_layout="flat",
                              size=(32, 32))
    report = build(tree, tmp_path / "out")
    assert report.manifest["splits"]["val"]["count"] == 12
    idx = np.load(tmp_path / "out" / "val.index.npy")
    assert list(idx["label"]) == [i // 3 for i in range(12)]
    members = read_tar(tmp_path / "out" / "val-000000.tar")
    meta = json.loads(members[2][2])
    assert meta["source"].startswith("val/ILSVRC2012_val_") and meta["wnid"] == sorted(small_wnids)[0]


def test_default_class_list_is_imagenet100(tmp_path):
    from pipeline.core.classes import imagenet100_wnids

    wnids = imagenet100_wnids()
    tree = make_imagenet_tree(tmp_path / "t", wnids, train_per_class=1, val_layout=None, size=(16, 16))
    report = build_shards(tree.root, tmp_path / "out", options=ShardOptions(shard_size=50), workers=1,
                          progress=False)
    assert [c["wnid"] for c in report.manifest["classes"]] == sorted(wnids) and len(wnids) == 100
    assert "val" not in report.manifest["splits"] and report.manifest["splits"]["train"]["count"] == 100


def test_cli_flat_val_with_labels_file(tmp_path, small_wnids):
    from click.testing import CliRunner

    from trainer.cli import main

    tree = make_imagenet_tree(tmp_path / "t", small_wnids, train_per_class=1, val_per_class=2, val_layout="flat",
                              size=(24, 24))
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(small_wnids) + "\n")
    first, second = sorted(small_wnids)[:2]
    rows = [(rel.split("/")[1], {first: second, second: first}.get(w, w)) for w, rels in tree.val.items() for rel in rels]
    labels = tmp_path / "labels.tsv"
    labels.write_text("file\twnid\n" + "".join(f"{f}\t{w}\n" for f, w in rows))
    res = CliRunner().invoke(main, ["shard", "--imagenet", str(tree.root), "--out", str(tmp_path / "o"),
                                    "--classes", str(classes), "--val-labels", str(labels), "--workers", "1"])
    assert res.exit_code == 0, res.output
    members = read_tar(tmp_path / "o" / "val-000000.tar")
    metas = [json.loads(d) for n, _, d in members if n.endswith(".json")]
    by_source = {m["source"].split("/")[1]: m["wnid"] for m in metas}
    assert by_source == dict(rows)  # the labels file, not the shipped ground truth, decided the classes


def test_second_writer_on_same_output_is_refused(tmp_path, small_wnids):
    import subprocess
    import sys

    tree = make_imagenet_tree(tmp_path / "t", small_wnids[:1], train_per_class=1, val_layout=None, size=(16, 16))
    holder = subprocess.Popen(  # another process holds the shard directory, as a running `kdpipe shard` does
        [sys.executable, "-c", "import sys; from pipeline.core.locks import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'x'):\n    print('held', flush=True); sys.stdin.readline()",
         str(tmp_path / "out" / ".kdpipe-shard" / "lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="another `kdpipe shard` writes it"):
            build(tree, tmp_path / "out")
    finally:
        holder.kill()  # kill -9: the OS frees the lock
        holder.wait()
        holder.stdin.close(), holder.stdout.close()
    assert build(tree, tmp_path / "out").manifest["splits"]["train"]["count"] == 1


def test_foreign_files_in_out_are_not_overwritten(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path / "t", small_wnids[:1], train_per_class=1, val_layout=None, size=(16, 16))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train-000000.tar").write_bytes(b"someone else's shard")
    with pytest.raises(OptionsMismatch, match="no record of how they were made"):
        build(tree, tmp_path / "out")
    assert (tmp_path / "out" / "train-000000.tar").read_bytes() == b"someone else's shard"
    assert build(tree, tmp_path / "out", overwrite=True).manifest["splits"]["train"]["count"] == 1


def test_rerun_rewrites_a_deleted_or_damaged_shard(tmp_path, odd_tree):
    out = tmp_path / "out"
    build(odd_tree, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "train-000001.tar").unlink()
    with open(out / "val-000000.tar", "ab") as f:  # size differs from the sidecar: redone
        f.write(b"junk")
    report = build(odd_tree, out)
    assert sorted(report.written) == ["train-000001.tar", "val-000000.tar"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
