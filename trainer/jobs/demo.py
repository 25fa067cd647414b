"""`kdpipe demo`: the whole system end to end on the built-in learnable dataset; presets for a 2-core CPU
(the default), one GPU (`--preset gpu`: the paper's models) and a seconds-long check (`--preset tiny`).

generate -> shard -> train a teacher (--mode hard) -> per seed: cache-teacher and the ablation ladder
(hard, kd, uw-kd, dual; same epochs and data) -> report. Each stage calls the real job's Python API.
Resumable: a stage that finished is skipped, a training run that was cut off resumes from its last
checkpoint, the shard writer and the teacher cache finish what is missing.

Seeds (`seeds` = N runs the ladder with seeds seed, seed+1, ..., seed+N-1): the dataset, the shards and the
teacher are the fixed setup, made once with the base seed. A training seed decides the students'
initialisation, the epoch order and the augmented views; a teacher cache holds the logits of one seed's views,
so each seed gets its own cache (of the one teacher). The runs of one seed share initialisation, order and
views across the four rungs, which is what makes the report's per-seed paired comparison meaningful.

The CPU demo uses small images and the registry's tiny CPU models (a `tiny_resnet` teacher, `tiny_cnn`
and `tiny_mobilenet` students standing in for ResNet-50 -> ResNet-18 + MobileNetV2), so its numbers
show the pipeline working, not the paper's accuracies. Single-student modes train both students in
one run: without the peer term (gamma = 0) they are independent, so this is the same as two runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.atomic import atomic_write_json
from pipeline.core.log import get_logger

from trainer.engine.rundir import RunDir

logger = get_logger(__name__)

LADDER = ("hard", "kd", "uw-kd", "dual")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. Defaults: 100 classes x 100 train images, 40 px stored, 32 px crops (units noted)."""

    num_classes: int = 100  # the first N classes of the ImageNet-100 list
    train_per_class: int = 100  # images per class
    val_per_class: int = 40  # 4000 val images: the standard error of a top-1 near 65 % is about 0.75 points
    image_px: int = 40  # stored image side, pixels
    crop_px: int = 32  # training crop and validation view side, pixels
    ambiguous_share: float = 0.15  # share of samples made ambiguous (mixes, occlusion, noise)
    teacher: str = "tiny_resnet"
    teacher_epochs: int = 10  # a longer schedule than the students' is part of the teacher recipe
    # The teacher recipe (trainer/jobs/teacher_recipe.py; each choice in the assumptions table). The defaults are
    # the CPU demo's: the teacher trains like a hard-label student (the students' lr and batch, no warm-up).
    teacher_lr: float | None = None  # peak lr of the teacher (None: lr)
    teacher_batch_size: int | None = None  # the teacher's batch (None: batch_size)
    teacher_warmup_epochs: float = 0.0  # linear warm-up of the teacher's lr, epochs
    teacher_label_smoothing: float = 0.0  # the teacher's cross-entropy only; the students' losses never smooth
    teacher_zero_init_residual: bool = False  # zero gamma of the last BatchNorm in each residual block
    students: tuple[str, ...] = ("tiny_cnn", "tiny_mobilenet")
    epochs: int = 8  # every ladder run
    cache_epochs: int = 8  # augmentation epochs in the teacher cache (training epoch e uses e mod E)
    batch_size: int = 64  # the paper's batch
    lr: float = 0.1  # the paper's peak learning rate (cosine to 0)
    shard_size: int = 1000  # samples per shard
    seed: int = 0  # dataset, shuffle and teacher; the first ladder seed (augmentation, order, initialisation)
    seeds: int = 1  # ladder repeats with seeds seed .. seed + seeds - 1 (the report's mean ± sd and verdicts)
    backend: str = "auto"  # loader backend: auto | dali | torch
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = 1  # torch intra-op threads in this process (None: torch's default). The tiny models
    # gain little from a second thread, the loader's workers need the cores, and on a busy machine two
    # spinning OpenMP threads ran the tiny models up to 10x slower than one.


TINY = DemoConfig(num_classes=5, train_per_class=16, val_per_class=4, image_px=32, crop_px=24, teacher="tiny_cnn",
                  teacher_epochs=1, epochs=1, cache_epochs=1, batch_size=16, shard_size=32)

