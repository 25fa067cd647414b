"""Training configuration: frozen dataclasses with visible defaults, and the four presets.

The presets are the paper's ablation ladder as one trainer: hard -> kd -> uw-kd -> dual.
Every loss weight can still be overridden; the resolved config is written to RUN/config.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from .losses import DIRECTIONS
from .models import MODELS


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.4  # weight of cross-entropy with the labels
    beta: float = 0.4  # weight of the teacher term (w * tau^2 * KL)
    gamma: float = 0.2  # weight of the peer term (tau^2 * KL to the other students, detached)
    tau: float = 4.0  # temperature of the teacher and peer terms
    uncertainty: bool = True  # weight the teacher term per sample by w = 1 - H(p_T) / log C
    entropy_tau: float = 1.0  # temperature at which H is measured for w (the paper mixes 1 and tau)
    direction: str = "forward"  # "forward": KL(target || student), Hinton; "reverse": the paper's notation


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.1  # peak learning rate for batch 64 (per rank); cosine decay to 0, per step
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs (fractions allowed)
    nesterov: bool = False


@dataclass(frozen=True)
class TrainConfig:
    shards: str = ""  # directory written by `kdpipe shard`
    out: str = "runs/dual"  # run directory: config.json, metrics.jsonl, checkpoints, final weights
    mode: str = "dual"  # preset name: hard | kd | uw-kd | dual
    students: tuple[str, ...] = ("resnet18", "mobilenet_v2")
    teacher: str = "resnet50"  # architecture of the online teacher
    teacher_weights: str | None = None  # local file: kdpipe checkpoint, C-way or 1k-way state dict
    teacher_cache: str | None = None  # Zarr teacher cache; replaces the online teacher
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 50
    batch_size: int = 64  # per rank
    image_size: int = 224  # training crop, pixels
    seed: int = 0  # augmentation, epoch order and model initialisation
    backend: str = "auto"  # loader backend: auto | dali | torch
    num_workers: int | None = None  # loader workers (None: the loader's default)
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (GradScaler per student) | fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile each student
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 20  # steps between progress updates; each one syncs the host with the device

    @property
    def uses_teacher(self) -> bool:
        return self.loss.beta != 0.0


# mode -> (loss weights, default students). Single-student presets train ResNet-18 like the paper.
PRESETS: dict[str, tuple[LossConfig, tuple[str, ...]]] = {
    "hard": (LossConfig(alpha=1.0, beta=0.0, gamma=0.0, uncertainty=False), ("resnet18",)),
    "kd": (LossConfig(alpha=0.3, beta=0.7, gamma=0.0, uncertainty=False), ("resnet18",)),
    "uw-kd": (LossConfig(alpha=0.3, beta=0.7, gamma=0.0, uncertainty=True), ("resnet18",)),
    "dual": (LossConfig(alpha=0.4, beta=0.4, gamma=0.2, uncertainty=True), ("resnet18", "mobilenet_v2")),
}

# Fields a resumed run may change (paths move, logging and compilation do not change the numbers).
RESUME_FREE = ("out", "shards", "teacher_weights", "teacher_cache", "num_workers", "log_every", "compile")


def make_config(mode: str = "dual", students: tuple[str, ...] | None = None, *,
                loss: dict | None = None, optim: dict | None = None, **fields) -> TrainConfig:
    """The preset `mode`, with loss/optimizer overrides (None values ignored) and other fields set."""
    if mode not in PRESETS:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(PRESETS)}")
    preset_loss, preset_students = PRESETS[mode]
    loss_cfg = dataclasses.replace(preset_loss, **{k: v for k, v in (loss or {}).items() if v is not None})
    optim_cfg = OptimConfig(**{k: v for k, v in (optim or {}).items() if v is not None})
    cfg = TrainConfig(mode=mode, students=tuple(students or preset_students), loss=loss_cfg, optim=optim_cfg,
                      **{k: v for k, v in fields.items() if v is not None})
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise ValueError for settings that cannot train (before any data or model is touched)."""
    errors = []
    unknown = [s for s in cfg.students if s not in MODELS]
    if not cfg.students or unknown:
        errors.append(f"students must name models from {', '.join(sorted(MODELS))}; got {list(cfg.students)}")
    if cfg.loss.gamma != 0.0 and len(cfg.students) < 2:
        errors.append(f"the peer term (gamma={cfg.loss.gamma}) needs two or more students")
    if cfg.loss.direction not in DIRECTIONS:
        errors.append(f"loss direction must be one of {DIRECTIONS}")
    if cfg.loss.tau <= 0 or cfg.loss.entropy_tau <= 0:
        errors.append("temperatures must be positive")
    if cfg.amp not in ("auto", "bf16", "fp16", "fp32"):
        errors.append(f"amp must be auto, bf16, fp16 or fp32; got {cfg.amp!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.log_every < 1:
        errors.append("epochs, batch_size and log_every must be at least 1")
    if cfg.optim.lr <= 0 or cfg.optim.warmup_epochs < 0:
        errors.append("lr must be positive and warmup_epochs not negative")
    if cfg.teacher_weights and cfg.teacher_cache:
        errors.append("give either teacher_weights (online teacher) or teacher_cache, not both")
    if errors:
        raise ValueError("invalid training config: " + "; ".join(errors))


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    """Inverse of to_dict (as read back from config.json or a checkpoint)."""
    d = dict(d)
    d["loss"] = LossConfig(**d["loss"])
    d["optim"] = OptimConfig(**d["optim"])
    d["students"] = tuple(d["students"])
    return TrainConfig(**d)


def to_json(cfg: TrainConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"


def resume_mismatches(saved: dict, current: TrainConfig) -> list[str]:
    """Fields (dotted) where a checkpoint's config differs from the current one, ignoring RESUME_FREE."""
    now = to_dict(current)
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in RESUME_FREE:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (no scaler needed), fp32 on CPU (CPU autocast is slower there)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[amp]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at total_steps (evaluated per optimizer step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
