"""Top-1 / top-5 accuracy of each student and of their ensemble (mean of the softmaxes).

Counts stay on the device during the pass and are summed across DDP ranks at the end, so a run
on several GPUs reports the accuracy over the whole validation split.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.errors import ConfigError

from .config import EvalConfig
from .runtime import autocast, precision_dtype, resolve_device


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many samples have their label among the top-k logits, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, :min(k, kmax)].any(dim=-1).sum() for k in ks])


@torch.no_grad()
def evaluate(models: Sequence[nn.Module], batches: Iterable, device: torch.device, *,
             amp_dtype: torch.dtype | None = None, channels_last: bool = True) -> dict:
    """{"top1": [per model], "top5": [...], "ensemble_top1", "ensemble_top5", "count"} in percent.

    `batches` yields pipeline Batch objects (images normalised). Models are put in eval mode and
    restored to their previous mode afterwards.
    """
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    counts = torch.zeros(len(models) + 1, 2, device=device, dtype=torch.float64)
    seen = torch.zeros((), device=device, dtype=torch.float64)
    try:
        for batch in batches:
            batch = batch.to(device)
            images = batch.images
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                logits = [m(images).float() for m in models]
            probs = torch.stack([z.softmax(dim=-1) for z in logits]).mean(dim=0)
            for i, z in enumerate(logits + [probs]):
                counts[i] += topk_correct(z, batch.labels)
            seen += batch.labels.shape[0]
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        dist.all_reduce(seen)
    n = max(seen.item(), 1.0)
    acc = (counts * 100.0 / n).tolist()
    return {"top1": [a[0] for a in acc[:-1]], "top5": [a[1] for a in acc[:-1]],
            "ensemble_top1": acc[-1][0], "ensemble_top5": acc[-1][1], "count": int(seen.item())}


def format_table(names: Sequence[str], result: dict) -> str:
    """A small fixed-width table: one row per student, then the ensemble."""
    rows = [f"{'model':<20} {'top-1 %':>8} {'top-5 %':>8}"]
    for name, t1, t5 in zip(names, result["top1"], result["top5"]):
        rows.append(f"{name:<20} {t1:>8.2f} {t5:>8.2f}")
    if len(names) > 1:
        rows.append(f"{'ensemble (mean p)':<20} {result['ensemble_top1']:>8.2f} {result['ensemble_top5']:>8.2f}")
    skipped = f", {result['skipped']} corrupt ones skipped" if result.get("skipped") else ""
    rows.append(f"({result['count']} validation images{skipped})")
    return "\n".join(rows)


def eval_checkpoint(cfg: EvalConfig) -> tuple[Path, list[str], dict]:
    """The `kdpipe eval` job: the students of a kdpipe checkpoint (or one final-weights file) on the shards' val
    split. Shards, image size and validation resize default to the run's own config. Returns (the checkpoint
    evaluated, student names, the result of `evaluate`)."""
    from pipeline.augment import AugSpec
    from pipeline.loader import ImageNet100Loader

    from .checkpoint import LAST, BEST, load_checkpoint
    from .models import build_model

    path = Path(cfg.checkpoint) if cfg.checkpoint else Path(cfg.run) / (LAST if cfg.which == "last" else BEST)
    state = load_checkpoint(path)
    run_cfg = state.get("config") or {}
    shards = cfg.shards or run_cfg.get("shards")
    if not shards:
        raise ConfigError(f"{path} does not record its shards; pass --shards DIR")
    entries = state["students"] if "students" in state else [state]
    device = resolve_device(cfg.device)
    spec = AugSpec(image_size=cfg.image_size or run_cfg.get("image_size", AugSpec().image_size),
                   val_resize_mode=cfg.val_resize or run_cfg.get("val_resize", "shorter"))
    loader = ImageNet100Loader(shards, "val", cfg.batch_size, backend=cfg.backend, device=device, spec=spec,
                               drop_last=False, num_workers=cfg.num_workers, skip_corrupt=cfg.skip_corrupt)
    if list(loader.classes) != list(state["classes"]):
        raise ConfigError(f"{path} was trained on {len(state['classes'])} classes that differ from the "
                          f"{len(loader.classes)} classes of {shards}")
    models = []
    for e in entries:
        m = build_model(e["name"], len(loader.classes))
        m.load_state_dict(e["model"])
        models.append(m.to(device, memory_format=torch.channels_last))
    result = evaluate(models, loader, device, amp_dtype=precision_dtype("auto", device))
    result["skipped"] = len(loader.skipped)
    return path, [e["name"] for e in entries], result
