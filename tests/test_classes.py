
import pytest

from pipeline.core import classes as classes


def test_imagenet100_list_is_canonical():
    wnids = classes.imagenet100_wnids()
    assert len(wnids) == 100 and len(set(wnids)) == 100
    assert wnids[0] == "n02869837"  # CMC order, not sorted
    assert classes.sorted_classes(wnids)[0] == "n01558993"


def test_parse_class_list_rejects_bad_and_duplicate(tmp_path):
    with pytest.raises(ValueError, match="not a WordNet id"):
        classes.parse_class_list("n01440764\nfoo\n", "x.txt")
    with pytest.raises(ValueError, match="repeated"):
        classes.parse_class_list("n01440764\nn01440764\n", "x.txt")
    assert classes.parse_class_list("# c\nn01440764  tench\n\nn01443537\n") == ["n01440764", "n01443537"]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        classes.load_class_list(tmp_path / "nope.txt")


def test_imagenet1k_indices_and_names():
    assert classes.imagenet1k_indices(["n01440764", "n01443537", "n15075141"]) == [0, 1, 999]
    assert classes.wnid_names()["n01440764"].startswith("tench")
    with pytest.raises(ValueError, match="n00000000"):
        classes.imagenet1k_indices(["n00000000"])


def test_default_val_labels_match_shipped_facts():
    labels = classes.default_val_labels()
    assert len(labels) == 50000
    assert labels["ILSVRC2012_val_00000001.JPEG"] == "n01751748"
    assert labels["ILSVRC2012_val_00000002.JPEG"] == "n09193705"


def test_read_val_labels_tsv_and_kaggle(tmp_path):
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("file\twnid\nILSVRC2012_val_00000001.JPEG\tn01751748\n")
    assert classes.read_val_labels(tsv) == {"ILSVRC2012_val_00000001.JPEG": "n01751748"}
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295\n")
    assert classes.read_val_labels(csv) == {"ILSVRC2012_val_00008726.JPEG": "n02119789"}
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        classes.read_val_labels(bad)
