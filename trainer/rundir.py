"""The run directory: one job at a time (an OS lock), config.json, metrics.jsonl, skipped.tsv, and the checks
that make `--resume` continue exactly the run that is there.

Every file is written atomically (temp name, fsync, rename): a crash leaves the old file or the new one.
"""
from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path

from pipeline.atomic import atomic_write_bytes, atomic_write_text
from pipeline.errors import CheckpointError, ConfigError, OutputExistsError
from pipeline.locks import exclusive_lock

from .checkpoint import LAST, load_checkpoint
from .config import TrainConfig, config_diff, to_json
from .metrics import EpochMetrics, read_metrics_path

CONFIG, METRICS, SKIPPED, LOCK = "config.json", "metrics.jsonl", "skipped.tsv", ".kdpipe.lock"


class RunDir:
    """RUN/ of one training run (see docs/train.md for its files)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def lock(self) -> AbstractContextManager:
        """Held by rank 0 for the whole run: a second job writing into the same directory is refused."""
        return exclusive_lock(self.path / LOCK, f"run directory {self.path}")

    def open(self, cfg: TrainConfig, classes: list[str], runtime: dict, *, resume: bool, write: bool) -> dict | None:
        """Start a new run (config.json, with the runtime facts) or, with resume, load RUN/checkpoint-last.pt
        and check that it belongs to this config, these classes and this world size. Returns the checkpoint."""
        last = self.path / LAST
        if resume and not last.is_file() and (self.path / CONFIG).is_file():
            # stopped before its first checkpoint (e.g. killed during epoch 0): nothing to continue, so the
            # same run starts again from its beginning, with the config it was given
            diff = config_diff(json.loads((self.path / CONFIG).read_text()), cfg)
            if diff:
                raise ConfigError(f"{self.path / CONFIG} was written by another config; differing fields: "
                                  f"{'; '.join(diff)}")
            resume = False
        if not resume:
            if last.is_file():
                raise OutputExistsError(f"{self.path} already holds a run ({last}); continue it with "
                                        f"`kdpipe train --out {self.path} --resume` or choose another --out")
            if write:  # records of an attempt that never reached a checkpoint are this run's to replace
                self.truncate_metrics(0)
                (self.path / SKIPPED).unlink(missing_ok=True)
                atomic_write_text(self.path / CONFIG, to_json(cfg, {"runtime": runtime}))
            return None
        if not last.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {last} and no {CONFIG}: is {self.path} a "
                                  f"`kdpipe train` run directory?")
        state = load_checkpoint(last)
        diff = config_diff(state.get("config", {}), cfg)
        if diff:
            raise ConfigError(f"{last} was written by another config; differing fields: {'; '.join(diff)}")
        if list(state.get("classes", [])) != list(classes):
            raise ConfigError(f"{last} was trained on other classes than the shards' {len(classes)}")
        before = (state.get("runtime") or {}).get("world_size", runtime["world_size"])
        if before != runtime["world_size"]:
            raise ConfigError(f"{self.path} was trained on {before} ranks; resume it on the same number (now "
                              f"{runtime['world_size']}): the epoch order and batches depend on it")
        return state

    # -- metrics.jsonl
    def read_metrics(self) -> list[EpochMetrics]:
        path = self.path / METRICS
        return read_metrics_path(path) if path.is_file() else []

    def append_metrics(self, record: EpochMetrics) -> None:
        """Append one epoch's record (the whole small file rewritten atomically)."""
        path = self.path / METRICS
        old = path.read_bytes() if path.is_file() else b""
        atomic_write_bytes(path, old + (record.to_line() + "\n").encode())

    def truncate_metrics(self, before_epoch: int) -> None:
        """Keep only epochs < before_epoch (a resumed run rewrites the epochs after its checkpoint)."""
        path = self.path / METRICS
        if path.is_file():
            keep = [r for r in self.read_metrics() if r.epoch < before_epoch]
            atomic_write_bytes(path, "".join(r.to_line() + "\n" for r in keep).encode())

    # -- skipped.tsv
    def record_skipped(self, epoch: int, skipped: list[tuple[int, str]]) -> None:
        """Add the corrupt samples an epoch dropped (--skip-corrupt) to RUN/skipped.tsv, replacing any rows of
        that epoch from before a resume."""
        path = self.path / SKIPPED
        if not skipped and not path.is_file():
            return
        rows = [line for line in (path.read_text().splitlines()[1:] if path.is_file() else [])
                if line and int(line.split("\t", 1)[0]) != epoch]
        rows += [f"{epoch}\t{sid}\t{' '.join(reason.split())}" for sid, reason in skipped]
        atomic_write_text(path, "epoch\tsample_id\treason\n" + "".join(r + "\n" for r in rows))

