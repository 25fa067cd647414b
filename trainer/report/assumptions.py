"""Where the paper is silent or ambiguous, what kdpipe chose: ONE table, rendered into docs/train.md
("Assumptions where the paper is silent") and into every report, there with each run's actual values where
they differ from the default. `python -m trainer.report.assumptions` prints the docs section.

A row's `keys` are config.json paths (dotted) to read a run's value from. Defaults are not written here:
they are what `trainer.config.make_config(mode)` resolves (so presets differ by mode, e.g. the weight
function), and MISSING gives the value for config.json files written before a key existed.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Assumption:
    choice: str  # what had to be chosen
    default: str  # kdpipe's default, in words
    paper: str  # what the paper says, or that it is silent
    option: str  # the option that switches it ("none; ..." where fixed)
    keys: tuple[str, ...] = ()  # config.json paths of the run's actual value; () where fixed in code


ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption("KL direction of the teacher and peer terms", "forward: KL(p_T || q_S), Hinton's",
               "writes KL(q || p) (reverse)", "`--kl-direction forward|reverse`", ("loss.direction",)),
    Assumption("temperature of the entropy behind w", "1",
               "silent; its mean entropy 4.533 nats only fits tau = 4", "`--entropy-tau`", ("loss.entropy_tau",)),
    Assumption("teacher weight function", "`confidence` in uw-kd and dual, `none` (w = 1) in hard and kd; "
               "`entropy` (w = H/log C) tests the opposite premise", "w = 1 - H/log C (`confidence`)",
               "`--weight-fn confidence|none|entropy`", ("loss.weight_fn",)),
    Assumption("loss weights of the uw-kd rung", "alpha .3, beta .7 (kd's); kd .3/.7, dual .4/.4/.2",
               "gives kd's and dual's weights; silent on uw-kd's", "`--alpha --beta --gamma`",
               ("loss.alpha", "loss.beta", "loss.gamma")),
    Assumption("validation resize", "`shorter`: shorter side to 256, centre crop 224 (torchvision's)",
               "\"resize to 256x256, centre crop 224\" (`square`)", "`--val-resize shorter|square`",
               ("val_resize",)),
    Assumption("colour-jitter order", "fixed: brightness, contrast, saturation",
               "silent (torchvision's ColorJitter draws a random order)",
               "none; fixed in the pixel definition, docs/loader.md"),
    Assumption("weight decay on BatchNorm and bias parameters", "on (plain SGD, wd 1e-4 on every parameter)",
               "plain SGD, wd 1e-4; silent on exclusions", "`--decay-norm-and-bias/--no-decay-norm-and-bias`",
               ("optim.decay_norm_and_bias",)),
    Assumption("learning-rate warm-up", "none (0 epochs)", "silent (cosine from 0.1)", "`--warmup-epochs`",
               ("optim.warmup_epochs",)),
    Assumption("MobileNetV2 classifier dropout", "each model's own: 0.2 in MobileNetV2 (torchvision's)", "silent",
               "`--dropout` (sets every dropout layer of the students)", ("dropout",)),
    Assumption("repeating augmented views", "refused: a teacher cache needs one augmentation epoch per "
               "training epoch", "fresh random views every epoch (online)", "`--reuse-views`", ("reuse_views",)),
    Assumption("batch size on several GPUs", "64 global, split across ranks; lr unchanged",
               "64 on one GPU", "`--batch-size` (global)", ("batch_size",)),
    Assumption("the demo teacher's schedule", "CPU demo: 10 epochs against the students' 8, their lr and batch, "
               "no warm-up; `--preset gpu`: 20 epochs against 5, batch 128 at lr 0.1 (0.05 at batch 64 by linear "
               "scaling), 2 warm-up epochs", "silent: its teacher is a trained ResNet-50",
               "`DemoConfig.teacher_epochs`, `teacher_lr`, `teacher_batch_size`, `teacher_warmup_epochs` "
               "(trainer/jobs/demo.py)"),
    Assumption("the demo teacher's label smoothing", "none in the CPU demo; 0.1 in `--preset gpu`, in the "
               "teacher's cross-entropy only (the students' losses never smooth)", "silent",
               "`DemoConfig.teacher_label_smoothing` (trainer/jobs/teacher_recipe.py)",
               ("runtime.teacher_recipe.label_smoothing",)),
    Assumption("the demo teacher's residual BatchNorm init", "torchvision's (gamma 1) in the CPU demo; in `--preset "
               "gpu` the last BatchNorm gamma of each residual block is 0 (resnet50(zero_init_residual=True))",
               "silent", "`DemoConfig.teacher_zero_init_residual` (trainer/jobs/teacher_recipe.py)",
               ("runtime.teacher_recipe.zero_init_residual",)),
)

# Values for config.json files written before the key existed (older kdpipe versions).
MISSING: dict[str, Any] = {"loss.direction": "forward", "loss.entropy_tau": 1.0, "val_resize": "shorter",
                           "optim.decay_norm_and_bias": True, "optim.warmup_epochs": 0.0, "dropout": None,
                           "reuse_views": False, "batch_size": 64,
                           # the teacher recipe's extras, recorded only by the recipe's own loop
                           "runtime.teacher_recipe.label_smoothing": 0.0,
                           "runtime.teacher_recipe.zero_init_residual": False}
_ABSENT = object()


def config_value(cfg: dict, key: str, default: Any = None) -> Any:
    """A run's value at a dotted path of its config.json. A file written before the key existed: MISSING's
    value, or for loss.weight_fn the translation of loss.uncertainty (true -> confidence, false -> none),
    else `default`."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
    if node is not _ABSENT:
        return node
    if key == "loss.weight_fn":
        unc = (cfg.get("loss") or {}).get("uncertainty")
        if unc is not None:
            return "confidence" if unc else "none"
    return MISSING.get(key, default)