# The paper's models on one GPU (an H200: docs/demo.md gives the time estimate and its arithmetic; the measured
# ladder waits for a GPU session). 16,000 training images of 64 px crops, 5 student epochs per rung, 3 seeds.
# The teacher recipe is what makes ResNet-50 a teacher worth distilling: 4x the students' epochs, batch 128
# at lr 0.1 (0.05 at batch 64 by linear scaling) after a 2-epoch warm-up, zero-init residual BatchNorm and
# label smoothing 0.1. Sized on the measured 1,350 img/s of today's dual step it would take about 18 minutes;
# it fits 10 only with the CUDA-graph step and overlapped data (~3,500 img/s).
GPU = DemoConfig(num_classes=100, train_per_class=160, val_per_class=40, image_px=80, crop_px=64,
                 teacher="resnet50", teacher_epochs=20, teacher_lr=0.1, teacher_batch_size=128,
                 teacher_warmup_epochs=2.0, teacher_label_smoothing=0.1, teacher_zero_init_residual=True,
                 students=("resnet18", "mobilenet_v2"), epochs=5, cache_epochs=5, batch_size=64, lr=0.1,
                 shard_size=500, seeds=3, device="cuda", threads=None)

PRESETS = {"cpu": DemoConfig(), "gpu": GPU, "tiny": TINY}  # `kdpipe demo --preset NAME`


def uses_recipe_loop(cfg: DemoConfig) -> bool:
    """Label smoothing and zero-init need the teacher's own loop (trainer/jobs/teacher_recipe.py); without them the
    teacher trains through `kdpipe train --mode hard`, as the CPU demo always has."""
    return cfg.teacher_label_smoothing != 0.0 or cfg.teacher_zero_init_residual


def _say(msg: str) -> None:
    logger.info(f"[demo] {msg}")


# Settings that may change between invocations on one directory: more or fewer seeds reuse the shared stages.
FREE = ("seeds",)
DEMO_MARKER = ".kdpipe-demo"  # pipeline/core/outdir.py: the demo writes only into a directory it made
WHAT = "a demo"
# What a demo writes directly under its --out; a directory an older kdpipe demo made (before the marker) holds
# only these, next to a demo.json of its settings.
DEMO_ENTRIES = ("demo.json", "imagenet", "shards", "runs", "report", "timings.json", ".kdpipe.lock")
LEGACY_KEYS = ("num_classes", "students", "teacher", "epochs")  # in every demo.json an older version wrote


def legacy_demo_dir(path: Path) -> bool:
    """True for an unmarked directory an older `kdpipe demo` made: a demo.json with the demo's settings and
    nothing but the demo's own entries (a user's demo.json or any other file makes it not the demo's)."""
    try:
        record = json.loads((path / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or not all(k in record for k in LEGACY_KEYS):
        return False
    return all(e.name in DEMO_ENTRIES or re.fullmatch(r"teacher-s\d+\.zarr", e.name) for e in os.scandir(path))


def _check_or_record(out: Path, cfg: DemoConfig) -> None:
    """Claim --out for the demo (a new or empty directory, or the demo's own: pipeline.core.outdir, so a user's
    files are never replaced) and refuse to continue a demo made with other settings (its stages would not fit
    together)."""
    from pipeline.core.errors import ConfigError, OutputExistsError
    from pipeline.core.outdir import check_claimable, claim_dir

    if cfg.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {cfg.seeds}")
    path = out / "demo.json"
    now = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in FREE}
    if check_claimable(out, DEMO_MARKER, WHAT, legacy=legacy_demo_dir) and path.is_file():
        # a setting the file lacks (written before it existed) had its default then
        old = {**json.loads(json.dumps(dataclasses.asdict(DemoConfig()))), **json.loads(path.read_text())}
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in now.items() if old.get(k) != v]
        if diff:
            raise OutputExistsError(f"{out} holds a demo made with other settings ({'; '.join(diff)}); "
                                    "use another --out or delete it")
    claim_dir(out, DEMO_MARKER, WHAT, legacy=legacy_demo_dir)
    if not path.is_file():
        atomic_write_json(path, now)


def seed_list(cfg: DemoConfig) -> list[int]:
    """The ladder's seeds: seed, seed + 1, ..., seed + seeds - 1."""
    return [cfg.seed + k for k in range(cfg.seeds)]


def ladder_run(runs: Path, mode: str, seed: int) -> Path:
    """A ladder run's directory, e.g. runs/kd-s0."""
    return runs / f"{mode}-s{seed}"


def _finished(run: Path, epochs: int, students: tuple[str, ...]) -> bool:
    """A run is finished when it logged every epoch and wrote every final weight file."""
    metrics = RunDir(run).metrics_path
    if not metrics.is_file():
        return False
    done = {json.loads(line)["epoch"] for line in metrics.read_text().splitlines() if line.strip()}
    return done >= set(range(epochs)) and all(RunDir(run).final_weights(i, s).is_file()
                                              for i, s in enumerate(students))


