"""Checkpoints and exported weights: written atomically, read with weights_only=True and clear errors.

Checkpoints (`checkpoint-last.pt`, `checkpoint-best.pt`) hold plain tensors, numbers, strings, lists and
dicts only. Final weights are exported twice: `student<i>-<name>.safetensors` (plain state_dict keys that load
straight into the registry's model, the class list in the metadata: what deployment tools read) and
`student<i>-<name>.pt` (a kdpipe weights file, usable as --teacher-weights).
"""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path

import torch

from pipeline.core.atomic import atomic_write_bytes
from pipeline.core.errors import CheckpointError, MissingDataError, one_line

CHECKPOINT_FORMAT = "kdpipe-checkpoint"
WEIGHTS_FORMAT = "kdpipe-weights"
LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; a legacy file's pickle protocol byte


def atomic_torch_save(obj: object, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_torch_file(path: str | Path, what: str = "checkpoint") -> object:
    """torch.load(path, weights_only=True) with one-line errors: missing, empty or truncated files, and files
    refused because unpickling them could run code (never advise weights_only=False)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted copy? Use another file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_FILE_STARTS):
        raise CheckpointError(f"{what} {path} is not a torch file (it starts with {head!r}, not a zip archive's or "
                              f"a pickle's header): give the file torch.save wrote")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols before refusing them
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(f"{what} {path} was refused as unsafe: it holds pickled Python objects beyond "
                                  f"tensors and plain containers, and loading those could run code; re-save "
                                  f"it as a plain state dict (torch.save(model.state_dict(), ...))") from None
        raise CheckpointError(f"{what} {path} is not a readable torch file ({one_line(e, 200)})") from None
    except Exception as e:  # torch and pickle raise many types for damaged files; all mean the same here
        raise CheckpointError(f"{what} {path} is not a readable torch file (truncated or not a checkpoint: "
                              f"{type(e).__name__}: {one_line(e, 160)})") from None


def load_checkpoint(path: str | Path) -> dict:
    """A kdpipe checkpoint or weights file, checked for its format marker."""
    obj = load_torch_file(path)
    if not isinstance(obj, dict) or obj.get("format") not in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT):
        raise CheckpointError(f"{path}: not a kdpipe checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    return obj


def final_weights_path(run: str | Path, index: int, name: str, suffix: str = ".pt") -> Path:
    return Path(run) / f"student{index}-{name.replace(':', '_').replace('/', '_')}{suffix}"


def sorted_safetensors_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with its header's metadata in sorted key order: safetensors writes the metadata
    from a Rust HashMap, whose order changes from one write to the next, so the same weights gave different
    bytes (and checksums). The tensors' entries and the data are kept as written; the header is re-padded with
    spaces to a multiple of 8 bytes, as safetensors pads it."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def save_final_weights(run: str | Path, index: int, name: str, state: dict, classes: list[str],
                       view: dict | None = None) -> Path:
    """A student's final weights as safetensors (plain state_dict keys, the classes in the metadata) and as a
    kdpipe weights file any of kdpipe's loaders accepts (teacher, eval). `view`: the image_size and val_resize
    it was trained at, so eval of the file alone (copied out of its run) sees the run's views. Returns the
    safetensors path."""
    from safetensors.torch import save as st_save

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    view = {k: view[k] for k in ("image_size", "val_resize") if k in view} if view else {}
    meta = {"format": WEIGHTS_FORMAT, "model": name, "classes": json.dumps(list(classes))}
    meta.update({k: str(v) for k, v in view.items()})  # safetensors metadata holds strings only
    st_path = final_weights_path(run, index, name, ".safetensors")
    atomic_write_bytes(st_path, sorted_safetensors_metadata(st_save(state, metadata=meta)))
    atomic_torch_save({"format": WEIGHTS_FORMAT, "name": name, "classes": list(classes), "model": state,
                       "view": view}, final_weights_path(run, index, name))
    return st_path


def load_safetensors_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state_dict, metadata) of an exported .safetensors file; the class list is metadata["classes"] (JSON)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({one_line(e, 160)})") from None
    return state, meta
