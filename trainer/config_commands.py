"""The options of the commands that run no training job: `synth`, `verify`, `report` and `demo`, as frozen
dataclasses like the others (trainer/config.py), so trainer/options.py generates their click options too.

Importable from trainer.config as well; no torch, no PIL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.reader.backends.registry import backend_choices

from trainer.config_base import opt


@dataclass(frozen=True)
class SynthConfig:
    """`kdpipe synth`: a synthetic ImageNet tree (or the learnable dataset). Sizes are checked by the writers."""

    out: str = opt(help="Directory to write the tree into.", required=True)  # a file there: the writer says so
    classes: str | None = opt(None, "Class list file (default: the ImageNet-100 list).", path="file")
    num_classes: int | None = opt(None, "Use only the first N classes of the list.")
    train_per_class: int = opt(4, "Training images per class.")
    val_per_class: int = opt(2, "Validation images per class.")
    val_layout: Literal["folders", "flat", "none"] = opt("folders", "Validation images in class folders, flat "
                                                         "(with a labels file), or none.")
    size: tuple[int, int] = opt((375, 500), "Image height and width.", metavar="HEIGHT WIDTH")
    oddities: bool = opt(False, "Add CMYK, PNG-as-JPEG and greyscale files.")
    broken: bool = opt(False, "Add truncated, zero-byte and non-image files.")
    seed: int = opt(0, "Seed of the drawn images.")
    learnable: bool = opt(False, "Write the learnable dataset (drawn class families a CNN can learn; try --size 64 "
                                 "64) instead.")
    ambiguous_share: float = opt(0.15, "With --learnable: share of samples made ambiguous (two-class mixes, "
                                       "occlusion, noise).")


@dataclass(frozen=True)
class VerifyConfig:
    """`kdpipe verify`: shards and/or a teacher cache (at least one)."""

    shards: str | None = opt(None, "Shard directory: every checksum, member, id and label; every image decodes.",
                             path="dir")
    cache: str | None = opt(None, "Teacher cache (Zarr store): every written unit against its checksums.",
                            path="any")
    workers: int | None = opt(None, "Processes (default: all cores; at most 4 a core, one per shard).", min=1)


@dataclass(frozen=True)
class ReportConfig:
    """`kdpipe report RUNS... --out DIR`: the runs are the command's arguments."""

    out: str = opt(help="Directory for report.md and the PNG plots.", path="out", required=True)
    runs: tuple[str, ...] = opt((), "training run directories", cli=False)
    teacher: str | None = opt(None, "The teacher's own training run (shown as the teacher row; found automatically "
                                    "when a run's --teacher-weights lie in one of the RUNS).", path="dir")
    low_w: float = opt(0.5, "Samples with teacher weight w below this count as low-confidence.")
    learnable: str | None = opt(None, "The learnable dataset the shards came from (tree or its learnable.json): "
                                      "split the teacher's statistics into clean and ambiguous samples.", path="any")


@dataclass(frozen=True)
class DemoCommandConfig:
    """`kdpipe demo`: which preset (trainer/jobs/demo.py DemoConfig) and what to change in it; None: the preset's."""

    out: str = opt("demo", "Directory for the data, shards, runs, teacher cache and report (rerun to resume).",
                   path="out")
    preset: Literal["cpu", "gpu", "tiny"] | None = opt(
        None, "cpu (default): tiny stand-in models, 32 px, about 2.5 min on 2 cores; gpu: ResNet-50 -> ResNet-18 + "
              "MobileNetV2 at 64 px with a tuned teacher, 3 seeds, sized for <= 10 min on one H200 (docs/demo.md); "
              "tiny: the seconds-long chain check.")
    tiny: bool = opt(False, "Same as --preset tiny (5 classes, 1 epoch): checks the chain.")
    backend: str | None = opt(None, "Loader backend", choices=backend_choices, default_text="the preset's: auto")
    device: str | None = opt(None, "auto | cpu | cuda", default_text="the preset's: auto; cuda for gpu")
    seeds: int | None = opt(None, "Run the ladder with N seeds (data, shards and teacher shared; one teacher cache "
                                  "per seed); the report gives mean ± sd and a verdict per rung.", min=1,
                            default_text="the preset's: 1; 3 for gpu")