def _run_config(run: Path, mode: str, students: tuple[str, ...], epochs: int, cfg: DemoConfig, shards: Path,
                cache: Path | None, seed: int, *, lr: float | None = None, batch_size: int | None = None,
                warmup_epochs: float | None = None):
    """The TrainConfig of one demo run (a ladder rung, or the teacher with its lr, batch and warm-up)."""
    from trainer.config import make_config

    return make_config(mode, students, optim={"lr": lr or cfg.lr, "warmup_epochs": warmup_epochs},
                       shards=str(shards), out=str(run), epochs=epochs, batch_size=batch_size or cfg.batch_size,
                       image_size=cfg.crop_px, seed=seed, backend=cfg.backend, device=cfg.device,
                       teacher=cfg.teacher, teacher_cache=str(cache) if cache is not None and mode != "hard" else None)


def _train(run: Path, mode: str, students: tuple[str, ...], epochs: int, cfg: DemoConfig, shards: Path,
           cache: Path | None, seed: int) -> None:
    from trainer.jobs.train import train

    if _finished(run, epochs, students):
        _say(f"{run.name}: finished earlier, skipped")
        return
    tcfg = _run_config(run, mode, students, epochs, cfg, shards, cache, seed)
    resume = RunDir(run).last.is_file()
    _say(f"{run.name}: {'resuming' if resume else 'training'} mode {mode}, students {', '.join(students)}, "
         f"seed {seed}, {epochs} epoch(s)")
    train(tcfg, resume=resume)


def _teach(run: Path, cfg: DemoConfig, shards: Path) -> None:
    """The teacher: `kdpipe train --mode hard` with the teacher's lr, batch and warm-up, or, with label
    smoothing or zero-init residual, the recipe's own loop (trainer/jobs/teacher_recipe.py). Both resume."""
    from trainer.jobs.train import train

    if _finished(run, cfg.teacher_epochs, (cfg.teacher,)):
        _say(f"{run.name}: finished earlier, skipped")
        return
    tcfg = _run_config(run, "hard", (cfg.teacher,), cfg.teacher_epochs, cfg, shards, None, cfg.seed,
                       lr=cfg.teacher_lr, batch_size=cfg.teacher_batch_size, warmup_epochs=cfg.teacher_warmup_epochs)
    resume = RunDir(run).last.is_file()
    _say(f"{run.name}: {'resuming' if resume else 'training'} {cfg.teacher}, {cfg.teacher_epochs} epoch(s), batch "
         f"{tcfg.batch_size}, lr {tcfg.optim.lr}, warm-up {tcfg.optim.warmup_epochs} epoch(s), label smoothing "
         f"{cfg.teacher_label_smoothing}, zero-init residual {'on' if cfg.teacher_zero_init_residual else 'off'}")
    if uses_recipe_loop(cfg):
        from trainer.jobs.teacher_recipe import train_teacher

        train_teacher(tcfg, label_smoothing=cfg.teacher_label_smoothing,
                      zero_init_residual=cfg.teacher_zero_init_residual)
    else:
        train(tcfg, resume=resume)


