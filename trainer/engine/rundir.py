"""The run directory: one job at a time (an OS lock), its marker, config.json, metrics.jsonl, skipped.tsv, and
the checks that make `--resume` continue exactly the run that is there, on the inputs it recorded.

The one place that knows the run's file names and claims the directory: a run is written only into a new or
empty directory, or one marked `.kdpipe-run` (pipeline/core/outdir.py). Every file is written atomically (temp
name, fsync, rename): a crash leaves the old file or the new one.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from contextlib import AbstractContextManager
from pathlib import Path

from pipeline.core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.core.errors import CheckpointError, ConfigError, MissingDataError, OutputExistsError
from pipeline.core.locks import exclusive_lock
from pipeline.core.names import tsv_row
from pipeline.core.outdir import check_claimable, claim_dir

from trainer.engine.checkpoint import BEST, LAST, final_weights_path, load_checkpoint
from trainer.config import TrainConfig, config_diff, to_record
from trainer.engine.inputs import check_inputs, recorded_inputs
from trainer.engine.metrics import EpochMetrics, read_metrics_path

CONFIG, METRICS, SKIPPED, LOCK, MARKER = "config.json", "metrics.jsonl", "skipped.tsv", ".kdpipe.lock", ".kdpipe-run"
WHAT = "a training run"


def directory_lock(path: str | Path, what: str | None = None) -> AbstractContextManager:
    """The one writer lock of a kdpipe output directory (a run, a report: the same `.kdpipe.lock`, so a report
    into a run being trained is refused too); BusyError while another job holds it."""
    return exclusive_lock(Path(path) / LOCK, what or f"directory {path}")


class RunDir:
    """RUN/ of one training run (see docs/train.md for its files); its attributes name them, so no other module
    spells a run file's name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path, self.metrics_path = self.path / CONFIG, self.path / METRICS
        self.skipped_path, self.lock_path = self.path / SKIPPED, self.path / LOCK
        self.last, self.best = self.path / LAST, self.path / BEST

    def final_weights(self, index: int, name: str, suffix: str = ".pt") -> Path:
        """RUN/student<index>-<name><suffix>: a finished run's final weights (.pt or .safetensors)."""
        return final_weights_path(self.path, index, name, suffix)

    def lock(self) -> AbstractContextManager:
        """Held by rank 0 for the whole run: a second job writing into the same directory is refused."""
        return directory_lock(self.path, f"run directory {self.path}")

    # -- the claim
    def _legacy(self, path: Path) -> bool:
        """A run of a kdpipe from before the marker: it holds a checkpoint or final weights kdpipe wrote."""
        return (path / LAST).is_file() or any(path.glob("student[0-9]*-*.safetensors"))

    def is_run(self) -> bool:
        """True when the directory is a kdpipe run (marked, or an older run); False if new or empty; an
        OutputExistsError naming it when it holds anything else."""
        return check_claimable(self.path, MARKER, WHAT, legacy=self._legacy)

    def marked(self) -> bool:
        """True for a directory a kdpipe run wrote (its marker, or an older run's files); never raises."""
        return (self.path / MARKER).is_file() or (self.path.is_dir() and self._legacy(self.path))

    def claim(self) -> None:
        """Mark the directory as this run's (created if needed), or refuse a directory kdpipe did not make."""
        claim_dir(self.path, MARKER, WHAT, legacy=self._legacy)

    def config(self) -> dict | None:
        """RUN/config.json as a dict, or None when absent or unreadable."""
        try:
            data = json.loads((self.path / CONFIG).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def open(self, cfg: TrainConfig, classes: list[str], runtime: dict, *, resume: bool, write: bool) -> dict | None:
        """Start a new run (config.json, with the runtime facts) or, with resume, load RUN/checkpoint-last.pt
        and check that it belongs to this config, these classes, these inputs and this world size. Returns the
        checkpoint. The directory is claimed first (by rank 0, the one that writes)."""
        if write:
            self.claim()
        last = self.path / LAST
        if resume:
            self.check_inputs(runtime.get("inputs") or {})
        if resume and not last.is_file() and (self.path / CONFIG).is_file():
            # stopped before its first checkpoint (e.g. killed during epoch 0): nothing to continue, so the
            # same run starts again from its beginning, with the config it was given
            self.refuse_lost_checkpoint()
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
                atomic_write_json(self.path / CONFIG, to_record(cfg, {"runtime": runtime}), indent=2)
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
        if write:
            self.complete_best(state)
        return state

    def refuse_lost_checkpoint(self) -> None:
        """With no checkpoint-last.pt, a run that had one (more than one finished epoch: the first checkpoint
        follows the first metrics line; or a best checkpoint, always written after the last) lost it: starting
        again would replace what it trained, so refuse naming what is still there."""
        epochs = len(self.read_metrics())
        best = (self.path / BEST).is_file()
        if epochs < 2 and not best:
            return  # stopped before its first checkpoint: starting again loses nothing
        held = [f"{epochs} finished epoch(s) in {METRICS}"] if epochs else []
        held += [BEST] if best else []
        raise MissingDataError(f"--resume: {self.path / LAST} is missing, but {self.path} still holds "
                               f"{' and '.join(held)}, which starting again would replace; restore {LAST} to "
                               f"continue, or train into a new --out (`kdpipe train --config "
                               f"{self.path / CONFIG} --out NEW`)")

    def check_inputs(self, now: dict, *, only: Collection[str] | None = None,
                     given: Collection[str] | None = None) -> None:
        """Refuse to continue on inputs other than those the run recorded (config.json, else its checkpoint).
        `only`: check just these inputs (the shards, before a teacher is loaded for their classes); `given`:
        the inputs named on the command line (see inputs.check_inputs), None for all."""
        where = self.path / CONFIG
        recorded = recorded_inputs(self.config())
        if not recorded and (self.path / LAST).is_file():
            where, recorded = self.path / LAST, recorded_inputs(load_checkpoint(self.path / LAST))
        if recorded and only is not None:
            recorded, now = ({k: v for k, v in d.items() if k in only} for d in (recorded, now))
        if recorded:
            check_inputs(recorded, now, where, "resume with the run's own inputs (a bare `--resume` uses them), "
                                               "or start a new run with another --out", given=given,
                         changed_fix="restore it, or start a new run on today's content with another --out")

    def complete_best(self, state: dict) -> None:
        """checkpoint-best.pt as an uninterrupted run leaves it: when the epoch just before the resumed position
        was the best so far, the best checkpoint is the last one (both were saved from the same state), so a
        best file lost to a crash between the two writes (a full disk) or left behind in a copy is rebuilt."""
        if state.get("step") != 0 or not state.get("epoch"):
            return
        scores = [r.val_ensemble_top1 for r in self.read_metrics() if r.epoch < state["epoch"]]
        if len(scores) != state["epoch"] or scores.index(max(scores)) != state["epoch"] - 1:
            return
        best = self.path / BEST
        if best.is_file():
            try:
                if load_checkpoint(best).get("epoch") == state["epoch"]:
                    return
            except CheckpointError:
                pass  # damaged: rebuilt below
        atomic_write_bytes(best, (self.path / LAST).read_bytes())

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
        rows += [tsv_row(epoch, sid, " ".join(reason.split())).rstrip("\n") for sid, reason in skipped]
        atomic_write_text(path, "epoch\tsample_id\treason\n" + "".join(r + "\n" for r in rows))

