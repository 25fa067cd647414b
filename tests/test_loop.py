"""The training loop on an in-memory loader: every mode learns, resume is exact, NaN stops cleanly."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.core.batch import Batch
from pipeline.core.errors import CheckpointError, ConfigError, NonFiniteLossError
from trainer.engine.checkpoint import BEST, LAST, load_checkpoint
from trainer.config import lr_factor, make_config
from trainer.engine.loop import run_training
from trainer.engine.metrics import TIMING_FIELDS
from trainer.engine.models import build_model
from trainer.engine.rundir import CONFIG, RunDir


def read_metrics(run) -> list[dict]:
    return [r.to_json() for r in RunDir(run).read_metrics()]


class FakeLoader:
    """The ImageNet100Loader interface over class-coloured random images; each batch is a pure function
    of (seed, epoch, step, rank), like the real loader's order and augmentation."""

    def __init__(self, num_samples: int = 64, batch_size: int = 16, num_classes: int = 4, image_size: int = 32,
                 *, seed: int = 0, rank: int = 0, world_size: int = 1, teacher: bool = False,
                 nan_at: tuple[int, int] | None = None):
        self.num_samples, self.batch_size, self.num_classes = num_samples, batch_size, num_classes
        self.image_size, self.seed, self.rank, self.world_size = image_size, seed, rank, world_size
        self.teacher, self.nan_at = teacher, nan_at  # nan_at: (epoch, step) whose teacher logits are NaN
        self.epoch, self.start_step = 0, 0
        g = torch.Generator().manual_seed(1234)
        self.patterns = torch.randn(num_classes, 3, 4, 4, generator=g)
        self.classes = [f"n{i:08d}" for i in range(num_classes)]

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __iter__(self):
        for step in range(self.start_step, len(self)):
            g = torch.Generator().manual_seed(self.seed * 1_000_000 + self.epoch * 1000 + step * 10 + self.rank)
            labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g)
            base = torch.nn.functional.interpolate(self.patterns[labels], size=self.image_size, mode="nearest")
            images = (base + 0.5 * torch.randn(base.shape, generator=g)).contiguous(memory_format=torch.channels_last)
            ids = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
            logits = weight = None
            if self.teacher:
                logits = 3.0 * torch.nn.functional.one_hot(labels, self.num_classes).float()
                logits += torch.randn(logits.shape, generator=g)
                if self.nan_at == (self.epoch, step):
                    logits[0, 0] = float("nan")
                weight = torch.rand(self.batch_size, generator=g)
            yield Batch(images, labels, ids, self.epoch, logits, weight)


