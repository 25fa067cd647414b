"""Model registry by name, and teacher weights from a local file (nothing downloads).

The paper's models are torchvision's ResNet-18, MobileNetV2 and ResNet-50 with C outputs. The
`tiny_*` models are small CNNs with the same interface, so a 2-core CPU can run the very same
trainer in a demo or a test in seconds; they are not meant to reach any accuracy worth reporting.
Any timm model is `timm:NAME` (the optional extra `timm`), built at random init with C outputs.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.core.classes import imagenet1k_indices, is_imagenet1k
from pipeline.core.errors import CheckpointError, ConfigError, MissingDataError, one_line

IMAGENET1K_CLASSES = 1000
TIMM_PREFIX = "timm:"


def _conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class TinyCNN(nn.Module):
    """Three stride-2 conv blocks, global pooling, a linear head ("fc"). About 25k parameters at width 16."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(_conv_bn(3, width, 2), _conv_bn(width, 2 * width, 2),
                                      _conv_bn(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(width, width), nn.Conv2d(width, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class TinyResNet(TinyCNN):
    """TinyCNN with a residual block after stages 2 and 3 (twice the depth): a stronger demo teacher.
    About 110k parameters and 4x TinyCNN's compute at width 16."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__(num_classes, width)
        w = width
        self.features = nn.Sequential(_conv_bn(3, w, 2), _conv_bn(w, 2 * w, 2), Residual(2 * w),
                                      _conv_bn(2 * w, 4 * w, 2), Residual(4 * w))


class TinyMobileNet(TinyCNN):
    """Depthwise-separable blocks and dropout before the head, like MobileNetV2 in miniature."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.2):
        super().__init__(num_classes, width, dropout)
        w = width

        def sep(cin: int, cout: int) -> nn.Sequential:  # depthwise 3x3 stride 2, then pointwise 1x1
            return nn.Sequential(_conv_bn(cin, cin, 2, groups=cin), nn.Conv2d(cin, cout, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(_conv_bn(3, w, 2), sep(w, 2 * w), sep(2 * w, 4 * w))


class ModelRegistry(dict):
    """name -> builder(num_classes). `name in MODELS` is also true for every `timm:NAME` that timm knows, so
    any check against the registry (config validation included) accepts timm models; iterating lists only
    the built-in names."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and is_timm_name(name))


def is_timm_name(name: str) -> bool:
    """True for `timm:NAME` when timm is installed and knows NAME."""
    if not name.startswith(TIMM_PREFIX):
        return False
    try:
        import timm
    except ImportError:
        return False
    return bool(timm.is_model(name[len(TIMM_PREFIX):]))


def is_model_name(name: str) -> bool:
    """A name build_model accepts: a built-in model or `timm:NAME`."""
    return name in MODELS


def _timm_module(name: str, flag: str = "model"):
    """timm, once it is known to have the model of `timm:NAME` (ConfigError naming `flag` otherwise)."""
    arch = name[len(TIMM_PREFIX):]
    try:
        import timm
    except ImportError:
        raise ConfigError(f"{flag} {name!r} needs timm: pip install 'kdpipe[timm]'") from None
    if not timm.is_model(arch):
        raise ConfigError(f"{flag} {name!r}: timm has no model {arch!r} (see timm.list_models('*{arch[:6]}*')); "
                          f"timm {timm.__version__}")
    return timm


def _timm_model(name: str, num_classes: int) -> nn.Module:
    return _timm_module(name).create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes)


MODELS: dict[str, Callable[[int], nn.Module]] = ModelRegistry({
    "resnet18": lambda c: torchvision.models.resnet18(weights=None, num_classes=c),
    "resnet50": lambda c: torchvision.models.resnet50(weights=None, num_classes=c),
    "mobilenet_v2": lambda c: torchvision.models.mobilenet_v2(weights=None, num_classes=c),
    "tiny_cnn": lambda c: TinyCNN(c),
    "tiny_resnet": lambda c: TinyResNet(c),
    "tiny_mobilenet": lambda c: TinyMobileNet(c),
})


def register_model(name: str, builder: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    """Add a model in one line, `register_model("my_net", MyNet)`: builder(num_classes) -> a freshly initialised
    nn.Module with that many outputs; --students and --teacher then accept the name. A taken name or a timm:
    name is an error."""
    if not name or name.startswith(TIMM_PREFIX) or dict.__contains__(MODELS, name):
        raise ValueError(f"model name {name!r} is taken or reserved")
    MODELS[name] = builder
    return builder


def unregister_model(name: str) -> None:
    """Remove a model added with `register_model` (tests add toy models and take them away again)."""
    dict.pop(MODELS, name)


def check_model_names(names: tuple[str, ...] | list[str], flag: str = "--students") -> None:
    """ConfigError naming the registry's models when a name is not one of them (before any data is read)."""
    for name in names:
        if name.startswith(TIMM_PREFIX):
            _timm_module(name, flag)  # timm missing, or no such timm model: say that, not the built-in list
    if not names or any(name not in MODELS for name in names):
        raise ConfigError(f"invalid training config: {flag} must name models from {', '.join(sorted(MODELS))}; "
                          f"got {','.join(names)}")


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model with `num_classes` outputs (no pretrained weights)."""
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name, num_classes)
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))} or timm:NAME")
    return MODELS[name](num_classes)


def check_one_sample_batches(names: list[str] | tuple[str, ...], num_classes: int, image_size: int,
                             flag: str = "--batch-size") -> None:
    """Refuse, before any data is read, students that cannot train on batches of one sample: a BatchNorm
    layer whose feature map is 1x1 at this image size sees one value per channel ("Expected more than 1
    value per channel when training" mid-run). Probed by one forward pass on the meta device (shapes only:
    no memory, no arithmetic). Only a batch of one can fail this way, so callers probe only that case."""
    for name in names:
        with torch.device("meta"):
            model = build_model(name, num_classes).train()
            try:
                model(torch.empty(1, 3, image_size, image_size))
            except ValueError as e:
                if "more than 1 value per channel" not in str(e):
                    raise
                raise ConfigError(f"{flag} gives 1 sample per rank: {name} cannot train on it at --image-size "
                                  f"{image_size} (its BatchNorm then normalises a single value per channel); "
                                  f"use at least 2 samples per rank") from e


def head_names(model: nn.Module) -> list[str]:
    """Qualified names of the classifier layers: what timm's pretrained_cfg says (several for distilled
    heads), else the last nn.Linear (fc for ResNets, classifier.1 for MobileNetV2)."""
    declared = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if declared:
        return [declared] if isinstance(declared, str) else list(declared)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return [linears[-1]]


def head_name(model: nn.Module) -> str:
    """The (first) classifier layer's qualified name."""
    return head_names(model)[0]


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers' prefixes: DDP's 'module.' and torch.compile's '_orig_mod.'."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def class_difference(trained: list[str], shards: list[str]) -> str:
    """Where two class lists first part, in words (for the one-line refusals of other classes)."""
    k = next((i for i, (a, b) in enumerate(zip(trained, shards)) if a != b), min(len(trained), len(shards)))
    if k < len(trained) and k < len(shards):
        return f"class {k} is {trained[k]!r} in training, {shards[k]!r} in the shards"
    longer, which = (trained, "training") if k < len(trained) else (shards, "the shards")
    return f"{len(longer) - k} more in {which}, from {longer[k]!r}"


def _state_from_file(obj: object, path: Path, name: str, classes: list[str]) -> dict[str, torch.Tensor]:
    """The model state dict inside whatever the file holds (kdpipe checkpoint/weights, or a state dict)."""
    if isinstance(obj, dict) and obj.get("format") in ("kdpipe-checkpoint", "kdpipe-weights"):
        if obj.get("classes") is not None and list(obj["classes"]) != list(classes):
            raise CheckpointError(f"{path}: trained on {len(obj['classes'])} classes that differ from the shards' "
                                  f"{len(classes)} classes ({class_difference(list(obj['classes']), classes)})")
        entries = obj["students"] if obj["format"] == "kdpipe-checkpoint" else [obj]
        for entry in entries:
            if entry["name"] == name:
                return entry["model"]
        raise CheckpointError(f"{path}: holds models {[e['name'] for e in entries]}, not {name!r}")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict or kdpipe checkpoint")
    return obj


def _read_file(path: Path) -> object:
    """A .safetensors file (how timm's weights are published), or a torch file loaded weights-only (empty,
    truncated and unsafe files are one-line CheckpointErrors)."""
    from trainer.engine.checkpoint import load_safetensors_weights, load_torch_file

    if path.suffix == ".safetensors":
        return load_safetensors_weights(path)[0]
    return load_torch_file(path, "teacher weights")


def _fit_state(model: nn.Module, state: dict[str, torch.Tensor], *, path: str | Path, name: str) -> None:
    """load_state_dict, every key and shape; tensors of other shapes, missing or unexpected keys are a one-line
    CheckpointError naming the file."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: torch lists every one, over many lines
        sizes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"{path}: weights do not fit {name}: {len(sizes)} tensors differ in shape, e.g. "
                              f"{sizes[0] if sizes else one_line(e, 200)}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit {name}: {len(missing)} missing keys "
                              f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")


def rebuild_model(name: str, num_classes: int, state: dict[str, torch.Tensor], *, path: str | Path) -> nn.Module:
    """The one way a kdpipe model comes back from its files (a checkpoint's student, a run's final weights):
    `name` built with `num_classes` outputs, holding exactly `state` (every key, every shape), in eval mode on
    the CPU. A state that does not fit is a CheckpointError naming `path`."""
    model = build_model(name, num_classes)
    _fit_state(model, state, path=path, name=name)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path, *, name: str, classes: list[str]) -> nn.Module:
    """Load teacher weights into `model` (built with len(classes) outputs) from a local file.

    Accepts a kdpipe checkpoint or final-weights file, a torchvision- or timm-style state dict with C outputs
    (timm's training checkpoints and .safetensors files too), or, when the classes are ImageNet wnids, an
    ImageNet-1k state dict whose 1000-way head is sliced to `classes` (label order).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"teacher weights file not found: {path}")
    state = _strip_prefixes(dict(_state_from_file(_read_file(path), path, name, classes)))
    num_classes = len(classes)
    for head in head_names(model):
        wkey, bkey = f"{head}.weight", f"{head}.bias"
        if wkey not in state:
            raise CheckpointError(f"{path}: no {wkey!r} in the file; is it a {name} state dict?")
        rows = state[wkey].shape[0]
        if rows == num_classes:
            continue
        if rows != IMAGENET1K_CLASSES:
            raise CheckpointError(f"{path}: head {wkey} has {rows} outputs; expected {num_classes} (the shards' "
                             f"classes) or {IMAGENET1K_CLASSES} (ImageNet-1k, sliced to those classes)")
        if not is_imagenet1k(classes):
            raise CheckpointError(f"{path}: head {wkey} has {IMAGENET1K_CLASSES} outputs (ImageNet-1k), but the "
                                  f"shards' classes are not ImageNet wnids (e.g. {classes[0]!r}), so it cannot be "
                                  f"sliced to them; give weights with {num_classes} outputs")
        idx = torch.tensor(imagenet1k_indices(classes))
        state[wkey] = state[wkey][idx].clone()
        if bkey in state:
            state[bkey] = state[bkey][idx].clone()
    _fit_state(model, state, path=path, name=name)
    return model
