"""Optional experiment tracking (`--tensorboard`, extra `tb`): per-step loss terms, lr and w, and per-epoch
accuracy and data share, written to RUN/tb. The step values come from the loop's step log at its existing
sync points, so tracking adds no device sync."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import ConfigError

from trainer.engine.losses import term_keys
from trainer.engine.metrics import EpochMetrics


class TensorBoard:
    def __init__(self, run: str | Path, names: list[str]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the `tb` extra: pip install 'kdpipe[tb]' "
                              "(or pip install tensorboard)") from None
        self.names = names
        self.writer = SummaryWriter(str(Path(run) / "tb"))

    def steps(self, global_steps: list[int], rows: np.ndarray, lrs: list[float]) -> None:
        """rows[k] = the term_keys() of every student at global_steps[k] (students x terms, flattened)."""
        terms = term_keys()
        for step, row, lr in zip(global_steps, rows, lrs):
            per = row.reshape(len(self.names), len(terms))
            for i, name in enumerate(self.names):
                for j, term in enumerate(terms):
                    if term != "w" or i == 0:
                        self.writer.add_scalar(f"train/{term}/{name}" if term != "w" else "train/w", per[i, j], step)
            self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, rec: EpochMetrics) -> None:
        for s in rec.students:
            for key in ("val_top1", "val_top5", "train_acc"):
                if getattr(s, key) is not None:
                    self.writer.add_scalar(f"epoch/{key}/{s.name}", getattr(s, key), rec.epoch)
        for key in ("val_ensemble_top1", "data_share", "images_per_s"):
            if getattr(rec, key) is not None:
                self.writer.add_scalar(f"epoch/{key}", getattr(rec, key), rec.epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
