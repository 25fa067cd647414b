"""The metrics record: one typed definition of a `metrics.jsonl` line, shared by the writer (the training
loop), the report and the demo, so no field name is typed in three places.

On disk a line is flat JSON with one object per student under "s0", "s1", ... (docs/train.md lists every
field). Accuracies are in percent, times in seconds, entropies in nats; None (null) where a run has no such
thing (no teacher, no validation).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Fields that measure the machine, not the run: they differ between an interrupted and an uninterrupted run.
TIMING_FIELDS = ("epoch_time_s", "images_per_s", "data_time_s", "compute_time_s", "data_share", "peak_mem_mb",
                 "peak_mem_kind")


@dataclass
class StudentMetrics:
    """One student's epoch: per-sample means of its loss terms over the epoch's training batches, training
    accuracy on the augmented batches, and validation accuracy after the epoch.

    The terms are a mapping by name (trainer/engine/losses.py's registry: hard, teacher, peer, ...), flat beside
    the other keys on disk; any key of a line that is not a field here is read into `terms`, so files written
    with more or other terms read too."""

    name: str
    loss: float
    w: float | None  # mean teacher weight used (None: no teacher term)
    train_acc: float
    val_top1: float | None = None
    val_top5: float | None = None
    # e.g. hard (cross-entropy with the labels), teacher (w * tau^2 * KL; 0 without a teacher term), peer
    terms: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        """A loss term by name, like a field (s.hard, s.teacher), for readers such as the report's tables."""
        terms = self.__dict__.get("terms") or {}
        if key in terms:
            return terms[key]
        raise AttributeError(f"{type(self).__name__} has no field or loss term {key!r}")

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of one student (terms beside the fields)."""
        d = dataclasses.asdict(self)
        return {**d.pop("terms"), **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StudentMetrics":
        known = {f.name for f in dataclasses.fields(cls)} - {"terms"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   terms={k: v for k, v in d.items() if k not in known and k != "terms"})


@dataclass
class EpochMetrics:
    """One line of RUN/metrics.jsonl."""

    epoch: int  # 0-based
    lr: float  # at the epoch's end
    images: int  # training samples this epoch, all ranks
    students: list[StudentMetrics] = field(default_factory=list)
    val_ensemble_top1: float | None = None  # mean of the students' softmaxes
    val_ensemble_top5: float | None = None
    val_images: int | None = None
    w_mean: float | None = None  # mean teacher weight (None without a teacher)
    teacher_entropy_tau1: float | None = None  # mean teacher entropy at tau = 1 (nats)
    teacher_entropy_tau: float | None = None  # ... at the distillation temperature
    teacher_val: dict | None = None  # an online teacher's own validation accuracy, measured once
    skipped: int = 0  # corrupt training samples dropped this epoch (--skip-corrupt)
    epoch_time_s: float | None = None  # training time of the epoch (validation excluded)
    images_per_s: float | None = None  # training images per second, all ranks, data loading included
    data_time_s: float | None = None  # of epoch_time_s: the trainer waiting for the next batch
    compute_time_s: float | None = None  # of epoch_time_s: the steps (on CUDA, measured with events)
    data_share: float | None = None  # data_time_s / epoch_time_s
    peak_mem_mb: float | None = None
    peak_mem_kind: str | None = None  # cuda_max_allocated | cpu_max_rss

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of a metrics line (students as "s0", "s1", ...)."""
        d = dataclasses.asdict(self)
        d.pop("students")
        return {**d, **{f"s{i}": s.to_json() for i, s in enumerate(self.students)}}

    def to_line(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EpochMetrics":
        """Parse a metrics line (lines written before a field existed get its default)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"students"}
        students, i = [], 0
        while f"s{i}" in d:
            students.append(StudentMetrics.from_json(d[f"s{i}"]))
            i += 1
        return cls(students=students, **{k: v for k, v in d.items() if k in known})

    def without_timing(self) -> dict[str, Any]:
        """The record minus TIMING_FIELDS: what must be equal between a resumed and an uninterrupted run."""
        return {k: v for k, v in self.to_json().items() if k not in TIMING_FIELDS}


def read_metrics_file(text: str, source: str = "metrics.jsonl") -> list[EpochMetrics]:
    """All records of a metrics.jsonl text; a later line for the same epoch (a resume) wins. A line that
    does not parse raises ValueError naming `source` and the line number."""
    by_epoch: dict[int, EpochMetrics] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = EpochMetrics.from_json(json.loads(line))
            if not isinstance(rec.epoch, int) or isinstance(rec.epoch, bool):
                raise TypeError(f"epoch {rec.epoch!r} is not an integer")
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # a line of the wrong shape, too
            raise ValueError(f"{source}:{lineno}: not a metrics line ({e})") from e
        by_epoch[rec.epoch] = rec
    return [by_epoch[k] for k in sorted(by_epoch)]


def read_metrics_path(path: str | Path) -> list[EpochMetrics]:
    """RUN/metrics.jsonl's records for every reader (resume, report, demo): a damaged file is a RunFormatError,
    one line naming the file and the line (or byte) at fault."""
    from pipeline.core.errors import RunFormatError

    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise RunFormatError(f"{path}:{line}: not a metrics line (not UTF-8 text at byte {e.start}); fix or "
                             f"remove that line") from e
    try:
        return read_metrics_file(text, str(path))
    except ValueError as e:
        raise RunFormatError(f"{e}; fix or remove that line") from e
