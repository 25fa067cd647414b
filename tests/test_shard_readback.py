"""The shards read back the same samples through webdataset.WebDataset and DALI's fn.readers.webdataset."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.reader.index import ShardIndex
from pipeline.shards.writer import ShardOptions, build_shards
from pipeline.sources.synthetic import make_imagenet_tree


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("readback")
    wnids = ["n02869837", "n01749939", "n02488291"]
    tree = make_imagenet_tree(root / "tree", wnids, train_per_class=4, val_per_class=2, size=(30, 44),
                              oddities=True, broken=True)
    build_shards(tree.root, root / "out", classes=wnids, options=ShardOptions(shard_size=5), workers=1,
                 progress=False)
    return root / "out"


def expected(shard_dir, split):
    idx = ShardIndex(shard_dir, split)
    return idx, [shard_dir / s["name"] for s in idx.manifest["splits"][split]["shards"]]


@pytest.mark.parametrize("split", ["train", "val"])
def test_webdataset_reads_every_sample(shards, split):
    import webdataset as wds

    idx, urls = expected(shards, split)
    ds = wds.WebDataset([str(u) for u in urls], shardshuffle=False, empty_check=False)
    seen = []
    for sample in ds:
        sid = int.from_bytes(sample["i64"], "little")
        assert sample["__key__"] == f"{sid:08d}" and sample["jpg"] == idx.read(sid)
        assert int(sample["cls"]) == idx.labels[sid] == json.loads(sample["json"])["label"]
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            assert im.convert("RGB").size == (idx.widths[sid], idx.heights[sid])
        seen.append(sid)
    assert seen == list(range(len(idx)))


@pytest.mark.dali
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_reads_every_sample_cpu(shards, split):
    from nvidia.dali import fn, pipeline_def, types

    idx, urls = expected(shards, split)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def read():
        jpg, cls, sid = fn.readers.webdataset(
            paths=[str(u) for u in urls], index_paths=[str(u.with_suffix(".idx")) for u in urls],
            ext=["jpg", "cls", "i64"], dtypes=[types.UINT8, types.UINT8, types.INT64],
            missing_component_behavior="error", random_shuffle=False, pad_last_batch=True, name="reader")
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), cls, sid

    pipe = read()
    pipe.build()
    n = len(idx)
    seen = {}
    for _ in range(-(-n // 4)):
        images, labels, ids = pipe.run()
        for k in range(len(ids)):
            sid = int(np.array(ids[k]).reshape(-1)[0])
            label = int(bytes(np.array(labels[k]).astype(np.uint8)).decode())
            seen[sid] = (label, np.array(images[k]).shape)
    assert sorted(seen) == list(range(n))
    for sid, (label, shape) in seen.items():
        assert label == idx.labels[sid] and shape == (idx.heights[sid], idx.widths[sid], 3)
