"""`kdpipe demo --preset gpu` without a GPU: the preset's shape, its teacher recipe (zero-init residual
BatchNorm, label smoothing for the teacher only, warm-up, its own batch and a longer schedule), and a scaled-down
run of the same code path on the CPU (tiny sizes and models, three seeds, all four rungs, the report)."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner

from trainer.cli import main
from trainer.jobs.demo import (GPU, LADDER, PRESETS, TINY, DemoConfig, _run_config, ladder_run, run_demo,
                          uses_recipe_loop)
from trainer.engine.losses import dual_student_loss
from trainer.engine.metrics import TIMING_FIELDS
from trainer.engine.models import build_model
from trainer.jobs.teacher_recipe import residual_gammas, teacher_loss, train_teacher, zero_init_residual_

# The gpu preset at a few seconds' size: the same stages, recipe loop and report; tiny models on the CPU.
SCALED = dataclasses.replace(GPU, num_classes=4, train_per_class=16, val_per_class=4, image_px=32, crop_px=24,
                             teacher="tiny_resnet", students=("tiny_cnn", "tiny_mobilenet"), teacher_epochs=2,
                             teacher_batch_size=16, teacher_warmup_epochs=0.5, epochs=1, cache_epochs=1,
                             batch_size=16, shard_size=32, device="cpu", threads=1)


def test_gpu_preset_is_the_papers_models_with_a_teacher_recipe():
    assert PRESETS == {"cpu": DemoConfig(), "gpu": GPU, "tiny": TINY}
    assert GPU.seeds == 3 and GPU.teacher == "resnet50" and GPU.students == ("resnet18", "mobilenet_v2")
    assert GPU.batch_size == 64 and GPU.crop_px == 64 and GPU.train_per_class > DemoConfig().train_per_class
    assert GPU.teacher_epochs >= 3 * GPU.epochs and GPU.cache_epochs == GPU.epochs
    assert GPU.teacher_warmup_epochs > 0 and GPU.teacher_label_smoothing == 0.1 and GPU.teacher_zero_init_residual
    assert uses_recipe_loop(GPU) and uses_recipe_loop(SCALED)
    # the CPU demo and --tiny keep today's teacher: the hard-label trainer, the students' lr and batch
    for cfg in (DemoConfig(), TINY):
        assert not uses_recipe_loop(cfg) and cfg.teacher_lr is None and cfg.teacher_batch_size is None
        assert cfg.teacher_warmup_epochs == 0.0


def test_the_recipe_changes_only_the_teachers_config(tmp_path):
    """The students' runs are the same with or without the teacher recipe; the CPU teacher's config is today's."""
    plain = dataclasses.replace(GPU, teacher_lr=None, teacher_batch_size=None, teacher_warmup_epochs=0.0,
                                teacher_label_smoothing=0.0, teacher_zero_init_residual=False)
    for mode in LADDER:
        args = (tmp_path / mode, mode, GPU.students, GPU.epochs)
        assert _run_config(*args, GPU, tmp_path, tmp_path / "c.zarr", 0) == \
            _run_config(*args, plain, tmp_path, tmp_path / "c.zarr", 0)
    cpu = DemoConfig()
    teacher = _run_config(tmp_path, "hard", (cpu.teacher,), cpu.teacher_epochs, cpu, tmp_path, None, 0,
                          lr=cpu.teacher_lr, batch_size=cpu.teacher_batch_size, warmup_epochs=cpu.teacher_warmup_epochs)
    assert teacher.optim == dataclasses.replace(teacher.optim, lr=0.1, warmup_epochs=0.0) and teacher.batch_size == 64
    gpu = _run_config(tmp_path, "hard", (GPU.teacher,), GPU.teacher_epochs, GPU, tmp_path, None, 0,
                      lr=GPU.teacher_lr, batch_size=GPU.teacher_batch_size, warmup_epochs=GPU.teacher_warmup_epochs)
    assert (gpu.optim.warmup_epochs, gpu.batch_size, gpu.epochs) == (2.0, 128, 20)