def default_value(mode: str, key: str) -> Any:
    """kdpipe's default for `key` in preset `mode`: what make_config(mode) resolves today."""
    return config_value(_default_config(mode), key)


@functools.lru_cache(maxsize=None)
def _default_config(mode: str) -> dict:
    from trainer.config import PRESETS, make_config

    return dataclasses.asdict(make_config(mode if mode in PRESETS else "dual"))


def departures(cfg: dict) -> list[tuple[Assumption, str, Any, Any]]:
    """(row, key, the run's value, the default) for each key where a run's config.json differs from the
    default of its mode."""
    mode = str(cfg.get("mode", "dual"))
    out = []
    for row in ASSUMPTIONS:
        for key in row.keys:
            want = default_value(mode, key)
            have = config_value(cfg, key, default=want)  # a key the file lacks counts as the default
            if not _same(have, want):
                out.append((row, key, have, want))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; a "|" inside a cell is escaped (GitHub's tables split on it even in code spans)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + " --- |" * len(header)] + [line(r) for r in rows]


HEADER = ["choice", "kdpipe's default", "the paper", "switch", "config.json key"]


def docs_table() -> list[str]:
    """The markdown table of docs/train.md's section "Assumptions where the paper is silent"."""
    rows = [[a.choice, a.default, a.paper, a.option, ", ".join(f"`{k}`" for k in a.keys) or "—"]
            for a in ASSUMPTIONS]
    return _table(HEADER, rows)


def report_section(runs: list[tuple[str, dict]]) -> list[str]:
    """The report's section: the table, plus a column naming each run whose value differs from its default."""
    notes: dict[Assumption, list[str]] = {}
    for name, cfg in runs:
        for row, key, have, want in departures(cfg):
            notes.setdefault(row, []).append(f"{name}: `{key}` = {_show(have)} (default {_show(want)})")
    rows = [[a.choice, a.default, a.paper, a.option, "; ".join(notes.get(a, [])) or "default"]
            for a in ASSUMPTIONS]
    out = ["## Assumptions where the paper is silent", "",
           "What kdpipe chose where the paper does not say (docs/train.md); the last column names every run "
           "of this report whose config.json differs from its mode's default (files written before a key "
           "existed count as the default).", ""]
    return out + _table(HEADER[:4] + ["in these runs"], rows) + [""]


def _show(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


if __name__ == "__main__":
    print("\n".join(docs_table()))
