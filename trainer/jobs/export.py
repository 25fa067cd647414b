"""`kdpipe export`: a run's final students in a format deployment tools read, each checked against PyTorch.

Every run already writes `student<i>-<name>.safetensors` (plain state_dict keys; the class list in the
metadata). `--format onnx` (extra `onnx`: onnx, onnxscript, onnxruntime) turns each into
`student<i>-<name>.onnx` with torch's export-based ONNX exporter (a dynamic batch dimension, input "images"
NCHW normalised float32, output "logits"), then runs one seeded batch through onnxruntime and PyTorch and
refuses a file whose logits differ by more than `atol`.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import ConfigError, KdpipeError, MissingDataError
from pipeline.core.atomic import atomic_replace
from pipeline.core.log import get_logger
from pipeline.core.outdir import claim_dir

from trainer.engine.checkpoint import load_safetensors_weights
from trainer.engine.rundir import RunDir
from trainer.config import ExportConfig
from trainer.engine.models import rebuild_model

logger = get_logger(__name__)

EXPORT_MARKER = ".kdpipe-export"


def _require_onnx():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as e:
        raise ConfigError(f"--format onnx needs the `onnx` extra: pip install 'kdpipe[onnx]' ({e.name} is missing)") \
            from None
    return onnxruntime


def student_from_run(run: Path, index: int, name: str, num_classes: int) -> torch.nn.Module:
    """Student i of a finished run, rebuilt from its safetensors export (eval mode, CPU)."""
    path = RunDir(run).final_weights(index, name, ".safetensors")
    state, _ = load_safetensors_weights(path)
    return rebuild_model(name, num_classes, state, path=path)


def export_run(cfg: ExportConfig) -> list[Path]:
    """Write each student of cfg.run as ONNX into cfg.out (default: the run directory); returns the files."""
    ort = _require_onnx()
    run = Path(cfg.run)
    config_file = RunDir(run).config_path
    if not config_file.is_file():
        raise MissingDataError(f"{config_file} not found; is {run} a `kdpipe train` run?")
    config = json.loads(config_file.read_text())
    for i, name in enumerate(config["students"]):
        st = RunDir(run).final_weights(i, name, ".safetensors")
        if not st.is_file():
            raise MissingDataError(f"{st} not found: the run has not finished (final weights are written after "
                                   f"its last epoch)")
    out = Path(cfg.out) if cfg.out else run
    if os.path.realpath(out) != os.path.realpath(run):  # the run's own directory is export's default output
        claim_dir(out, EXPORT_MARKER, "exported models")
    written = []
    for i, name in enumerate(config["students"]):
        st = RunDir(run).final_weights(i, name, ".safetensors")
        _, meta = load_safetensors_weights(st)
        classes = json.loads(meta.get("classes", "[]"))
        model = student_from_run(run, i, name, len(classes))
        size = int(config.get("image_size", 224))
        x = torch.randn(cfg.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
        path = out / RunDir(run).final_weights(i, name, ".onnx").name
        tmp = path.with_name(f".{path.name}.tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), None, dynamo=True, input_names=["images"],
                                        output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
        program.save(str(tmp))
        try:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = session.run(None, {"images": x.numpy()})[0]
            with torch.no_grad():
                want = model(x).numpy()
            diff = float(np.abs(got - want).max())
            if not diff <= cfg.atol:
                raise KdpipeError(f"{path.name}: ONNX logits differ from PyTorch's by {diff:.3g} (> --atol "
                                  f"{cfg.atol}); not written")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        atomic_replace(tmp, path)
        written.append(path)
        logger.info(f"{path}: {name}, {len(classes)} classes, input images (batch, 3, {size}, {size}); "
                 f"max |onnx - torch| = {diff:.2e} on a batch of {cfg.batch_size}")
    return written