@pytest.mark.parametrize("name,block_bn,count", [("resnet50", "bn3", 16), ("resnet18", "bn2", 8)])
def test_zero_init_residual_is_torchvisions(name, block_bn, count):
    torch.manual_seed(0)
    ours = zero_init_residual_(build_model(name, 10), name)
    gammas = residual_gammas(ours)
    assert len(gammas) == count and all(not bn.weight.detach().any() for bn in gammas)
    others = [m for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d) and m not in gammas]
    assert others and all(bool((m.weight.detach() == 1).all()) for m in others)
    assert all(n.endswith(block_bn) for n, m in ours.named_modules() if m in gammas)
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(weights=None, num_classes=10, zero_init_residual=True)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_init_residual_on_the_tiny_resnet_and_refused_without_blocks():
    model = zero_init_residual_(build_model("tiny_resnet", 4), "tiny_resnet")
    assert len(residual_gammas(model)) == 2 and all(not bn.weight.detach().any() for bn in residual_gammas(model))
    with pytest.raises(ValueError, match="tiny_cnn has no residual blocks"):
        zero_init_residual_(build_model("tiny_cnn", 4), "tiny_cnn")


def test_label_smoothing_changes_the_teachers_loss_not_the_students():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(8, 5, generator=g) * 3, torch.randint(0, 5, (8,), generator=g)
    plain, smooth = teacher_loss(z, y, 0.0), teacher_loss(z, y, 0.1)
    assert torch.allclose(plain, F.cross_entropy(z, y)) and not torch.allclose(plain, smooth)
    logp = z.log_softmax(-1)
    expected = -(0.9 * logp.gather(1, y[:, None]).squeeze(1) + 0.1 * logp.mean(-1)).mean()
    assert torch.allclose(smooth, expected, atol=1e-6)
    # the students' objective has no smoothing to switch on: its CE part is the plain cross-entropy
    assert "smoothing" not in str(inspect.signature(dual_student_loss))
    hard = dual_student_loss(z, None, None, y, alpha=1.0, beta=0.0, gamma=0.0, tau=4.0)["hard"]
    assert torch.allclose(hard, plain)


def test_cli_presets(monkeypatch, tmp_path):
    """--preset picks the DemoConfig; --tiny still works; --seeds/--device/--backend override the preset."""
    import trainer.jobs.demo

    seen = []
    monkeypatch.setattr(trainer.jobs.demo, "run_demo", lambda out, cfg: seen.append(cfg) or tmp_path / "report.md")
    runner = CliRunner()
    for args in ([], ["--tiny"], ["--preset", "tiny"], ["--preset", "gpu"], ["--preset", "gpu", "--seeds", "5",
                                                                             "--device", "cpu"]):
        result = runner.invoke(main, ["demo", "--out", str(tmp_path / "d"), *args])
        assert result.exit_code == 0, result.output
    assert seen == [DemoConfig(), TINY, TINY, GPU, dataclasses.replace(GPU, seeds=5, device="cpu")]
    result = runner.invoke(main, ["demo", "--tiny", "--preset", "gpu", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--tiny is --preset tiny" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_preset_without_a_gpu_is_refused_before_any_data(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--preset", "gpu", "--out", str(tmp_path / "d")])
    # a ConfigError: exit 2 like every command's wrong option (the demo no longer turns it into a plain exit 1)
    assert result.exit_code == 2 and "--device cuda asked for, but CUDA is not available here" in result.output
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_gpu") / "demo"
    report = run_demo(out, SCALED)
    return out, report.read_text()


