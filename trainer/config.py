"""Configuration of every command: frozen dataclasses with visible defaults, the single source of the CLI.

Each field carries its help text (with units) in its metadata (`opt`, trainer/config_fields.py); trainer/options.py
turns the fields into the click options of every command (`synth`, `verify`, `report` and `demo` have theirs in
trainer/config_commands.py, importable from here), so no default or choice is typed twice.
The presets are the paper's ablation ladder as one trainer: hard -> kd -> uw-kd -> dual. The resolved
TrainConfig is written to RUN/config.json and read back by `--resume` and `--config`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.core.augment import ValResize
from pipeline.core.device import Precision
from pipeline.core.errors import ConfigError
from pipeline.reader.backends.registry import backend_choices
from pipeline.shards.options import ShardOptions

# the command configs and the dict -> dataclass machinery live beside this module; importable from here too
from trainer.config_base import _get, _is_number, _norm, build, opt
from trainer.config_base import command_config as command_config, missing_required as missing_required
from trainer.config_commands import DemoCommandConfig as DemoCommandConfig, ReportConfig as ReportConfig
from trainer.config_commands import SynthConfig as SynthConfig, VerifyConfig as VerifyConfig


Backend = str  # "auto" or a registered backend (pipeline/reader/backends/registry.py): choices=backend_choices
Direction = Literal["forward", "reverse"]  # of the KL terms (trainer/engine/losses.py)
# The per-sample weight of the teacher term: the paper's confidence (w = 1 - H/log C), none (w = 1), or its
# opposite, entropy (w = H/log C: up-weights what the teacher is unsure of, as entropy-aware KD variants do).
WeightFn = Literal["confidence", "none", "entropy"]
CudaGraphs = Literal["auto", "on", "off"]
DecodeDevice = Literal["auto", "cpu", "cuda", "cuda-hw"]
# torch.compile modes (trainer/engine/graphed.py says which combine with the step's own CUDA graph)
CompileMode = Literal["off", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"]


@dataclass(frozen=True)
class LossConfig:
    alpha: float = opt(0.4, "weight of the cross-entropy with the labels", preset=True)
    beta: float = opt(0.4, "weight of the teacher term (w * tau^2 * KL)", preset=True)
    gamma: float = opt(0.2, "weight of the peer term (tau^2 * KL to the other students, detached)", preset=True)
    tau: float = opt(4.0, "temperature of the teacher and peer terms")
    weight_fn: WeightFn = opt(
        "confidence", "per-sample weight of the teacher term: confidence w = 1 - H/log C (the paper), none "
        "(w = 1), entropy (w = H/log C, up-weights what the teacher is unsure of)", preset=True)
    entropy_tau: float = opt(1.0, "temperature of the teacher entropy H behind w (the paper mixes 1 and tau)")
    direction: Direction = opt(
        "forward", "KL direction: forward KL(target || student), Hinton; reverse KL(student || target), the "
        "paper's notation", flag="--kl-direction")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(0.1, "peak learning rate for the global batch; cosine decay to 0, per step")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(1e-4, "SGD weight decay")
    decay_norm_and_bias: bool = opt(True, "apply weight decay to BatchNorm and bias parameters too (plain SGD)")
    warmup_epochs: float = opt(0.0, "linear warm-up from 0, in epochs (fractions allowed)")
    nesterov: bool = opt(False, "Nesterov momentum")


@dataclass(frozen=True)
class ViewConfig:
    """The training view (pipeline/core/augment.py AugSpec): ImageNet's RandomResizedCrop + flip + ColorJitter by
    default. Data that must not be flipped or cut small (digits, text) says so here; the teacher cache records
    the values, so a cache made with others is refused."""

    crop_scale: tuple[float, float] = opt((0.08, 1.0), "random crop area as a fraction of the image, LO HI "
                                          "(0 < LO <= HI <= 1)")
    crop_ratio: tuple[float, float] = opt((3 / 4, 4 / 3), "random crop width/height, LO HI (0 < LO <= HI)")
    flip_p: float = opt(0.5, "probability of a horizontal flip (0: never, for digits or text)")
    brightness: float = opt(0.4, "brightness jitter: factor uniform in [max(0, 1 - b), 1 + b] (0: off)")
    contrast: float = opt(0.4, "contrast jitter, like --brightness (0: off)")
    saturation: float = opt(0.4, "saturation jitter, like --brightness (0: off)")

    def __post_init__(self) -> None:
        problems = []
        for name, flag in (("crop_scale", "--crop-scale"), ("crop_ratio", "--crop-ratio")):
            pair = getattr(self, name)
            if len(pair) != 2 or not all(_is_number(x) for x in pair):
                raise ConfigError(f"{flag} takes two finite numbers LO HI, got {pair!r}")
            object.__setattr__(self, name, tuple(float(x) for x in pair))
        (s_lo, s_hi), (r_lo, r_hi) = self.crop_scale, self.crop_ratio
        if not 0 < s_lo <= s_hi <= 1:
            problems.append(f"--crop-scale {s_lo:g} {s_hi:g}: need 0 < LO <= HI <= 1")
        if not 0 < r_lo <= r_hi:
            problems.append(f"--crop-ratio {r_lo:g} {r_hi:g}: need 0 < LO <= HI")
        if not 0 <= self.flip_p <= 1:
            problems.append(f"--flip-p {self.flip_p:g}: need 0 <= P <= 1")
        problems += [f"--{name} {getattr(self, name):g}: need a finite number >= 0" for name in
                     ("brightness", "contrast", "saturation") if not 0 <= getattr(self, name) < float("inf")]
        if problems:
            raise ConfigError("invalid view: " + "; ".join(problems))

    def spec_fields(self) -> dict[str, Any]:
        """These values as AugSpec keyword arguments."""
        return {"scale": self.crop_scale, "ratio": self.crop_ratio, "flip_p": self.flip_p,
                "brightness": self.brightness, "contrast": self.contrast, "saturation": self.saturation}


@dataclass(frozen=True)
class TrainConfig:
    shards: str = opt("", "directory written by `kdpipe shard`, or its URL (http(s)://, s3://, gs://, file://, "
                      "pipe:...{name}...): streamed", path="dir", url=True, required=True)
    out: str = opt("runs/dual", "run directory: config.json, metrics.jsonl, checkpoints, final weights",
                   path="out")
    mode: Literal["hard", "kd", "uw-kd", "dual"] = opt(
        "dual", "preset: hard (CE only), kd (alpha .3, beta .7), uw-kd (kd weighted by w), dual (.4/.4/.2 + peer)")
    students: tuple[str, ...] = opt(("resnet18", "mobilenet_v2"), "comma-separated student models (resnet18, "
                                    "mobilenet_v2, resnet50, tiny_cnn, tiny_resnet, tiny_mobilenet, or timm:NAME "
                                    "with timm installed)", preset=True)
    teacher: str = opt("resnet50", "architecture of the teacher (a registry name or timm:NAME)")
    teacher_weights: str | None = opt(None, "online teacher weights: kdpipe checkpoint, C-way or ImageNet-1k "
                                      "state dict", path="file")
    teacher_cache: str | None = opt(None, "Zarr teacher cache (`kdpipe cache-teacher`) instead of an online "
                                    "teacher; a URL is read-only", path="any", url=True)
    loss: LossConfig = opt(LossConfig, "")
    optim: OptimConfig = opt(OptimConfig, "")
    epochs: int = opt(50, "training epochs", min=1)
    batch_size: int = opt(64, "GLOBAL batch (samples per step over all ranks; split evenly across ranks)", min=1)
    image_size: int = opt(224, "training crop and validation view side, pixels", min=1)
    val_resize: ValResize = opt(
        "shorter", "validation view: shorter (shorter side to 256/224 of the crop, centre crop; torchvision's "
        "norm) or square (resize to 256x256, centre crop; the paper's words)")
    view: ViewConfig = opt(ViewConfig, "")
    dropout: float | None = opt(None, "dropout probability of every nn.Dropout in the students (default: each "
                                "model's own: 0.2 in MobileNetV2's classifier, torchvision's; ResNets have none)")
    reuse_views: bool = opt(False, "accept a teacher cache with fewer augmentation epochs than --epochs: "
                            "training epoch e then repeats the views (and logits) of epoch e mod E")
    seed: int = opt(0, "seed of augmentation, epoch order, initialisation and dropout")
    backend: Backend = opt("auto", "loader backend (auto: torch; dali by name, not yet run on a GPU)",
                           choices=backend_choices)
    num_workers: int | None = opt(None, "loader worker processes per rank (default: one per usable core)", min=0)
    skip_corrupt: bool = opt(False, "drop samples that fail to read or decode (counted in metrics.jsonl, listed "
                             "in RUN/skipped.tsv) instead of stopping")
    amp: Precision = opt("auto", "mixed precision: auto (bf16 on CUDA, fp32 on the CPU); fp16 uses one "
                         "GradScaler per student")
    channels_last: bool = opt(True, "channels_last memory format for models and images")
    compile: CompileMode = opt(
        "off", "torch.compile each student in this mode: default and max-autotune-no-cudagraphs (fused BatchNorm) "
        "run inside the step's CUDA graph with --cuda-graphs on; reduce-overhead and max-autotune make their own")
    cuda_graphs: CudaGraphs = opt(
        "auto", "capture the whole step in a CUDA graph and replay it (auto: on CUDA with one process and bf16/fp32, "
        "without --compile; the host then no longer limits the step: docs/train.md)")
    decode_device: DecodeDevice = opt(
        "auto", "where the torch backend decodes JPEGs on a CUDA machine: cpu (worker processes, uint8 crops copied "
        "to the GPU), cuda (nvJPEG in a prefetch thread on its own stream), cuda-hw (the GPU's hardware JPEG "
        "engines via nvImageCodec, not yet run on a GPU), auto (docs/loader.md)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    log_every: int = opt(20, "steps between progress updates (each one syncs the host with the device)", min=1)
    tensorboard: bool = opt(False, "also write per-step loss terms, lr and w, and per-epoch accuracy to RUN/tb "
                            "(needs the `tb` extra)")

    @property
    def uses_teacher(self) -> bool:
        return self.loss.beta != 0.0


@dataclass(frozen=True)
class CacheTeacherConfig:
    shards: str = opt(help="directory written by `kdpipe shard`, or its URL (streamed)", path="dir", url=True,
                      required=True)
    out: str = opt(help="Zarr store to create or resume, e.g. teacher.zarr", path="out", required=True)
    teacher_weights: str = opt(help="local teacher weights: kdpipe checkpoint, C-way or ImageNet-1k state dict",
                               path="file", required=True)
    teacher: str = opt("resnet50", "teacher architecture (a registry name or timm:NAME)")
    epochs: int = opt(50, "augmentation epochs E (the paper trains 50); a training run of more epochs than E "
                      "is refused unless it passes --reuse-views", min=1)
    seed: int = opt(0, "augmentation seed; must equal the training --seed", )
    image_size: int = opt(224, "training crop side, pixels; must equal the training --image-size", min=1)
    view: ViewConfig = opt(ViewConfig, "")
    topk: int = opt(0, "0: store full logits; K: top-K log-probabilities (for teachers with many classes)", min=0)
    batch_size: int = opt(256, "GLOBAL teacher batch (split evenly across ranks); never crosses a unit", min=1)
    chunk_n: int = opt(4096, "samples per store chunk and per unit of resumable, parallel work", flag="--chunk",
                       min=1)
    backend: Backend = opt("auto", "loader backend (auto: torch; dali by name, not yet run on a GPU)",
                           choices=backend_choices)
    num_workers: int | None = opt(None, "loader worker processes per rank (default: one per usable core)", min=0)
    skip_corrupt: bool = opt(False, "store no teacher signal (zero logits, w = 0) for samples that fail to read or "
                             "decode, list them in OUT.skipped.tsv, instead of stopping")
    precision: Precision = opt("auto", "teacher precision: auto (bf16 on CUDA, fp32 on the CPU)")
    decode_device: DecodeDevice = opt(
        "auto", "where the torch backend decodes JPEGs on a CUDA machine: cpu (worker processes), cuda (nvJPEG in a "
        "prefetch thread), cuda-hw (the GPU's hardware JPEG engines, not yet run on a GPU), auto (docs/loader.md)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    progress: bool = opt(True, "progress bar", cli=False)

    def __post_init__(self) -> None:
        if isinstance(self.view, dict):  # CacheTeacherConfig(**asdict(cfg)), e.g. a config sent to a subprocess
            object.__setattr__(self, "view", ViewConfig(**self.view))
        problems = []
        if min(self.epochs, self.batch_size, self.chunk_n, self.image_size) < 1 or self.topk < 0:
            problems.append("--epochs, --batch-size, --chunk and --image-size must be >= 1, --topk >= 0")
        elif self.chunk_n % self.batch_size:
            problems.append(f"--chunk ({self.chunk_n}) must be a multiple of --batch-size ({self.batch_size}), so "
                            f"batches never straddle two units and a resumed run computes identical logits")
        if problems:
            raise ConfigError("invalid cache-teacher options: " + "; ".join(problems))


@dataclass(frozen=True)
class ShardConfig:
    out: str = opt(help="shard directory", path="out", required=True)
    imagenet: str | None = opt(None, "ImageNet root holding train/ (and val/), or a Kaggle download "
                               "(ILSVRC/Data/CLS-LOC); or give --imagefolder", path="dir")
    imagefolder: str | None = opt(None, "instead of --imagenet: any class-folder tree ROOT/train/<class>/... (and "
                                  "ROOT/val/<class>/...); classes are train/'s folder names, sorted", path="dir")
    val_share: float | None = opt(None, "with --imagefolder and no val/: carve this share of each class from "
                                  "train as val (class-stratified, seeded by --seed)")
    classes: str | None = opt(None, "class list file (default: the canonical ImageNet-100 list)", path="file")
    val_labels: str | None = opt(None, "labels of a flat val/: 'file<TAB>wnid' or LOC_val_solution.csv (default: "
                                 "the shipped ILSVRC2012 labels)", path="file")
    options: ShardOptions = opt(ShardOptions, "")
    workers: int | None = opt(None, "processes (default: all usable cores; at most 4 a core and one per chunk of work)",
                              min=1)
    strict: bool = opt(False, "exit nonzero if any file was rejected")
    overwrite: bool = opt(False, "replace an output made with different options or inputs")

    def __post_init__(self) -> None:
        if (self.imagenet is None) == (self.imagefolder is None):
            raise ConfigError("give exactly one of --imagenet and --imagefolder")
        if self.imagefolder is not None and (self.classes or self.val_labels):
            raise ConfigError("--classes and --val-labels select from an ImageNet tree; --imagefolder takes "
                              "train/'s folders")
        if self.imagenet is not None and self.val_share is not None:
            raise ConfigError("--val-share carves val from an --imagefolder tree")


@dataclass(frozen=True)
class EvalConfig:
    run: str | None = opt(None, "run directory (evaluates its --which checkpoint)", path="dir")
    checkpoint: str | None = opt(None, "a kdpipe checkpoint, or a run's final weights (student<i>-<name>.safetensors "
                                       "or .pt)", path="file")
    which: Literal["last", "best"] = opt("last", "which checkpoint of --run")
    shards: str | None = opt(None, "shards to evaluate on, a directory or URL (default: the run's own)",
                             path="dir", url=True)
    image_size: int | None = opt(None, "view side, pixels (default: the run's own)", min=1)
    val_resize: ValResize | None = opt(None, "validation resize (default: the run's own)")
    batch_size: int = opt(128, "GLOBAL evaluation batch", min=1)
    backend: Backend = opt("auto", "loader backend", choices=backend_choices)
    num_workers: int | None = opt(None, "loader worker processes (default: one per usable core)", min=0)
    skip_corrupt: bool = opt(False, "drop validation samples that fail to read or decode (and say how many)")
    amp: Precision | None = opt(None, "mixed precision of the forward passes (default: the run's own --amp, else "
                                      "auto: bf16 on CUDA, fp32 on the CPU)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")

    def __post_init__(self) -> None:
        if (self.run is None) == (self.checkpoint is None):
            raise ConfigError("give exactly one of --run and --checkpoint")


@dataclass(frozen=True)
class ExportConfig:
    run: str = opt(help="a finished run directory (its student*.safetensors)", path="dir", required=True)
    format: Literal["onnx"] = opt("onnx", "output format (safetensors files are written by every run already)")
    out: str | None = opt(None, "directory for the exported files (default: the run directory)", path="out")
    batch_size: int = opt(2, "images in the batch that checks each export against PyTorch", min=1)
    atol: float = opt(1e-4, "largest accepted |exported - PyTorch| logit difference on that batch", min=0)


# mode -> (loss fields, default students). Single-student presets train ResNet-18 like the paper.
PRESETS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "hard": ({"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "weight_fn": "none"}, ("resnet18",)),
    "kd": ({"alpha": 0.3, "beta": 0.7, "gamma": 0.0, "weight_fn": "none"}, ("resnet18",)),
    "uw-kd": ({"alpha": 0.3, "beta": 0.7, "gamma": 0.0, "weight_fn": "confidence"}, ("resnet18",)),
    "dual": ({"alpha": 0.4, "beta": 0.4, "gamma": 0.2, "weight_fn": "confidence"}, ("resnet18", "mobilenet_v2")),
}

# Fields a resumed run may change (paths move; logging, workers and compilation do not change the numbers).
RESUME_FREE = ("out", "shards", "teacher_weights", "teacher_cache", "num_workers", "log_every", "compile",
               "tensorboard", "cuda_graphs", "decode_device")


def preset_fields(mode: str) -> dict[str, Any]:
    """What --mode sets: the loss weights and the default students, as nested config fields."""
    if mode not in PRESETS:
        raise ConfigError(f"--mode {mode!r} is not a preset; choose from {', '.join(PRESETS)}")
    loss, students = PRESETS[mode]
    return {"mode": mode, "loss": dict(loss), "students": students}


def make_config(mode: str = "dual", students: tuple[str, ...] | None = None, *,
                loss: dict | None = None, optim: dict | None = None, **fields) -> TrainConfig:
    """The preset `mode`, with loss/optimizer overrides (None values ignored) and other fields set."""
    preset = preset_fields(mode)
    d = {**{k: v for k, v in fields.items() if v is not None}, "mode": mode,
         "students": tuple(students or preset["students"]),
         "loss": {**preset["loss"], **{k: v for k, v in (loss or {}).items() if v is not None}},
         "optim": {k: v for k, v in (optim or {}).items() if v is not None}}
    return from_dict(d)


def resolve_train(given: dict, file: dict | None = None, saved: dict | None = None,
                  saved_name: str = "config.json") -> TrainConfig:
    """The TrainConfig of a `kdpipe train` call, from the flags given (a nested dict of only what was typed).

    New run: dataclass defaults < the --mode preset (loss weights, students) < `file` (--config) < flags. A
    --mode given on the command line that differs from the file's resets the loss weights and students to that
    preset (then flags apply). Resume (`saved` = the run's config.json): the saved config, and every flag given
    must agree with it except RESUME_FREE fields (paths, workers, logging, compile), else a ConfigError names
    the field and both values."""
    from trainer.options import flag_of, flatten, merge

    if saved is not None:
        base = {k: v for k, v in _legacy(saved).items() if k != "runtime"}
        clash = [f"{flag_of(TrainConfig, p)} {_as_typed(v)} (the run has {_as_typed(_get(base, p))})"
                 for p, v in flatten(given).items() if p[0] not in RESUME_FREE and _norm(_get(base, p)) != _norm(v)]
        if clash:
            raise ConfigError(f"--resume continues the run as {saved_name} says; these flags differ from it: "
                              f"{'; '.join(clash)} (drop them, or start a new run with --config {saved_name} "
                              f"--out NEW)")
        return from_dict(merge(base, given))
    file = _legacy(file or {})
    mode = given.get("mode") or file.get("mode") or TrainConfig.mode
    if "mode" in given and given["mode"] != file.get("mode", given["mode"]):
        file = {k: v for k, v in file.items() if k not in ("loss", "students")}
    return from_dict(merge(preset_fields(mode), file, given))


def _as_typed(value: Any) -> str:
    """A value as a flag takes it (students as `a,b`, a mode bare), for messages."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def validate(cfg: TrainConfig) -> None:
    """Raise ConfigError for settings that cannot train (before any data or model is touched)."""
    errors = []
    if not cfg.students:  # the names themselves are checked against the model registry by the job
        errors.append("--students must name at least one model")
    if cfg.loss.gamma != 0.0 and len(cfg.students) < 2:
        errors.append(f"the peer term (--gamma {cfg.loss.gamma}) needs two or more students")
    if cfg.loss.tau <= 0 or cfg.loss.entropy_tau <= 0:
        errors.append("temperatures (--tau, --entropy-tau) must be positive")
    weights = {"--alpha": cfg.loss.alpha, "--beta": cfg.loss.beta, "--gamma": cfg.loss.gamma}
    errors += [f"{flag} (got {value:g}) must not be negative: a loss term would be maximised"
               for flag, value in weights.items() if value < 0]
    if not cfg.optim.lr > 0:
        errors.append(f"--lr must be positive (got {cfg.optim.lr:g})")
    errors += [f"{flag} (got {value:g}) must not be negative" for flag, value in
               (("--warmup-epochs", cfg.optim.warmup_epochs), ("--weight-decay", cfg.optim.weight_decay)) if value < 0]
    if not 0 <= cfg.optim.momentum < 1 or (cfg.optim.nesterov and cfg.optim.momentum == 0):
        errors.append(f"--momentum must be in [0, 1) and above 0 with --nesterov, got {cfg.optim.momentum:g}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        errors.append(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.teacher_weights and cfg.teacher_cache:
        errors.append("give either --teacher-weights (online teacher) or --teacher-cache, not both")
    if errors:
        raise ConfigError("invalid training config: " + "; ".join(errors))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _legacy(d: dict) -> dict:
    """config.json files of earlier versions: loss.uncertainty (bool) became loss.weight_fn; a run from before
    the view options trained ImageNet's view (their defaults); compile (bool) became a mode (true: "default")."""
    if "view" not in d:
        d = {**d, "view": to_dict(ViewConfig())}
    if isinstance(d.get("compile"), bool):
        d = {**d, "compile": "default" if d["compile"] else "off"}
    loss = d.get("loss")
    if isinstance(loss, dict) and "uncertainty" in loss:
        loss = dict(loss)
        flag = loss.pop("uncertainty")
        loss.setdefault("weight_fn", "confidence" if flag else "none")
        d = {**d, "loss": loss}
    return d


def from_dict(d: dict, cls: type = None) -> Any:
    """A config from a (possibly partial, nested) dict such as config.json, a TOML file or a checkpoint's
    config; unknown keys are a ConfigError naming them; missing keys take the defaults. Validated."""
    cls = cls or TrainConfig
    cfg = build(cls, _legacy(d) if cls is TrainConfig else d)
    if cls is TrainConfig:
        validate(cfg)
    return cfg


def to_record(cfg: Any, extra: dict | None = None) -> dict:
    """What RUN/config.json holds: the config as JSON values, plus `extra` keys (the runtime record)."""
    return {**to_dict(cfg), **(extra or {})}


def config_diff(saved: dict, current: Any, free: tuple[str, ...] = RESUME_FREE) -> list[str]:
    """Fields (dotted) where a saved config differs from `current`, ignoring `free` top-level fields."""
    now = to_dict(current)
    saved = _legacy({k: v for k, v in saved.items() if k != "runtime"})
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in free:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if _norm(a.get(k)) != _norm(b.get(k))]  # JSON lists = tuples (view.crop_scale)
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{key}: {a!r} -> {b!r}")
    return out



def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at total_steps (evaluated per optimizer step).

    torch's SequentialLR(LinearLR, CosineAnnealingLR) gives the same curve (tests/test_schedule.py) but by
    multiplying factors step by step: over 100,000 steps only 1.3 % of its values were bit-equal to this closed
    form (worst relative difference 4.7e-12), so a resumed run would not repeat an uninterrupted one exactly.
    Closed form here; torch's LambdaLR applies it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

