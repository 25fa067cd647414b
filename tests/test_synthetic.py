from PIL import Image

from pipeline.sources.synthetic import make_imagenet_tree


def test_tree_layout_folders(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path, small_wnids, train_per_class=3, val_per_class=2, size=(48, 64))
    assert tree.count("train") == 12 and tree.count("val") == 8
    for wnid in small_wnids:
        files = sorted(p.name for p in (tmp_path / "train" / wnid).iterdir())
        assert files == [f"{wnid}_{n}.JPEG" for n in (1, 2, 3)]
        assert len(list((tmp_path / "val" / wnid).iterdir())) == 2
    with Image.open(tmp_path / tree.train[small_wnids[0]][0]) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (64, 48)


def test_flat_val_uses_real_names(tmp_path, small_wnids):
    from pipeline.core.classes import default_val_labels

    tree = make_imagenet_tree(tmp_path, small_wnids, train_per_class=1, val_per_class=3, val_layout="flat", size=(32, 32))
    labels = default_val_labels()
    for wnid, rels in tree.val.items():
        for rel in rels:
            assert rel.startswith("val/ILSVRC2012_val_") and labels[rel.split("/")[1]] == wnid
    assert not any(p.is_dir() for p in (tmp_path / "val").iterdir())


def test_oddities_and_broken_files(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path, small_wnids[:1], train_per_class=1, val_layout=None, size=(40, 40),
                              oddities=True, broken=True)
    assert not (tmp_path / "val").exists()
    with Image.open(tmp_path / tree.oddities["cmyk"]) as im:
        assert im.mode == "CMYK"
    with Image.open(tmp_path / tree.oddities["png_as_jpeg"]) as im:
        assert im.format == "PNG"
    with Image.open(tmp_path / tree.oddities["greyscale"]) as im:
        assert im.mode == "L"
    assert (tmp_path / tree.broken["zero_byte"]).stat().st_size == 0
    assert set(tree.broken) == {"truncated", "zero_byte", "not_an_image"} and tree.stray


def test_realistic_default_size_is_photo_like(tmp_path, small_wnids):
    tree = make_imagenet_tree(tmp_path, small_wnids[:1], train_per_class=2, val_layout=None)
    sizes = [(tmp_path / rel).stat().st_size for rel in tree.train[small_wnids[0]]]
    assert all(40_000 < s < 250_000 for s in sizes), sizes


def test_deterministic(tmp_path, small_wnids):
    a = make_imagenet_tree(tmp_path / "a", small_wnids[:2], train_per_class=2, size=(32, 32), seed=3)
    b = make_imagenet_tree(tmp_path / "b", small_wnids[:2], train_per_class=2, size=(32, 32), seed=3)
    for rel in a.train[small_wnids[0]]:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes()
