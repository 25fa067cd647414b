"""Model registry and teacher weight loading (kdpipe files, C-way and 1k-way state dicts, bad shapes)."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.classes import imagenet1k_indices
from trainer.engine.models import MODELS, build_model, head_name, load_weights


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_gives_c_outputs_in_channels_last(name):
    model = build_model(name, 7).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model(x).shape == (2, 7)


def test_head_names_of_the_paper_models():
    assert head_name(build_model("resnet18", 3)) == "fc"
    assert head_name(build_model("mobilenet_v2", 3)) == "classifier.1"


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("vgg99", 10)


def test_c_way_state_dict_and_prefixes(tmp_path, small_wnids):
    src = build_model("tiny_cnn", len(small_wnids))
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "t.pt")
    dst = load_weights(build_model("tiny_cnn", len(small_wnids)), tmp_path / "t.pt", name="tiny_cnn",
                       classes=sorted(small_wnids))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_imagenet1k_head_is_sliced_to_the_classes(tmp_path, small_wnids):
    classes = sorted(small_wnids)
    src = build_model("resnet18", 1000)
    torch.save(src.state_dict(), tmp_path / "r18_1k.pth")
    dst = load_weights(build_model("resnet18", len(classes)), tmp_path / "r18_1k.pth", name="resnet18",
                       classes=classes)
    idx = imagenet1k_indices(classes)
    assert torch.equal(dst.fc.weight, src.fc.weight[idx])
    assert torch.equal(dst.fc.bias, src.fc.bias[idx])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dst.eval()(x), src.eval()(x)[:, idx], atol=1e-5)


def test_kdpipe_weights_file_picks_the_named_model(tmp_path, small_wnids):
    classes = sorted(small_wnids)
    src = build_model("tiny_resnet", len(classes))
    ckpt = {"format": "kdpipe-checkpoint", "classes": classes,
            "students": [{"name": "tiny_cnn", "model": build_model("tiny_cnn", len(classes)).state_dict()},
                         {"name": "tiny_resnet", "model": src.state_dict()}]}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    dst = load_weights(build_model("tiny_resnet", len(classes)), tmp_path / "ckpt.pt", name="tiny_resnet",
                       classes=classes)
    assert torch.equal(dst.fc.weight, src.fc.weight)
    with pytest.raises(ValueError, match="not 'resnet50'"):
        load_weights(build_model("resnet50", len(classes)), tmp_path / "ckpt.pt", name="resnet50", classes=classes)
    with pytest.raises(ValueError, match="differ"):
        load_weights(build_model("tiny_resnet", 3), tmp_path / "ckpt.pt", name="tiny_resnet", classes=classes[:3])


def test_bad_files_give_clear_errors(tmp_path, small_wnids):
    classes = sorted(small_wnids)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(build_model("tiny_cnn", 4), tmp_path / "missing.pt", name="tiny_cnn", classes=classes)
    torch.save(build_model("tiny_cnn", 10).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(ValueError, match="has 10 outputs; expected 4"):
        load_weights(build_model("tiny_cnn", 4), tmp_path / "ten.pt", name="tiny_cnn", classes=classes)
    torch.save(build_model("tiny_mobilenet", 4).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit tiny_cnn"):
        load_weights(build_model("tiny_cnn", 4), tmp_path / "other.pt", name="tiny_cnn", classes=classes)


def test_a_refusal_of_other_classes_says_where_the_lists_part():
    from trainer.engine.models import class_difference

    assert class_difference(["a", "b", "c"], ["a", "x", "c"]) == "class 1 is 'b' in training, 'x' in the shards"
    assert class_difference(["a", "b"], ["a", "b", "c"]) == "1 more in the shards, from 'c'"
    assert class_difference(["a", "b", "c"], ["a"]) == "2 more in training, from 'b'"
