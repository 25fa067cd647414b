"""timm models as `timm:NAME`: registry, C outputs, teacher weights (timm files, 1k head sliced by wnid only for
ImageNet classes), and the CLI's train / cache-teacher / eval with small timm models at random init on the CPU."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from pipeline.core.classes import imagenet1k_indices
from pipeline.core.errors import CheckpointError, ConfigError
from trainer.engine.models import MODELS, build_model, head_names, is_model_name, load_weights

timm = pytest.importorskip("timm")
SMALL = "timm:test_resnet"  # ~0.37 M parameters at random init
SMALLER = "timm:test_efficientnet"  # ~0.1 M


def test_timm_names_are_registry_names():
    assert SMALL in MODELS and is_model_name(SMALLER) and is_model_name("resnet18")
    assert "timm:no_such_net" not in MODELS and not is_model_name("timm:no_such_net")
    assert all(not n.startswith("timm:") for n in MODELS)  # iterating lists the built-ins only
    with pytest.raises(ConfigError, match="no_such_net"):
        build_model("timm:no_such_net", 3)
    from trainer.engine.models import check_model_names

    with pytest.raises(ConfigError, match=r"--students 'timm:no_such_net': timm has no model 'no_such_net'"):
        check_model_names(["tiny_cnn", "timm:no_such_net"])  # not the list of built-in names
    from trainer.config import make_config  # config validation checks names with `in MODELS`

    cfg = make_config("dual", (SMALL, SMALLER), teacher=SMALL)
    assert cfg.students == (SMALL, SMALLER)


@pytest.mark.parametrize("name", [SMALL, SMALLER])
def test_timm_model_gives_c_outputs_in_channels_last(name):
    model = build_model(name, 7).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).shape == (2, 7)


def test_timm_1k_weights_are_sliced_by_wnid_from_timm_files(tmp_path, small_wnids):
    classes = sorted(small_wnids)
    src = build_model(SMALL, 1000)
    assert head_names(src) == ["fc"]
    idx = imagenet1k_indices(classes)
    # timm's training script saves {"state_dict", "arch", ...}; published weights are .safetensors
    torch.save({"arch": "test_resnet", "epoch": 3, "state_dict": src.state_dict()}, tmp_path / "ckpt.pth.tar")
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    for f in ("ckpt.pth.tar", "model.safetensors"):
        dst = load_weights(build_model(SMALL, len(classes)), tmp_path / f, name=SMALL, classes=classes)
        assert torch.equal(dst.fc.weight, src.fc.weight[idx]) and torch.equal(dst.fc.bias, src.fc.bias[idx])
        with torch.no_grad():
            assert torch.allclose(dst.eval()(x), src.eval()(x)[:, idx], atol=1e-5)


def test_1k_head_is_not_sliced_for_classes_that_are_not_wnids(tmp_path):
    torch.save(build_model(SMALL, 1000).state_dict(), tmp_path / "1k.pt")
    with pytest.raises(CheckpointError, match="not ImageNet wnids.*'cat'.*3 outputs"):
        load_weights(build_model(SMALL, 3), tmp_path / "1k.pt", name=SMALL, classes=["cat", "dog", "emu"])
    torch.save(build_model(SMALLER, 3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no 'fc.weight'.*timm:test_resnet"):
        load_weights(build_model(SMALL, 3), tmp_path / "other.pt", name=SMALL, classes=["cat", "dog", "emu"])
    torch.save(build_model("timm:test_resnet", 3).state_dict() | {"extra.weight": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="do not fit.*1 unexpected keys"):
        load_weights(build_model(SMALL, 3), tmp_path / "x.pt", name=SMALL, classes=["cat", "dog", "emu"])


@pytest.mark.slow
def test_cli_trains_caches_and_evaluates_timm_models(tmp_path, small_wnids):
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.synthetic import make_imagenet_tree
    from trainer.engine.rundir import RunDir
    from trainer.cli import main

    def cli(*args):
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    make_imagenet_tree(tmp_path / "tree", small_wnids, train_per_class=4, val_per_class=2, size=(40, 48))
    build_shards(tmp_path / "tree", tmp_path / "shards", classes=small_wnids, options=ShardOptions(shard_size=8),
                 workers=1, progress=False)
    torch.save(build_model(SMALL, 1000).state_dict(), tmp_path / "teacher-1k.pt")  # ImageNet-1k shaped head
    common = ["--image-size", "32", "--batch-size", "8", "--backend", "torch", "--num-workers", "0",
              "--device", "cpu"]
    cli("train", "--shards", tmp_path / "shards", "--out", tmp_path / "dual", "--students", f"{SMALL},{SMALLER}",
        "--teacher", SMALL, "--teacher-weights", tmp_path / "teacher-1k.pt", "--epochs", "1", *common)
    rec = RunDir(tmp_path / "dual").read_metrics()[0].to_json()
    assert (rec["s0"]["name"], rec["s1"]["name"]) == (SMALL, SMALLER) and rec["teacher_val"] is not None
    cli("cache-teacher", "--shards", tmp_path / "shards", "--teacher", SMALL, "--teacher-weights",
        tmp_path / "teacher-1k.pt", "--out", tmp_path / "t.zarr", "--image-size", "32", "--batch-size", "8",
        "--chunk", "8", "--backend", "torch", "--num-workers", "0", "--device", "cpu")
    cli("train", "--shards", tmp_path / "shards", "--out", tmp_path / "kd", "--mode", "kd", "--students", SMALLER,
        "--teacher-cache", tmp_path / "t.zarr", "--epochs", "1", *common)
    out = cli("eval", "--run", tmp_path / "dual")
    assert SMALL in out and SMALLER in out and "(8 validation images)" in out