def deterministic(records: list[dict]) -> list[dict]:
    """metrics.jsonl lines without wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def tiny_config(tmp_path, mode="dual", students=("tiny_cnn", "tiny_mobilenet"), name="run", **kw):
    fields = dict(out=str(tmp_path / name), teacher="tiny_cnn", epochs=3, batch_size=16, image_size=32,
                  log_every=2, optim={"lr": 0.05, **kw.pop("optim", {})})
    fields.update(kw)
    return make_config(mode, students, **fields)


def train(cfg, *, teacher=None, loader_kw=None, **kw):
    loader_kw = loader_kw or {}
    train_loader, val_loader = FakeLoader(**loader_kw), FakeLoader(num_samples=32, seed=99)
    return run_training(cfg, train_loader, val_loader, classes=train_loader.classes, teacher=teacher,
                        progress=False, **kw)


def seeded_teacher(seed: int = 7) -> torch.nn.Module:
    """A random tiny teacher, the same one every call."""
    torch.manual_seed(seed)
    return build_model("tiny_cnn", 4)


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 0) == pytest.approx(0.0)


@pytest.mark.parametrize("mode,students", [("hard", ("tiny_cnn",)), ("kd", ("tiny_cnn",)),
                                           ("uw-kd", ("tiny_cnn",)), ("dual", ("tiny_cnn", "tiny_mobilenet"))])
def test_each_mode_lowers_its_loss_and_records_the_run(tmp_path, mode, students):
    cfg = tiny_config(tmp_path, mode, students)
    teacher = None if mode == "hard" else seeded_teacher()
    out = train(cfg, teacher=teacher)
    run = tmp_path / "run"
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    for i in range(len(students)):
        assert recs[-1][f"s{i}"]["loss"] < recs[0][f"s{i}"]["loss"], (mode, i, recs)
        assert 0.0 <= recs[-1][f"s{i}"]["val_top1"] <= recs[-1][f"s{i}"]["val_top5"] <= 100.0
    assert recs[-1]["s0"]["hard"] < recs[0]["s0"]["hard"]
    r = recs[0]
    assert r["images"] == 64 and r["lr"] < 0.05 and r["images_per_s"] > 0 and r["peak_mem_mb"] > 0
    if mode == "hard":
        assert r["w_mean"] is None and r["s0"]["teacher"] == 0.0 and out["teacher_val"] is None
    else:
        assert 0.0 < r["teacher_entropy_tau1"] < r["teacher_entropy_tau"] <= torch.log(torch.tensor(4.0)).item()
        assert out["teacher_val"]["count"] == 32 and r["teacher_val"] == out["teacher_val"]
        assert r["w_mean"] == (1.0 if mode == "kd" else pytest.approx(r["s0"]["w"]))
    if mode == "dual":
        assert r["s0"]["peer"] > 0 and r["s1"]["peer"] > 0 and "val_ensemble_top1" in r
    assert json.loads((run / CONFIG).read_text())["mode"] == mode
    assert (run / LAST).is_file() and (run / BEST).is_file()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files
    weights = load_checkpoint(run / f"student0-{students[0]}.pt")
    assert weights["name"] == students[0] and weights["classes"] == FakeLoader().classes


def test_three_students_and_cached_teacher_logits(tmp_path):
    cfg = tiny_config(tmp_path, "dual", ("tiny_cnn", "tiny_mobilenet", "tiny_cnn"), epochs=1)
    train(cfg, loader_kw={"teacher": True})  # teacher logits and weights come with the batches
    r = read_metrics(tmp_path / "run")[0]
    assert all(r[f"s{i}"]["peer"] > 0 for i in range(3))
    assert 0.3 < r["w_mean"] < 0.7  # the cached weights are uniform random, not the entropy of the logits


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    whole = tiny_config(tmp_path, name="whole")
    train(whole, teacher=seeded_teacher())
    part = tiny_config(tmp_path, name="part")
    first = train(part, teacher=seeded_teacher(), stop_after_steps=6)  # mid-epoch 1 (4 steps/epoch)
    assert first["stopped"] and len(read_metrics(tmp_path / "part")) == 1
    assert load_checkpoint(tmp_path / "part" / LAST)["step"] == 2
    train(part, teacher=seeded_teacher(), resume=True)
    assert deterministic(read_metrics(tmp_path / "part")) == deterministic(read_metrics(tmp_path / "whole"))
    a = load_checkpoint(tmp_path / "whole" / "student1-tiny_mobilenet.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "student1-tiny_mobilenet.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_config_and_a_fresh_run_refuses_an_old_one(tmp_path):
    cfg = tiny_config(tmp_path, "hard", ("tiny_cnn",), epochs=1)
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)
    other = tiny_config(tmp_path, "hard", ("tiny_cnn",), epochs=1, optim={"lr": 0.2})
    with pytest.raises(ValueError, match=r"optim.lr: 0.05 -> 0.2"):
        train(other, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_config(tmp_path, "hard", ("tiny_cnn",), name="empty"), resume=True)


def test_nan_loss_names_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "uw-kd", ("tiny_cnn",), epochs=3, log_every=100)
    with pytest.raises(NonFiniteLossError, match=r"step 6 \(epoch 1, step 2.*student 0 \(tiny_cnn\) term 'teacher'"):
        train(cfg, loader_kw={"teacher": True, "nan_at": (1, 2)})
    kept = load_checkpoint(tmp_path / "run" / LAST)
    assert kept["epoch"] == 1 and kept["step"] == 0  # the end of epoch 0, written before the NaN
    assert all(torch.isfinite(v).all() for v in kept["students"][0]["model"].values() if v.is_floating_point())


def test_a_teacher_mode_without_teacher_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        train(tiny_config(tmp_path, "kd", ("tiny_cnn",), epochs=1))


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    cfg = tiny_config(tmp_path, "dual", epochs=1, amp="bf16")
    train(cfg, teacher=seeded_teacher())
    r = read_metrics(tmp_path / "run")[0]
    assert all(torch.isfinite(torch.tensor(r[f"s{i}"]["loss"])) for i in range(2))


def test_train_benchmark_runs_and_reports_its_ratios(capsys):
    from tools import bench_train as bench

    out = bench.main(["--students", "tiny_cnn,tiny_mobilenet", "--teacher", "tiny_cnn", "--image-size", "32",
                      "--batch-size", "8", "--num-classes", "10", "--steps", "1", "--warmup", "1", "--repeats", "2",
                      "--device", "cpu"])
    assert out["trainer_over_plain"] > 0 and out["cached_over_online"] > 0
    assert set(out["runs"]) == {"trainer", "plain", "cached", "online"}
    printed = capsys.readouterr().out
    assert "ratio trainer/plain" in printed and "machine: CPU" in printed and "cores" in printed


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_amp_modes_train(tmp_path, amp):
    cfg = tiny_config(tmp_path, "dual", epochs=2, amp=amp, device="cuda")
    train(cfg, teacher=seeded_teacher())
    recs = read_metrics(tmp_path / "run")
    assert recs[-1]["s0"]["hard"] < recs[0]["s0"]["hard"]
    assert recs[0]["peak_mem_kind"] == "cuda_max_allocated"
    state = load_checkpoint(tmp_path / "run" / LAST)["students"][0]
    assert (state["scaler"] is not None) == (amp == "fp16")  # one GradScaler per student in fp16 only


def test_presets_overrides_validation_and_json_round_trip():
    from trainer.config import config_diff as resume_mismatches, from_dict, to_dict

    dual = make_config("dual")
    assert dual.students == ("resnet18", "mobilenet_v2") and (dual.loss.alpha, dual.loss.beta, dual.loss.gamma) == (
        0.4, 0.4, 0.2) and dual.loss.weight_fn == "confidence" and dual.loss.tau == 4.0 and dual.batch_size == 64
    kd, uw = make_config("kd"), make_config("uw-kd")
    assert (kd.loss.alpha, kd.loss.beta, kd.loss.weight_fn, kd.students) == (0.3, 0.7, "none", ("resnet18",))
    assert uw.loss.weight_fn == "confidence" and not make_config("hard").uses_teacher
    assert make_config("kd", loss={"tau": 2.0, "direction": "reverse", "alpha": None}).loss.alpha == 0.3
    assert from_dict(json.loads(json.dumps(to_dict(dual)))) == dual
    assert resume_mismatches(to_dict(dual), make_config("dual", out="elsewhere", log_every=5)) == []
    assert resume_mismatches(to_dict(dual), make_config("dual", epochs=10)) == ["epochs: 50 -> 10"]
    for bad, match in [(dict(mode="nope"), "not a preset"), (dict(students=("vgg",)), "students"),
                       (dict(mode="kd", students=("resnet18",), loss={"gamma": 0.1}), "two or more"),
                       (dict(amp="fp8"), "amp"), (dict(log_every=0), "log_every"),
                       (dict(teacher_weights="a.pt", teacher_cache="c.zarr"), "either")]:
        with pytest.raises(ConfigError, match=match):
            make_config(**bad)


def test_step_honours_kl_direction_and_uses_a_cached_weight_only_at_entropy_tau_1():
    from trainer.engine.step import Distiller

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y, tl = torch.randint(0, 4, (8,), generator=g), 3 * torch.randn(8, 4, generator=g)
    half = torch.full((8,), 0.5)

    def first_step(**loss):
        cfg = make_config("uw-kd", ("tiny_cnn",), loss=loss)
        torch.manual_seed(0)
        d = Distiller(cfg, [build_model("tiny_cnn", 4)], teacher=None, device=torch.device("cpu"), steps_per_epoch=4)
        return d.summarize(d.step(x, y, tl, half))["students"][0]

    fwd, rev = first_step(), first_step(direction="reverse")
    assert fwd["teacher"] != pytest.approx(rev["teacher"]) and fwd["hard"] == rev["hard"]
    assert fwd["w"] == pytest.approx(0.5)  # the cache's weight (made at tau = 1)
    assert first_step(entropy_tau=4.0)["w"] != pytest.approx(0.5)  # recomputed from the logits at tau = 4
