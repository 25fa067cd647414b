"""The run directory's records: atomic checkpoints, config.json and metrics.jsonl.

Every file is written to a temporary name in the same directory, fsynced and renamed, so a crash
leaves either the old file or the new one, never half of one. Checkpoints load with
weights_only=True (plain tensors, numbers, strings, lists and dicts only).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from pipeline.atomic import atomic_write_bytes

CHECKPOINT_FORMAT = "kdpipe-checkpoint"
WEIGHTS_FORMAT = "kdpipe-weights"
LAST, BEST, CONFIG, METRICS = "checkpoint-last.pt", "checkpoint-best.pt", "config.json", "metrics.jsonl"


def atomic_torch_save(obj: object, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    """A kdpipe checkpoint or weights file, checked for its format marker."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") not in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT):
        raise ValueError(f"{path}: not a kdpipe checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    return obj


def write_metrics_line(run: str | Path, record: dict) -> None:
    """Append one epoch's record to RUN/metrics.jsonl (whole file rewritten atomically: it is small)."""
    path = Path(run) / METRICS
    old = path.read_bytes() if path.is_file() else b""
    atomic_write_bytes(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run: str | Path, before_epoch: int) -> None:
    """Keep only epochs < before_epoch (a resumed run rewrites the epochs after its checkpoint)."""
    path = Path(run) / METRICS
    if path.is_file():
        keep = [r for r in read_metrics(run) if r.get("epoch", -1) < before_epoch]
        atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep).encode())


def final_weights_path(run: str | Path, index: int, name: str) -> Path:
    return Path(run) / f"student{index}-{name}.pt"


def save_final_weights(run: str | Path, index: int, name: str, state: dict, classes: list[str]) -> Path:
    """A student's final weights as a small file any of kdpipe's loaders accepts (teacher, eval)."""
    path = final_weights_path(run, index, name)
    atomic_torch_save({"format": WEIGHTS_FORMAT, "name": name, "classes": list(classes), "model": state}, path)
    return path
