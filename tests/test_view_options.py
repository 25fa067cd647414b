"""Own data, own augmentation (issue 18, item 6): the training view's fields are options of `train` and
`cache-teacher`, recorded in config.json and in the teacher cache's fingerprint, checked, and actually used."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.augment import AugSpec, sample_params
from trainer.config import ViewConfig

from clitools import cli, error_line

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
TRAIN = ["--mode", "hard", "--students", "tiny_cnn", "--epochs", "1", "--image-size", "24", "--batch-size", "8",
         "--backend", "torch", "--num-workers", "1", "--device", "cpu", "--seed", "0"]
CACHE = ["--teacher", "tiny_cnn", "--epochs", "1", "--image-size", "24", "--batch-size", "8", "--chunk", "16",
         "--backend", "torch", "--num-workers", "1", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def data(shared_shards, tmp_path_factory) -> Path:
    """`shards` (a link to a shared tiny set: read-only) and a `teacher.pt`."""
    from trainer.engine.models import build_model

    root = tmp_path_factory.mktemp("views")
    shards = shared_shards(wnids=WNIDS, train_per_class=4, val_per_class=2, size=(40, 56), shard_size=8)
    (root / "shards").symlink_to(shards, target_is_directory=True)
    torch.save(build_model("tiny_cnn", len(WNIDS)).state_dict(), root / "teacher.pt")
    return root


def test_a_run_records_its_view_and_trains_with_it(data, tmp_path, monkeypatch):
    import pipeline.reader.loader  # the job imports the loader class from it at call time

    specs = []
    real = pipeline.reader.loader.ImageNet100Loader

    def spy(*a, **k):
        specs.append(k["spec"])
        return real(*a, **k)

    monkeypatch.setattr(pipeline.reader.loader, "ImageNet100Loader", spy)
    run = tmp_path / "run"
    cli("train", "--shards", data / "shards", "--out", run, *TRAIN, "--flip-p", "0", "--crop-scale", "0.9", "1.0",
        "--brightness", "0", code=0)
    view = json.loads((run / "config.json").read_text())["view"]
    assert view == {"crop_scale": [0.9, 1.0], "crop_ratio": [0.75, 4 / 3], "flip_p": 0.0, "brightness": 0.0,
                    "contrast": 0.4, "saturation": 0.4}
    assert {(s.flip_p, s.scale, s.brightness) for s in specs} == {(0.0, (0.9, 1.0), 0.0)}


def test_the_view_fields_change_the_views_and_defaults_stay_imagenets():
    assert AugSpec(**ViewConfig().spec_fields()) == AugSpec()  # defaults: ImageNet's (golden values unchanged)
    ids = np.arange(200)
    h, w = np.full(200, 40), np.full(200, 56)
    plain = sample_params(AugSpec(image_size=24), 0, 0, ids, h, w)
    own = sample_params(AugSpec(image_size=24, **ViewConfig(flip_p=0.0, crop_scale=(0.9, 1.0)).spec_fields()),
                        0, 0, ids, h, w)
    assert plain.flip.any() and not own.flip.any()
    area = own.height * own.width / (40 * 56)
    assert area.min() > 0.85 and (plain.height * plain.width / (40 * 56)).min() < 0.5


def test_the_pixels_follow_the_flip_option(data):
    from pipeline.reader.loader import ImageNet100Loader

    def views(flip_p: float) -> torch.Tensor:
        view = ViewConfig(flip_p=flip_p, brightness=0.0, contrast=0.0, saturation=0.0)
        loader = ImageNet100Loader(data / "shards", "train", 8, backend="torch", device="cpu", num_workers=1,
                                   spec=AugSpec(image_size=24, **view.spec_fields()), normalize=False)
        batches = list(loader)
        order = torch.cat([b.ids for b in batches]).argsort()
        return torch.cat([b.images for b in batches])[order]

    never, always = views(0.0), views(1.0)
    assert torch.equal(never.flip(-1), always)  # the same crops, every one mirrored
    assert not torch.equal(never, always)


@pytest.mark.parametrize("flags, text", [
    (["--crop-scale", "0.5", "0.1"], "--crop-scale 0.5 0.1: need 0 < LO <= HI <= 1"),
    (["--crop-scale", "0", "1"], "--crop-scale 0 1: need 0 < LO <= HI <= 1"),
    (["--crop-scale", "0.5", "1.5"], "--crop-scale 0.5 1.5: need 0 < LO <= HI <= 1"),
    (["--crop-ratio", "0", "1"], "--crop-ratio 0 1: need 0 < LO <= HI"),
    (["--crop-ratio", "2", "1"], "--crop-ratio 2 1: need 0 < LO <= HI"),
    (["--flip-p", "1.5"], "--flip-p 1.5: need 0 <= P <= 1"),
    (["--brightness", "-0.1"], "--brightness -0.1: need a finite number >= 0"),
    (["--saturation", "nan"], "config key view.saturation (--saturation): expected a finite number, got nan"),
    (["--brightness", "inf"], "config key view.brightness (--brightness): expected a finite number, got inf"),
    (["--crop-ratio", "1", "inf"], "view.crop_ratio (--crop-ratio): expected two finite numbers [LO, HI], got (1.0, "
                                   "inf)"),
])
def test_impossible_view_values_are_one_line_naming_the_option(data, tmp_path, flags, text):
    for cmd in (["train", "--shards", data / "shards", "--out", tmp_path / "run", *TRAIN],
                ["cache-teacher", "--shards", data / "shards", "--out", tmp_path / "c.zarr", "--teacher-weights",
                 data / "teacher.pt", *CACHE]):
        assert text in error_line(cli(*cmd, *flags, code=2))
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.zarr").exists()


def test_a_config_file_view_is_checked_like_the_flags(data, tmp_path):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"view": {"crop_scale": [0.5]}}))
    line = error_line(cli("train", "--config", conf, "--shards", data / "shards", "--out", tmp_path / "run", *TRAIN,
                          code=2))
    assert "view.crop_scale (--crop-scale): expected two finite numbers [LO, HI], got (0.5,)" in line


def test_a_view_built_in_python_is_checked_like_the_flags():
    from pipeline.core.errors import ConfigError
    from trainer.config import ViewConfig

    with pytest.raises(ConfigError, match="--brightness inf: need a finite number >= 0"):
        ViewConfig(brightness=float("inf"))
    with pytest.raises(ConfigError, match="--crop-ratio takes two finite numbers LO HI"):
        ViewConfig(crop_ratio=(1.0, float("inf")))


def test_a_cache_made_with_other_view_values_is_refused_naming_the_field(data, tmp_path):
    from pipeline.cache.store import TeacherCache

    store = tmp_path / "c.zarr"
    cli("cache-teacher", "--shards", data / "shards", "--out", store, "--teacher-weights", data / "teacher.pt", *CACHE,
        code=0)
    args = ["train", "--shards", data / "shards", "--teacher-cache", store, *TRAIN]
    args[args.index("hard")] = "kd"
    line = error_line(cli(*args, "--out", tmp_path / "r1", "--flip-p", "0", code=1))
    assert f"teacher cache {store} does not match" in line
    assert "aug_spec.flip_p: cache has 0.5, expected 0.0" in line
    cli(*args, "--out", tmp_path / "r2", code=0)  # the same view: accepted
    own = tmp_path / "own.zarr"
    cli("cache-teacher", "--shards", data / "shards", "--out", own, "--teacher-weights", data / "teacher.pt", *CACHE,
        "--flip-p", "0", code=0)
    assert TeacherCache(own).fingerprint["aug_spec"]["flip_p"] == 0.0
    args[args.index(store)] = own
    cli(*args, "--out", tmp_path / "r3", "--flip-p", "0", code=0)


def test_a_run_from_before_the_view_options_resumes_with_imagenets_view(data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--shards", data / "shards", "--out", run, *TRAIN]
    args[args.index("--epochs") + 1] = "2"
    cli(*args, "--stop-after-steps", "3", code=0)
    config = json.loads((run / "config.json").read_text())
    del config["view"]  # as an older kdpipe wrote it
    (run / "config.json").write_text(json.dumps(config))
    state = torch.load(run / "checkpoint-last.pt", weights_only=True)
    del state["config"]["view"]
    torch.save(state, run / "checkpoint-last.pt")
    line = error_line(cli("train", "--out", run, "--resume", "--flip-p", "0", code=2))
    assert "--flip-p 0.0 (the run has 0.5)" in line
    assert "done:" in cli("train", "--out", run, "--resume", code=0)