def run_demo(out: str | Path = "demo", cfg: DemoConfig = DemoConfig()) -> Path:
    """Run (or finish) every stage under `out`; returns the path of report.md. Prints progress and timings."""
    import torch

    from trainer.engine.runtime import resolve_device

    out = Path(out)
    resolve_device(cfg.device)  # `--preset gpu` without a GPU: one line, before any data is drawn
    _check_or_record(out, cfg)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_stages(out, cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run_stages(out: Path, cfg: DemoConfig) -> Path:
    from pipeline.core.classes import imagenet100_wnids
    from pipeline.sources.learnable import DESCRIPTION_FILE, make_learnable_tree
    from pipeline.shards.writer import ShardOptions, build_shards

    from trainer.jobs.cache_teacher import CacheTeacherConfig, cache_teacher
    from trainer.report.build import write_report

    wnids = imagenet100_wnids()[: cfg.num_classes]
    data, shards, runs = out / "imagenet", out / "shards", out / "runs"
    timings: list[tuple[str, float]] = []
    t_all = time.perf_counter()

    def stage(name: str, fn) -> None:
        _say(f"stage {len(timings) + 1}: {name}")
        t0 = time.perf_counter()
        fn()
        timings.append((name, time.perf_counter() - t0))
        _say(f"stage {len(timings)}: {name} took {timings[-1][1]:.1f} s (total {time.perf_counter() - t_all:.1f} s)")

    def generate() -> None:
        if (data / DESCRIPTION_FILE).is_file():
            _say(f"{data}: generated earlier, skipped")
            return
        tree = make_learnable_tree(data, wnids, train_per_class=cfg.train_per_class, val_per_class=cfg.val_per_class,
                                   size=cfg.image_px, ambiguous_share=cfg.ambiguous_share, seed=cfg.seed,
                                   progress=True)
        _say(f"{tree.count('train')} train + {tree.count('val')} val images, {len(tree.ambiguous)} ambiguous")

    def shard() -> None:
        build_shards(data, shards, classes=wnids, options=ShardOptions(shard_size=cfg.shard_size, seed=cfg.seed))

    teacher_run = runs / "teacher"
    teacher_weights = RunDir(teacher_run).final_weights(0, cfg.teacher)

    def teach() -> None:
        _teach(teacher_run, cfg, shards)

    def cache_stage(seed: int) -> None:
        cache_teacher(CacheTeacherConfig(shards=str(shards), out=str(cache_path(out, seed)),
                                         teacher_weights=str(teacher_weights), teacher=cfg.teacher,
                                         epochs=cfg.cache_epochs, seed=seed, image_size=cfg.crop_px, batch_size=256,
                                         backend=cfg.backend, device=cfg.device))

    stage("generate the learnable dataset", generate)
    stage("shard", shard)
    recipe = ", the teacher recipe" if uses_recipe_loop(cfg) else ""
    stage(f"train the teacher ({cfg.teacher}, hard labels{recipe})", teach)
    for seed in seed_list(cfg):
        stage(f"seed {seed}: cache the teacher's logits", lambda seed=seed: cache_stage(seed))
        for mode in LADDER:
            stage(f"seed {seed}: ladder {mode}", lambda mode=mode, seed=seed: _train(
                ladder_run(runs, mode, seed), mode, cfg.students, cfg.epochs, cfg, shards, cache_path(out, seed),
                seed))
    report_path: list[Path] = []
    ladder = [ladder_run(runs, m, s) for s in seed_list(cfg) for m in LADDER]
    stage("report", lambda: report_path.append(write_report(
        [teacher_run] + ladder, out / "report", teacher=teacher_run, learnable=data,
        appendix=_timings_section(timings, t_all))))
    total = time.perf_counter() - t_all
    margin = teacher_margin(teacher_run, [ladder_run(runs, "hard", s) for s in seed_list(cfg)])
    atomic_write_json(out / "timings.json", {"stages": dict(timings), "total_s": total, "teacher_margin": margin})
    text = report_path[0].read_text()
    logger.info(text[text.index("## Table I"):text.index("## Table II")].rstrip())
    _say(f"teacher top-1 {margin['teacher_top1']:.2f} %, best hard-label student {margin['best_hard']} "
         f"{margin['best_hard_top1']:.2f} % (mean over seeds): margin {margin['margin']:+.2f} points "
         f"(a teacher worth distilling leads by >= {MIN_TEACHER_MARGIN:g})")
    _say(f"finished in {total:.1f} s; report with all tables and plots: {report_path[0]}")
    return report_path[0]


MIN_TEACHER_MARGIN = 5.0  # points of top-1 the GPU preset's teacher must lead the best hard student by


def teacher_margin(teacher_run: Path, hard_runs: list[Path]) -> dict:
    """The teacher's final top-1 against each hard-label student's (mean over the seeds' hard runs): a teacher
    weaker than its students cannot show distillation helping, so the demo says the margin."""
    from trainer.engine.metrics import read_metrics_file

    def final(run: Path):
        return read_metrics_file(RunDir(run).metrics_path.read_text(), str(RunDir(run).metrics_path))[-1]

    teacher = final(teacher_run).students[0].val_top1
    per: dict[str, list[float]] = {}
    for run in hard_runs:
        for s in final(run).students:
            per.setdefault(s.name, []).append(s.val_top1)
    hard = {name: sum(v) / len(v) for name, v in per.items()}
    best = max(hard, key=hard.get)
    return {"teacher_top1": teacher, "hard_top1": hard, "best_hard": best, "best_hard_top1": hard[best],
            "margin": teacher - hard[best]}


def cache_path(out: Path, seed: int) -> Path:
    """The teacher cache of one seed's views, e.g. teacher-s0.zarr."""
    return out / f"teacher-s{seed}.zarr"


def _timings_section(timings: list[tuple[str, float]], t_all: float) -> list[str]:
    """The demo's own stage timings, measured by this process (stages skipped on a resume show their skip time)."""
    rows = [f"| {name} | {sec:.1f} |" for name, sec in timings]
    return ["## Demo stages (wall-clock seconds, this invocation)", "", "| stage | seconds |", "|---|---|", *rows,
            f"| total before the report | {time.perf_counter() - t_all:.1f} |", ""]

