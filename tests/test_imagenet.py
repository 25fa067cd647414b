"""Discovery of raw ImageNet trees: layouts, labels, class selection, extensions, clear errors."""
from __future__ import annotations

import pytest

from pipeline.sources.imagenet import discover, is_image_name
from pipeline.sources.synthetic import make_imagenet_tree


def test_folders_layout_and_label_order(tmp_path, small_wnids):
    make_imagenet_tree(tmp_path, small_wnids, train_per_class=2, val_per_class=1, size=(32, 32))
    tree = discover(tmp_path, small_wnids)
    assert tree.classes == sorted(small_wnids) != small_wnids
    assert tree.val_layout == "folders"
    assert len(tree.splits["train"]) == 8 and len(tree.splits["val"]) == 4
    for f in tree.splits["train"] + tree.splits["val"]:
        assert f.rel.split("/")[1] == f.wnid and tree.classes[f.label] == f.wnid


def test_flat_val_with_default_and_explicit_labels(tmp_path, small_wnids):
    t = make_imagenet_tree(tmp_path, small_wnids, train_per_class=1, val_per_class=2, val_layout="flat",
                           size=(32, 32))
    tree = discover(tmp_path, small_wnids)
    assert tree.val_layout == "flat"
    truth = {rel: w for w, rels in t.val.items() for rel in rels}
    assert {f.rel: f.wnid for f in tree.splits["val"]} == truth
    # an explicit labels file (Kaggle's CSV) that swaps two classes wins over the default
    a, b = sorted(small_wnids)[:2]
    swap = {a: b, b: a}
    lines = ["ImageId,PredictionString"] + [
        f"{rel.split('/')[1].removesuffix('.JPEG')},{swap.get(w, w)} 1 2 3 4" for rel, w in truth.items()]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    tree2 = discover(tmp_path, small_wnids, val_labels=tmp_path / "LOC_val_solution.csv")
    assert {f.rel: f.wnid for f in tree2.splits["val"]} == {r: swap.get(w, w) for r, w in truth.items()}


def test_selection_subset_and_missing_classes(tmp_path, small_wnids):
    make_imagenet_tree(tmp_path, small_wnids, train_per_class=1, val_per_class=1, size=(32, 32))
    sub = discover(tmp_path, small_wnids[:2])
    assert {f.wnid for f in sub.splits["train"]} == set(small_wnids[:2])
    with pytest.raises(FileNotFoundError, match="n01440764") as e:
        discover(tmp_path, small_wnids + ["n01440764"])
    assert "1 listed classes" in str(e.value)


def test_no_val_and_case_insensitive_extensions(tmp_path, small_wnids):
    t = make_imagenet_tree(tmp_path, small_wnids[:1], train_per_class=2, val_layout=None, size=(32, 32),
                           oddities=True, broken=True)
    (tmp_path / "train" / small_wnids[0] / "extra.JpG").write_bytes(b"")
    tree = discover(tmp_path, small_wnids[:1])
    assert "val" not in tree.splits and tree.val_layout is None
    rels = {f.rel for f in tree.splits["train"]}
    assert t.oddities["greyscale"] in rels and f"train/{small_wnids[0]}/extra.JpG" in rels
    assert not rels & set(t.stray)
    assert is_image_name("a.JPEG") and is_image_name("b.jpeg") and not is_image_name("notes.txt")


def test_flat_val_unlabeled_file_is_named(tmp_path, small_wnids):
    make_imagenet_tree(tmp_path, small_wnids[:1], train_per_class=1, val_per_class=1, val_layout="flat",
                       size=(32, 32))
    (tmp_path / "val" / "mystery.JPEG").write_bytes(b"x")
    with pytest.raises(ValueError, match="mystery.JPEG"):
        discover(tmp_path, small_wnids[:1])


def test_kaggle_nesting_and_fingerprint(tmp_path, small_wnids):
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    make_imagenet_tree(root, small_wnids[:2], train_per_class=1, val_per_class=1, size=(32, 32))
    tree = discover(tmp_path, small_wnids[:2])
    assert tree.root == root
    assert tree.fingerprint("train") == discover(root, small_wnids[:2]).fingerprint("train")
    with pytest.raises(FileNotFoundError, match="no train/"):
        discover(tmp_path / "ILSVRC", small_wnids[:2])


def test_val_folders_missing_class_is_named(tmp_path, small_wnids):
    import shutil

    make_imagenet_tree(tmp_path, small_wnids, train_per_class=1, val_per_class=1, size=(32, 32))
    shutil.rmtree(tmp_path / "val" / small_wnids[2])
    with pytest.raises(FileNotFoundError, match=small_wnids[2]) as e:
        discover(tmp_path, small_wnids)
    assert "val" in str(e.value)
