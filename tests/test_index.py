"""ShardIndex: random access by sample id, pickling for DataLoader workers, clear errors."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import CorruptSampleError, MissingDataError, ShardFormatError
from pipeline.reader.index import INDEX_DTYPE, ShardIndex, check_shard_name, shard_file
from pipeline.shards.writer import ShardOptions, build_shards
from pipeline.sources.synthetic import make_imagenet_tree


@pytest.fixture
def shard_dir(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path / "tree", small_wnids, train_per_class=3, val_per_class=2, size=(24, 40))
    build_shards(tree.root, tmp_path / "out", classes=small_wnids, options=ShardOptions(shard_size=4),
                 workers=1, progress=False)
    return tmp_path / "out"


def tar_samples(path):
    with tarfile.open(path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    return {int(n[:8]): (files[n], json.loads(files[n[:8] + ".json"])) for n in files if n.endswith(".jpg")}


def test_metadata_and_reads_match_tars(shard_dir, small_wnids):
    idx = ShardIndex(shard_dir, "train")
    assert len(idx) == 12 and idx.num_classes == 4 and idx.classes == sorted(small_wnids)
    assert idx.manifest["splits"]["train"]["count"] == 12
    seen = {}
    for tar in sorted(shard_dir.glob("train-*.tar")):
        seen.update(tar_samples(tar))
    assert sorted(seen) == list(range(12))
    for sid, (jpg, meta) in seen.items():
        assert idx.read(sid) == jpg
        assert (idx.labels[sid], idx.heights[sid], idx.widths[sid]) == (meta["label"], 24, 40)
        assert idx.shard_path(sid).name == f"train-{sid // 4:06d}.tar"
    with Image.open(io.BytesIO(idx.read(0))) as im:
        assert im.size == (40, 24)
    val = ShardIndex(shard_dir, "val")
    assert len(val) == 8 and list(val.labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    idx.close()


def test_pickles_without_open_files(shard_dir):
    idx = ShardIndex(shard_dir, "train")
    first = idx.read(5)
    assert idx._fds
    clone = pickle.loads(pickle.dumps(idx))
    assert clone._fds == {} and clone.read(5) == first and np.array_equal(clone.labels, idx.labels)


def test_errors_name_shard_and_sample(shard_dir):
    idx = ShardIndex(shard_dir, "train")
    with pytest.raises(IndexError, match="sample id 12"):
        idx.read(12)
    os.truncate(shard_dir / "train-000002.tar", 1024)
    with pytest.raises(OSError, match=r"train-000002\.tar.*sample 9"):
        idx.read(9)
    (shard_dir / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar.*sample 4"):
        ShardIndex(shard_dir, "train").read(4)
    with pytest.raises(MissingDataError, match=r"no 'test' split \(it has: train, val\)"):
        ShardIndex(shard_dir, "test")
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardIndex(shard_dir / "nowhere", "train")


def test_crc_check_names_a_flipped_byte_that_still_decodes(shard_dir):
    idx = ShardIndex(shard_dir, "train")
    assert all(idx.rows["crc32"][i] == zlib.crc32(idx.read(i)) for i in range(len(idx)))
    offset, size = int(idx.rows["offset"][5]), int(idx.rows["size"][5])
    path = idx.shard_path(5)
    with open(path, "r+b") as f:  # one bit in the middle of the entropy-coded data
        f.seek(offset + size // 2)
        byte = f.read(1)[0]
        f.seek(offset + size // 2)
        f.write(bytes([byte ^ 0x04]))
    fresh = ShardIndex(shard_dir, "train")
    with pytest.raises(CorruptSampleError, match=rf"train sample 5 in shard {path}: .*crc32"):
        fresh.read(5)
    assert fresh.read(4) and len(ShardIndex(shard_dir, "train", check_crc=False).read(5)) == size
    with Image.open(io.BytesIO(ShardIndex(shard_dir, "train", check_crc=False).read(5))) as im:
        im.load()  # the damage is invisible to the decoder: why the check exists


@pytest.mark.parametrize("name", ["/etc/hostname", "../../etc/hostname", "sub/train.tar", "..", "", 7, "a\\b"])
def test_shard_names_must_be_plain_file_names(name):
    with pytest.raises(ShardFormatError, match="not a plain file name"):
        check_shard_name(name, "m.json: splits.train.shards[0].name")


def test_manifest_names_that_escape_are_refused(shard_dir, tmp_path):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["name"] = "../../etc/hostname"
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"shards\[1\]\.name: shard name '\.\./\.\./etc/hostname'"):
        ShardIndex(shard_dir, "train")
    outside = tmp_path / "elsewhere.tar"
    outside.write_bytes(b"x")
    (shard_dir / "link.tar").symlink_to(outside)
    with pytest.raises(ShardFormatError, match=r"'link\.tar' is a symlink to .*elsewhere\.tar, outside"):
        shard_file(shard_dir, "link.tar", "manifest")
    (shard_dir / "inside.tar").symlink_to(shard_dir / "train-000000.tar")
    assert shard_file(shard_dir, "inside.tar", "manifest") == shard_dir / "inside.tar"


def test_damaged_manifest_and_index_name_the_file(shard_dir):
    manifest = shard_dir / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ShardFormatError, match=r"manifest\.json: not valid JSON"):
        ShardIndex(shard_dir, "train")
    data = json.loads(text)
    data["splits"]["train"]["count"] = 10 ** 13
    manifest.write_text(json.dumps(data))
    with pytest.raises(ShardFormatError, match=r"splits\.train\.count: 10000000000000, but its shards hold 12"):
        ShardIndex(shard_dir, "train")
    manifest.write_text(text)
    index = shard_dir / "train.index.npy"
    np.save(index, np.array([{"a": 1}] * 12, dtype=object), allow_pickle=True)
    with pytest.raises(ShardFormatError, match=r"train\.index\.npy: not a readable index"):
        ShardIndex(shard_dir, "train")
    index.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ShardFormatError, match=r"train\.index\.npy: not a readable index"):
        ShardIndex(shard_dir, "train")
    index.unlink()
    with pytest.raises(MissingDataError, match=r"train\.index\.npy: index file missing"):
        ShardIndex(shard_dir, "train")


def test_an_index_without_crc32_is_refused_and_a_shard_rerun_adds_it(shard_dir, tmp_path, small_wnids):
    """Index files and sidecars written before the crc32 field: refused with the fix; `kdpipe shard` (same
    options) then rewrites only the index files and sidecars, taking each crc from the sample's .json."""
    good = np.load(shard_dir / "train.index.npy")
    old = np.zeros(len(good), INDEX_DTYPE.descr[:-1])
    for name in old.dtype.names:
        old[name] = good[name]
    np.save(shard_dir / "train.index.npy", old)
    for side in (shard_dir / ".kdpipe-shard").glob("*.tar.json"):
        meta = json.loads(side.read_text())
        meta["rows"] = [row[:5] for row in meta["rows"]]
        side.write_text(json.dumps(meta))
    with pytest.raises(ShardFormatError, match=r"older kdpipe, without the crc32 field; rerun `kdpipe shard`"):
        ShardIndex(shard_dir, "train")
    def stamps():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_dir.glob("*") if p.suffix in (".tar", ".idx")}

    before, manifest = stamps(), (shard_dir / "manifest.json").read_bytes()
    report = build_shards(tmp_path / "tree", shard_dir, classes=small_wnids, options=ShardOptions(shard_size=4),
                          workers=1, progress=False)
    assert report.written == [] and stamps() == before and len(before) == 10
    assert (shard_dir / "manifest.json").read_bytes() == manifest
    assert np.load(shard_dir / "train.index.npy").tobytes() == good.tobytes()
    assert ShardIndex(shard_dir, "train").read(3)
