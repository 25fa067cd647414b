"""End to end on real synthetic shards: `kdpipe train` (teacher, then students), `kdpipe eval`, exact
resume through the real loader, the teacher cache, and the bad-input errors."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from trainer.cli import main
from trainer.engine.metrics import TIMING_FIELDS as TIMING
from trainer.engine.rundir import RunDir

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]


def read_metrics(run) -> list[dict]:
    return [r.to_json() for r in RunDir(run).read_metrics()]
COMMON = ["--image-size", "32", "--batch-size", "16", "--backend", "torch", "--num-workers", "0",
          "--device", "cpu", "--lr", "0.05"]


@pytest.fixture(scope="module")
def shards(shared_shards):
    return shared_shards(wnids=WNIDS, train_per_class=16, val_per_class=4, size=40, shard_size=32, learnable=True)


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory):
    """A tiny_resnet trained with --mode hard: the teacher of the distillation runs."""
    run = tmp_path_factory.mktemp("runs") / "teacher"
    res = cli("train", "--shards", shards, "--out", run, "--mode", "hard", "--students", "tiny_resnet",
              "--epochs", "3", *COMMON)
    assert res.exit_code == 0, res.output
    return run


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def cli_error(*args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code != 0
    return res.output


def test_teacher_trains_with_hard_labels_and_lowers_its_loss(shards, teacher):
    recs = read_metrics(teacher)
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert recs[-1]["s0"]["loss"] < recs[0]["s0"]["loss"]
    assert recs[0]["images"] == 64 and recs[0]["val_images"] == 16
    cfg = json.loads((teacher / "config.json").read_text())
    assert cfg["mode"] == "hard" and cfg["students"] == ["tiny_resnet"] and cfg["loss"]["alpha"] == 1.0
    # a final-weights file evaluates alone (no config inside: shards and crop size given)
    out = cli("eval", "--checkpoint", teacher / "student0-tiny_resnet.pt", "--shards", shards, "--image-size", "32",
              "--backend", "torch", "--num-workers", "0", "--device", "cpu").output
    assert f"{recs[-1]['s0']['val_top1']:.2f}" in out and "ensemble" not in out


@pytest.mark.slow
def test_dual_students_from_the_online_teacher_then_eval(shards, teacher, tmp_path):
    run = tmp_path / "dual"
    res = cli("train", "--shards", shards, "--out", run, "--students", "tiny_cnn,tiny_mobilenet",
              "--teacher", "tiny_resnet", "--teacher-weights", teacher / "student0-tiny_resnet.pt",
              "--epochs", "3", *COMMON)
    assert res.exit_code == 0, res.output
    recs = read_metrics(run)
    for i in (0, 1):  # the total rises with the peer term as students leave uniform; CE must fall
        assert recs[-1][f"s{i}"]["hard"] < recs[0][f"s{i}"]["hard"]
    # the online teacher's accuracy is measured once and equals what the teacher run itself reported
    assert recs[0]["teacher_val"]["top1"][0] == pytest.approx(read_metrics(teacher)[-1]["s0"]["val_top1"])
    assert 0 < recs[0]["w_mean"] < 1 and recs[0]["teacher_entropy_tau1"] < recs[0]["teacher_entropy_tau"]
    out = cli("eval", "--run", run).output
    last = recs[-1]
    assert f"{last['s0']['val_top1']:.2f}" in out and f"{last['s1']['val_top5']:.2f}" in out
    assert "ensemble (mean p)" in out and f"{last['val_ensemble_top1']:.2f}" in out
    assert "(16 validation images)" in out


def test_interrupted_and_resumed_on_real_shards_matches(shards, tmp_path):
    args = ["--shards", shards, "--mode", "hard", "--students", "tiny_cnn,tiny_mobilenet", "--epochs", "2", *COMMON]
    assert cli("train", "--out", tmp_path / "whole", *args).exit_code == 0
    res = cli("train", "--out", tmp_path / "part", *args, "--stop-after-steps", "5")
    assert "stopped after 5 steps" in res.output
    # a resume with another config is refused, naming the field and both values
    assert "--lr 0.2 (the run has 0.05)" in cli_error("train", "--out", tmp_path / "part", "--resume", "--lr", "0.2")
    # the run directory is enough: a bare --resume continues from RUN/config.json
    assert cli("train", "--out", tmp_path / "part", "--resume").exit_code == 0

    def strip(rs):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
    assert strip(read_metrics(tmp_path / "part")) == strip(read_metrics(tmp_path / "whole"))
    # and a run started from a run's config.json reproduces it exactly
    assert cli("train", "--config", tmp_path / "whole" / "config.json", "--out", tmp_path / "again").exit_code == 0
    assert strip(read_metrics(tmp_path / "again")) == strip(read_metrics(tmp_path / "whole"))


def test_bad_input_gives_clear_errors(shards, teacher, tmp_path):
    base = ["--shards", shards, "--epochs", "1", *COMMON]
    assert "needs a teacher" in cli_error("train", "--out", tmp_path / "a", "--mode", "kd", "--students",
                                          "tiny_cnn", *base)
    torch.manual_seed(0)
    from trainer.engine.models import build_model
    torch.save(build_model("tiny_resnet", 10).state_dict(), tmp_path / "ten.pt")
    out = cli_error("train", "--out", tmp_path / "b", "--mode", "kd", "--students", "tiny_cnn", "--teacher",
                    "tiny_resnet", "--teacher-weights", tmp_path / "ten.pt", *base)
    assert "has 10 outputs; expected 4" in out
    assert "peer term" in cli_error("train", "--out", tmp_path / "c", "--students", "tiny_cnn", *base)
    assert "does not exist" in cli_error("train", "--out", tmp_path / "d", "--shards", tmp_path / "nowhere")
    assert "exactly one of --run and --checkpoint" in cli_error("eval")


@pytest.mark.slow
def test_training_from_a_teacher_cache(shards, teacher, tmp_path):
    from trainer.jobs.cache_teacher import CacheTeacherConfig, cache_teacher

    store = tmp_path / "teacher.zarr"
    cache_teacher(CacheTeacherConfig(shards=str(shards), out=str(store), teacher="tiny_resnet",
                                     teacher_weights=str(teacher / "student0-tiny_resnet.pt"), epochs=1, seed=0,
                                     image_size=32, batch_size=32, backend="torch", num_workers=0, device="cpu",
                                     progress=False))
    args = ["--shards", shards, "--mode", "uw-kd", "--students", "tiny_cnn", "--epochs", "2", *COMMON]
    # a 1-epoch cache for a 2-epoch run would repeat every view: refused, naming both numbers ...
    refused = cli_error("train", "--out", tmp_path / "cached", "--teacher-cache", store, *args)
    assert "holds 1 augmentation epoch(s) but the run trains 2 epochs" in refused and "--reuse-views" in refused
    # ... unless accepted, which config.json records
    res = cli("train", "--out", tmp_path / "cached", "--teacher-cache", store, *args, "--reuse-views")
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert saved["reuse_views"] and saved["runtime"]["cache_epochs"] == 1 and saved["runtime"]["views_per_sample"] == 1
    cached = read_metrics(tmp_path / "cached")
    online = tmp_path / "online"
    assert cli("train", "--out", online, "--teacher", "tiny_resnet", "--teacher-weights",
               teacher / "student0-tiny_resnet.pt", *args).exit_code == 0
    # epoch 0 uses the same views and the same teacher: the cache reproduces the online teacher's numbers
    # (float16 storage of the logits: equal to about 3 decimals)
    assert cached[0]["w_mean"] == pytest.approx(read_metrics(online)[0]["w_mean"], abs=2e-3)
    assert cached[0]["s0"]["loss"] == pytest.approx(read_metrics(online)[0]["s0"]["loss"], rel=2e-2)
    # a cache made for other views (another seed) is refused
    assert "seed" in cli_error("train", "--out", tmp_path / "bad", "--teacher-cache", store, *args, "--seed", "1",
                               "--reuse-views")
