"""Top-1 / top-5 accuracy of each student and of their ensemble (mean of the softmaxes).

Counts stay on the device during the pass and are summed across DDP ranks at the end, so a run
on several GPUs reports the accuracy over the whole validation split.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many samples have their label among the top-k logits, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, :min(k, kmax)].any(dim=-1).sum() for k in ks])


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """autocast on the device when a low-precision dtype is given, else a no-op context."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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
            with autocast_for(device, amp_dtype):
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
    rows.append(f"({result['count']} validation images)")
    return "\n".join(rows)


def eval_checkpoint(path: str, *, shards: str | None = None, image_size: int | None = None, batch_size: int = 128,
                    backend: str = "auto", device: str = "auto",
                    num_workers: int | None = None) -> tuple[list[str], dict]:
    """The `kdpipe eval` job: the students of a kdpipe checkpoint (or one final-weights file) on the
    shards' val split. Shards and image size default to the run's own config."""
    from pipeline.augment import AugSpec
    from pipeline.loader import ImageNet100Loader

    from .checkpoint import load_checkpoint
    from .models import build_model

    state = load_checkpoint(path)
    cfg = state.get("config") or {}
    shards = shards or cfg.get("shards")
    if not shards:
        raise ValueError(f"{path} does not record its shards; pass --shards DIR")
    entries = state["students"] if "students" in state else [state]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    spec = AugSpec(image_size=image_size or cfg.get("image_size", AugSpec().image_size))
    loader = ImageNet100Loader(shards, "val", batch_size, backend=backend, device=dev, spec=spec, drop_last=False,
                               num_workers=num_workers)
    if list(loader.classes) != list(state["classes"]):
        raise ValueError(f"{path} was trained on {len(state['classes'])} classes that differ from the "
                         f"{len(loader.classes)} classes of {shards}")
    models = []
    for e in entries:
        m = build_model(e["name"], len(loader.classes))
        m.load_state_dict(e["model"])
        models.append(m.to(dev, memory_format=torch.channels_last))
    dtype = torch.bfloat16 if dev.type == "cuda" else None
    return [e["name"] for e in entries], evaluate(models, loader, dev, amp_dtype=dtype)
