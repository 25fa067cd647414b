"""The learnable dataset: real layout, deterministic, classes a simple model can tell apart, ambiguity as asked."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.core.classes import imagenet100_wnids
from pipeline.sources.learnable import AMBIGUOUS_KINDS, DESCRIPTION_FILE, SHAPES, class_table, make_learnable_tree


def _bytes(root, tree) -> dict[str, bytes]:
    return {p: (root / p).read_bytes() for split in ("train", "val") for ps in getattr(tree, split).values() for p in ps}


def test_layout_and_files(tmp_path, small_wnids):
    tree = make_learnable_tree(tmp_path, small_wnids, train_per_class=5, val_per_class=3, size=40, seed=0)
    assert tree.count("train") == 20 and tree.count("val") == 12
    for wnid in small_wnids:
        names = sorted(p.name for p in (tmp_path / "train" / wnid).iterdir())
        assert names == sorted(f"{wnid}_{n}.JPEG" for n in range(1, 6))
        vals = list((tmp_path / "val" / wnid).iterdir())
        assert len(vals) == 3 and all(re.fullmatch(r"ILSVRC2012_val_\d{8}\.JPEG", p.name) for p in vals)
    val_names = [p for ps in tree.val.values() for p in ps]
    assert len(set(val_names)) == len(val_names)
    with Image.open(tmp_path / tree.train[small_wnids[0]][0]) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (40, 40)
    desc = json.loads((tmp_path / DESCRIPTION_FILE).read_text())
    assert desc["wnids"] == small_wnids and desc["train"] == tree.train and desc["size"] == [40, 40]


def test_default_is_imagenet100_and_non_square(tmp_path):
    tree = make_learnable_tree(tmp_path, train_per_class=1, val_per_class=0, size=(24, 32), seed=0)
    assert tree.wnids == imagenet100_wnids() and tree.count("train") == 100 and tree.count("val") == 0
    with Image.open(tmp_path / tree.train[tree.wnids[0]][0]) as im:
        assert im.size == (32, 24)


def test_deterministic_from_seed(tmp_path, small_wnids):
    kw = dict(train_per_class=6, val_per_class=2, size=32, ambiguous_share=0.3)
    a = make_learnable_tree(tmp_path / "a", small_wnids, seed=3, **kw)
    b = make_learnable_tree(tmp_path / "b", small_wnids, seed=3, **kw)
    c = make_learnable_tree(tmp_path / "c", small_wnids, seed=4, **kw)
    assert _bytes(tmp_path / "a", a) == _bytes(tmp_path / "b", b)
    assert a.ambiguous == b.ambiguous
    assert _bytes(tmp_path / "a", a) != _bytes(tmp_path / "c", c)


def test_class_table_gives_distinct_looks():
    t = class_table(100, seed=0)
    pairs = set(zip(t.shape.tolist(), (t.hue * 10).round().astype(int).tolist()))
    assert len(pairs) == 100  # every class its own (shape, hue) pair
    assert set(t.shape.tolist()) == set(range(len(SHAPES)))


@pytest.mark.parametrize("share", [0.0, 0.25, 1.0])
def test_ambiguous_share_as_asked(tmp_path, small_wnids, share):
    tree = make_learnable_tree(tmp_path, small_wnids, train_per_class=10, val_per_class=5, size=32,
                               ambiguous_share=share, seed=1)
    assert len(tree.ambiguous_in("train")) == round(share * 40)
    assert len(tree.ambiguous_in("val")) == round(share * 20)
    for rel, info in tree.ambiguous.items():
        assert info["kind"] in AMBIGUOUS_KINDS
        own = rel.split("/")[1]
        if info["kind"] == "mix":
            assert info["other"] in small_wnids and info["other"] != own
        else:
            assert info["other"] is None
    if share == 1.0:
        assert {i["kind"] for i in tree.ambiguous.values()} == set(AMBIGUOUS_KINDS)


def _features(root, tree, split):
    x, y = [], []
    for label, wnid in enumerate(tree.wnids):
        for rel in getattr(tree, split)[wnid]:
            with Image.open(root / rel) as im:
                x.append(np.asarray(im.resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel() / 255)
            y.append(label)
    return np.stack(x), np.array(y)


def test_classes_are_learnable_and_ambiguity_hurts(tmp_path):
    """A logistic regression on 8x8 pixels beats chance (10 %) by far; ambiguous samples are harder."""
    import torch

    wnids = imagenet100_wnids()[:10]
    tree = make_learnable_tree(tmp_path, wnids, train_per_class=40, val_per_class=30, size=32,
                               ambiguous_share=0.3, seed=1)
    xt, yt = (torch.from_numpy(a) for a in _features(tmp_path, tree, "train"))
    xv, yv = _features(tmp_path, tree, "val")
    mean, std = xt.mean(0), xt.std(0) + 1e-3
    torch.manual_seed(0)
    lin = torch.nn.Linear(xt.shape[1], 10)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: a second (spinning) thread only slows it on a busy machine
    try:
        for _ in range(200):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin((xt - mean) / std), yt).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        correct = lin((torch.from_numpy(xv) - mean) / std).argmax(1).numpy() == yv
    assert correct.mean() > 0.6
    rels = [rel for wnid in wnids for rel in tree.val[wnid]]
    amb = np.array([rel in tree.ambiguous for rel in rels])
    assert amb.sum() == 90
    assert correct[~amb].mean() > correct[amb].mean() + 0.05


def test_bad_arguments(tmp_path, small_wnids):
    with pytest.raises(ValueError, match="ambiguous_share"):
        make_learnable_tree(tmp_path, small_wnids, ambiguous_share=1.5)
    with pytest.raises(ValueError, match="too small"):
        make_learnable_tree(tmp_path, small_wnids, size=8)
    with pytest.raises(ValueError, match="train_per_class"):
        make_learnable_tree(tmp_path, small_wnids, train_per_class=0)


def test_cli_synth_learnable(tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main

    out = tmp_path / "tree"
    res = CliRunner().invoke(main, ["synth", "--learnable", "--out", str(out), "--num-classes", "3", "--size", "24", "32",
                                    "--train-per-class", "4", "--val-per-class", "2", "--ambiguous-share", "0.5"])
    assert res.exit_code == 0, res.output
    assert "wrote 12 train and 6 val images of 3 classes (9 ambiguous)" in res.output
    desc = json.loads((out / DESCRIPTION_FILE).read_text())
    assert desc["size"] == [24, 32] and len(desc["ambiguous"]) == 9
    bad = CliRunner().invoke(main, ["synth", "--learnable", "--out", str(tmp_path / "b"), "--oddities"])
    assert bad.exit_code != 0 and "no oddities" in bad.output
