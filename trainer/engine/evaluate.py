"""Top-1 / top-5 accuracy of each student and of their ensemble (mean of the softmaxes).

Counts stay on the device during the pass and are summed across DDP ranks at the end, so a run
on several GPUs reports the accuracy over the whole validation split.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.core.errors import CheckpointError, ConfigError, DataError

from trainer.config import EvalConfig
from trainer.engine.runtime import all_reduce_sum_, autocast, precision_dtype, resolve_device


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
    all_reduce_sum_(counts, seen)
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


def require_val_samples(loader, shards: str | Path) -> None:
    """Refuse a validation split without samples before anything trains or reports: its accuracy would read
    0.00 % of 0 images, a number that looks measured."""
    if loader.num_samples == 0:
        raise DataError(f"{shards}: the val split has 0 samples, so no accuracy can be measured; shard the data "
                        f"again with a val/ folder, or with more images a class or a larger --val-share so that "
                        f"every class keeps at least one validation image")


def require_train_samples(loader, shards: str | Path) -> None:
    """Refuse a train split that cannot teach a classifier, before any model or store exists: no samples (a
    shard run that rejected every file) or one class (w = 1 - H / log C needs C >= 2)."""
    if loader.num_samples == 0:
        raise DataError(f"{shards}: the train split has 0 samples (see its rejected.tsv for the files `kdpipe shard` "
                        f"could not use); shard a tree with readable training images")
    if len(loader.classes) < 2:
        raise DataError(f"{shards}: the shards hold {len(loader.classes)} class; a classifier (and the teacher's "
                        f"confidence w = 1 - H / log C) needs at least 2: shard a tree with 2 or more classes")


def load_students(path: Path) -> tuple[list[dict], list[str], dict, dict]:
    """(entries {"name", "model"}, classes, the run's config, the inputs it recorded) of a kdpipe checkpoint or
    final-weights file (.pt or .safetensors). Final weights inside a run directory take the run's config.json
    for their defaults (shards, image size) and recorded inputs; elsewhere only the view they record (image
    size, validation resize) stands in for the config."""
    import json

    from trainer.engine.checkpoint import WEIGHTS_FORMAT, load_checkpoint, load_safetensors_weights
    from trainer.engine.inputs import recorded_inputs
    from trainer.engine.rundir import RunDir

    if path.suffix == ".safetensors":
        model, meta = load_safetensors_weights(path)
        if meta.get("format") != WEIGHTS_FORMAT or "model" not in meta or "classes" not in meta:
            raise CheckpointError(f"{path}: not a kdpipe final-weights file (its metadata has no model name and "
                                  f"class list); evaluate the run's checkpoint instead (--run RUN)")
        view = {k: meta[k] for k in ("image_size", "val_resize") if k in meta}
        if "image_size" in view:
            view["image_size"] = int(view["image_size"])
        state = {"name": meta["model"], "model": model, "classes": json.loads(meta["classes"]), "view": view}
    else:
        state = load_checkpoint(path)
    entries = state["students"] if "students" in state else [state]
    if "config" in state:
        return entries, list(state["classes"]), state.get("config") or {}, recorded_inputs(state)
    run = RunDir(path.parent).config() if RunDir(path.parent).marked() else None
    return entries, list(state["classes"]), run or state.get("view") or {}, recorded_inputs(run)


def eval_precision(cfg: EvalConfig, run_cfg: dict, device: torch.device) -> torch.dtype:
    """The dtype eval computes in: --amp when given, else the run's own --amp (its accuracy is the one training
    measured), else auto."""
    return precision_dtype(cfg.amp or run_cfg.get("amp") or "auto", device, flag="--amp")


def eval_checkpoint(cfg: EvalConfig) -> tuple[Path, list[str], dict]:
    """The `kdpipe eval` job: the students of a kdpipe checkpoint (or one final-weights file, .pt or
    .safetensors) on the shards' val split. Shards, image size and validation resize default to the run's own
    config; the run's own shards are checked against the manifest sha256 it recorded. Returns (the checkpoint
    evaluated, student names, the result of `evaluate`)."""
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    from trainer.engine.checkpoint import LAST, BEST
    from trainer.engine.inputs import check_inputs
    from trainer.engine.models import rebuild_model

    path = Path(cfg.checkpoint) if cfg.checkpoint else Path(cfg.run) / (LAST if cfg.which == "last" else BEST)
    entries, classes, run_cfg, recorded = load_students(path)
    shards = cfg.shards or run_cfg.get("shards")
    if not shards:
        raise ConfigError(f"{path} does not record its shards; pass --shards DIR")
    if not cfg.image_size and not run_cfg.get("image_size"):  # a weights file of an older kdpipe, on its own
        raise ConfigError(f"{path} does not record the image size it was trained at; pass --image-size N (a "
                          f"model scored at another size than it learned reads lower)")
    device = resolve_device(cfg.device)
    spec = AugSpec(image_size=cfg.image_size or run_cfg["image_size"],
                   val_resize_mode=cfg.val_resize or run_cfg.get("val_resize", "shorter"))
    loader = ImageNet100Loader(shards, "val", cfg.batch_size, backend=cfg.backend, device=device, spec=spec,
                               drop_last=False, num_workers=cfg.num_workers, skip_corrupt=cfg.skip_corrupt)
    if not cfg.shards and recorded.get("shards"):  # the run's own shards: still what it trained on?
        check_inputs({"shards": recorded["shards"]}, {"shards": {"path": shards,
                                                                "manifest_sha256": loader.manifest_sha256}},
                     path, "the shards changed since the run read them: restore them, or pass --shards DIR to "
                           "evaluate on other shards deliberately")
    require_val_samples(loader, shards)
    if list(loader.classes) != classes:
        from trainer.engine.models import class_difference

        where = class_difference(classes, list(loader.classes))
        raise ConfigError(f"{path} was trained on {len(classes)} classes that differ from the "
                          f"{len(loader.classes)} classes of {shards} ({where})")
    models = []
    for e in entries:
        m = rebuild_model(e["name"], len(loader.classes), e["model"], path=path)
        models.append(m.to(device, memory_format=torch.channels_last))
    result = evaluate(models, loader, device, amp_dtype=eval_precision(cfg, run_cfg, device))
    result["skipped"] = len(loader.skipped)
    return path, [e["name"] for e in entries], result
