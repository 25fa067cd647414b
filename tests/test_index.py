"""ShardIndex: random access by sample id, pickling for DataLoader workers, clear errors."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.index import ShardIndex
from pipeline.shards import ShardOptions, build_shards
from pipeline.synthetic import make_imagenet_tree


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
    with pytest.raises(KeyError, match="test"):
        ShardIndex(shard_dir, "test")
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardIndex(shard_dir / "nowhere", "train")
