"""Model registry by name, and teacher weights from a local file (nothing downloads).

The paper's models are torchvision's ResNet-18, MobileNetV2 and ResNet-50 with C outputs. The
`tiny_*` models are small CNNs with the same interface, so a 2-core CPU can run the very same
trainer in a demo or a test in seconds; they are not meant to reach any accuracy worth reporting.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.classes import imagenet1k_indices

IMAGENET1K_CLASSES = 1000


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


class _Residual(nn.Module):
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
        self.features = nn.Sequential(_conv_bn(3, w, 2), _conv_bn(w, 2 * w, 2), _Residual(2 * w),
                                      _conv_bn(2 * w, 4 * w, 2), _Residual(4 * w))


class TinyMobileNet(TinyCNN):
    """Depthwise-separable blocks and dropout before the head, like MobileNetV2 in miniature."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.2):
        super().__init__(num_classes, width, dropout)
        w = width

        def sep(cin: int, cout: int) -> nn.Sequential:  # depthwise 3x3 stride 2, then pointwise 1x1
            return nn.Sequential(_conv_bn(cin, cin, 2, groups=cin), nn.Conv2d(cin, cout, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(_conv_bn(3, w, 2), sep(w, 2 * w), sep(2 * w, 4 * w))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet18": lambda c: torchvision.models.resnet18(weights=None, num_classes=c),
    "resnet50": lambda c: torchvision.models.resnet50(weights=None, num_classes=c),
    "mobilenet_v2": lambda c: torchvision.models.mobilenet_v2(weights=None, num_classes=c),
    "tiny_cnn": lambda c: TinyCNN(c),
    "tiny_resnet": lambda c: TinyResNet(c),
    "tiny_mobilenet": lambda c: TinyMobileNet(c),
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """A freshly initialised model with `num_classes` outputs (no pretrained weights)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes)


def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier: the last nn.Linear (fc for ResNets, classifier.1 for MobileNetV2)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the wrappers' prefixes: DDP's 'module.' and torch.compile's '_orig_mod.'."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _state_from_file(obj: object, path: Path, name: str, classes: list[str]) -> dict[str, torch.Tensor]:
    """The model state dict inside whatever the file holds (kdpipe checkpoint/weights, or a state dict)."""
    if isinstance(obj, dict) and obj.get("format") in ("kdpipe-checkpoint", "kdpipe-weights"):
        if obj.get("classes") is not None and list(obj["classes"]) != list(classes):
            raise ValueError(f"{path}: trained on {len(obj['classes'])} classes that differ from the shards' "
                             f"{len(classes)} classes")
        entries = obj["students"] if obj["format"] == "kdpipe-checkpoint" else [obj]
        for entry in entries:
            if entry["name"] == name:
                return entry["model"]
        raise ValueError(f"{path}: holds models {[e['name'] for e in entries]}, not {name!r}")
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: not a state dict or kdpipe checkpoint")
    return obj


def load_weights(model: nn.Module, path: str | Path, *, name: str, classes: list[str]) -> nn.Module:
    """Load teacher weights into `model` (built with len(classes) outputs) from a local file.

    Accepts a kdpipe checkpoint or final-weights file, a torchvision-style state dict with C outputs,
    or an ImageNet-1k state dict whose 1000-way head is sliced to `classes` (wnids, label order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = _strip_prefixes(dict(_state_from_file(obj, path, name, classes)))
    head = head_name(model)
    wkey, bkey = f"{head}.weight", f"{head}.bias"
    if wkey not in state:
        raise ValueError(f"{path}: no {wkey!r} in the file; is it a {name} state dict?")
    rows, num_classes = state[wkey].shape[0], len(classes)
    if rows != num_classes:
        if rows != IMAGENET1K_CLASSES:
            raise ValueError(f"{path}: head {wkey} has {rows} outputs; expected {num_classes} (the shards' "
                             f"classes) or {IMAGENET1K_CLASSES} (ImageNet-1k, sliced to those classes)")
        idx = torch.tensor(imagenet1k_indices(classes))
        state[wkey] = state[wkey][idx].clone()
        if bkey in state:
            state[bkey] = state[bkey][idx].clone()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit {name}: {e}") from e
    return model