@pytest.mark.slow
def test_scaled_gpu_preset_end_to_end(scaled):
    out, text = scaled
    runs = out / "runs"
    # three seeds x four rungs, each with a finished run, and the report's ladder pools them with verdicts
    for seed in (0, 1, 2):
        for mode in LADDER:
            cfg = json.loads((ladder_run(runs, mode, seed) / "config.json").read_text())
            assert (cfg["seed"], cfg["mode"], cfg["batch_size"]) == (seed, mode, SCALED.batch_size)
    ladder = text[text.index("## Table III"):text.index("## Convergence")]
    changes = [line for line in ladder.splitlines() if " -> " in line and line.startswith("| tiny_")]
    assert len(changes) == 6 and all(line.endswith(" | 3 |") for line in changes)
    assert all(any(f"| {v} |" in line for v in ("better", "worse", "within noise")) for line in changes)
    assert "| hard labels | +KD | +uncertainty weight | +peer (dual) |" in ladder
    # the teacher came from the recipe's loop, with its warm-up, batch and the two extras recorded
    teacher = json.loads((runs / "teacher" / "config.json").read_text())
    assert teacher["runtime"]["teacher_recipe"] == {"label_smoothing": 0.1, "zero_init_residual": True}
    assert (teacher["optim"]["warmup_epochs"], teacher["batch_size"], teacher["epochs"]) == (0.5, 16, 2)
    assert "teacher: `runtime.teacher_recipe.label_smoothing` = 0.1 (default 0.0)" in text
    assert "teacher: `runtime.teacher_recipe.zero_init_residual` = true (default false)" in text
    final = json.loads((runs / "teacher" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"Teacher tiny_resnet (stands in for ResNet-50) (run teacher): top-1 {final['s0']['val_top1']:.2f}" in text
    margin = json.loads((out / "timings.json").read_text())["teacher_margin"]
    assert margin["teacher_top1"] == final["s0"]["val_top1"] and set(margin["hard_top1"]) == set(SCALED.students)
    assert math.isclose(margin["margin"], margin["teacher_top1"] - max(margin["hard_top1"].values()))


@pytest.mark.slow
def test_recipe_teacher_resumes_exactly(scaled, tmp_path):
    """A teacher cut off after an epoch continues from checkpoint-last.pt to the same numbers."""
    out, _ = scaled
    cfg = json.loads((out / "runs" / "teacher" / "config.json").read_text())
    from trainer.config import from_dict

    base = from_dict({k: v for k, v in cfg.items() if k != "runtime"})
    recipe = {"label_smoothing": 0.1, "zero_init_residual": True, "progress": False}
    whole = dataclasses.replace(base, out=str(tmp_path / "whole"), num_workers=1)
    assert not train_teacher(whole, **recipe)["stopped"]
    cut = dataclasses.replace(whole, out=str(tmp_path / "cut"))
    assert train_teacher(cut, **recipe, stop_after_epochs=1)["stopped"]
    assert not (tmp_path / "cut" / "student0-tiny_resnet.pt").exists()
    assert train_teacher(cut, **recipe)["epochs"] == 2

    def numbers(run) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert numbers(tmp_path / "cut") == numbers(tmp_path / "whole") and len(numbers(tmp_path / "cut")) == 2
    with pytest.raises(ValueError, match="was trained with the teacher recipe"):
        shutil.copytree(tmp_path / "cut", tmp_path / "other")
        train_teacher(dataclasses.replace(cut, out=str(tmp_path / "other")), label_smoothing=0.2,
                      zero_init_residual=True, progress=False)


@pytest.mark.slow
def test_gpu_preset_with_the_papers_models_runs_on_the_cpu(tmp_path):
    """The preset's own models (ResNet-50 teacher through the recipe loop, ResNet-18 + MobileNetV2 through all
    four rungs) at a few images and 32 px, so nothing architecture-specific waits for a GPU to surface."""
    cfg = dataclasses.replace(GPU, num_classes=4, train_per_class=8, val_per_class=2, image_px=40, crop_px=32,
                              teacher_epochs=1, teacher_batch_size=8, teacher_warmup_epochs=0.5, epochs=1,
                              cache_epochs=1, batch_size=8, shard_size=16, device="cpu", threads=2, seeds=1)
    text = run_demo(tmp_path / "demo", cfg).read_text()
    runs = tmp_path / "demo" / "runs"
    teacher = json.loads((runs / "teacher" / "config.json").read_text())
    assert teacher["students"] == ["resnet50"] and teacher["runtime"]["teacher_recipe"]["zero_init_residual"]
    for mode in LADDER:
        metrics = json.loads((ladder_run(runs, mode, 0) / "metrics.jsonl").read_text().splitlines()[-1])
        assert [metrics[k]["name"] for k in ("s0", "s1")] == ["resnet18", "mobilenet_v2"]
        assert all(math.isfinite(metrics[k]["loss"]) for k in ("s0", "s1"))
    assert "| resnet50 | teacher | — | 23.516 |" in text and "| mobilenet_v2 | student | — | 2.229 |" in text
