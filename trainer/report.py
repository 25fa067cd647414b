"""`kdpipe report`: the paper's tables and plots, built only from what runs recorded.

Reads each RUN/config.json and RUN/metrics.jsonl (one JSON line per epoch, see docs/train.md) and,
where a run used a teacher cache, the cache's per-sample weights. Writes OUT/report.md with
Table I (top-1/top-5, baseline KD vs dual), Table II (time, images/s), Table III (the ablation ladder
hard -> +KD -> +uncertainty weight -> +peer), the teacher's uncertainty statistics, and PNG plots
(validation accuracy per epoch, histogram of w) when matplotlib is installed.
Every accuracy is the run's final epoch; the report names the file and epoch each number comes from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_write_text
from pipeline.learnable import DESCRIPTION_FILE

from . import report_plots as plots
from .report_teacher import sample_kinds, teacher_section, teacher_stats

LADDER = ("hard", "kd", "uw-kd", "dual")  # the paper's ablation order
LADDER_LABEL = {"hard": "hard labels", "kd": "+KD", "uw-kd": "+uncertainty weight", "dual": "+peer (dual)"}


@dataclass(frozen=True)
class Epoch:
    """One metrics line, reduced to what the report uses. Accuracies in percent; None when not logged."""

    epoch: int
    top1: dict[str, float]  # student name -> validation top-1
    top5: dict[str, float]
    ensemble_top1: float | None
    ensemble_top5: float | None
    images: int | None  # training images seen in the epoch
    epoch_time_s: float | None
    images_per_s: float | None
    w_mean: float | None
    entropy_tau1: float | None
    entropy_tau: float | None
    peak_mem_mb: float | None = None
    teacher_val: dict | None = None  # an online teacher's evaluation ({"top1": [..], "top5": [..]})


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict
    epochs: tuple[Epoch, ...]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def mode(self) -> str:
        return str(self.config.get("mode", "?"))

    @property
    def students(self) -> tuple[str, ...]:
        return tuple(self.config.get("students", ()))

    @property
    def final(self) -> Epoch:
        return self.epochs[-1]

    @property
    def train_time_s(self) -> float | None:
        times = [e.epoch_time_s for e in self.epochs]
        return None if any(t is None for t in times) else float(sum(times))

    @property
    def images_per_s(self) -> float | None:
        """All training images over all epoch time (falls back to the mean of the per-epoch figures)."""
        imgs, t = [e.images for e in self.epochs], self.train_time_s
        if t and all(i is not None for i in imgs):
            return sum(imgs) / t
        per = [e.images_per_s for e in self.epochs if e.images_per_s is not None]
        return float(np.mean(per)) if per else None


def _num(x) -> float | None:
    return None if x is None else float(x)


def parse_epoch(line: dict, students: tuple[str, ...]) -> Epoch:
    """Map one metrics.jsonl line onto Epoch (the single place that knows the trainer's field names).

    The trainer writes per student i a dict "s<i>" (name, loss terms, train_acc, val_top1, val_top5),
    and top-level val_ensemble_top1/5, images, epoch_time_s, images_per_s, w_mean, teacher_entropy_tau1/tau.
    """
    per = [line[f"s{i}"] for i in range(len(students))]
    return Epoch(
        epoch=int(line["epoch"]),
        top1={s: float(d["val_top1"]) for s, d in zip(students, per)},
        top5={s: float(d["val_top5"]) for s, d in zip(students, per)},
        ensemble_top1=_num(line.get("val_ensemble_top1")) if len(students) > 1 else None,
        ensemble_top5=_num(line.get("val_ensemble_top5")) if len(students) > 1 else None,
        images=None if line.get("images") is None else int(line["images"]),
        epoch_time_s=_num(line.get("epoch_time_s")), images_per_s=_num(line.get("images_per_s")),
        w_mean=_num(line.get("w_mean")), entropy_tau1=_num(line.get("teacher_entropy_tau1")),
        entropy_tau=_num(line.get("teacher_entropy_tau")), peak_mem_mb=_num(line.get("peak_mem_mb")),
        teacher_val=line.get("teacher_val"),
    )


def load_run(path: str | Path) -> Run:
    """Read RUN/config.json and RUN/metrics.jsonl; a later line for the same epoch (a resume) wins."""
    path = Path(path)
    cfg_file, met_file = path / "config.json", path / "metrics.jsonl"
    for f in (cfg_file, met_file):
        if not f.is_file():
            raise FileNotFoundError(f"run {path}: {f.name} not found (is this a `kdpipe train --out` directory?)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    students = tuple(config.get("students", ()))
    if len(set(students)) != len(students):
        students = tuple(f"{s}#{i}" for i, s in enumerate(students))
    by_epoch: dict[int, Epoch] = {}
    for lineno, text in enumerate(met_file.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            e = parse_epoch(json.loads(text), students)
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{met_file}:{lineno}: cannot read this metrics line ({err!r})") from err
        by_epoch[e.epoch] = e
    if not by_epoch:
        raise ValueError(f"{met_file}: no epochs recorded yet")
    return Run(path=path, config={**config, "students": list(students)},
               epochs=tuple(by_epoch[k] for k in sorted(by_epoch)))


# ------------------------------------------------------------------------------------- numbers


def results_by(runs: list[Run]) -> dict[tuple[str, str], list[tuple[Run, Epoch]]]:
    """(mode, student) -> the runs that trained that student in that mode (final epochs)."""
    out: dict[tuple[str, str], list[tuple[Run, Epoch]]] = {}
    for r in runs:
        for s in r.students:
            out.setdefault((r.mode, s), []).append((r, r.final))
    return out


def _mean_acc(entries: list[tuple[Run, Epoch]], student: str, k: int) -> float | None:
    vals = [(e.top1 if k == 1 else e.top5)[student] for _, e in entries]
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------------------------- markdown


def _f(x: float | None, nd: int = 2, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def table_one(runs: list[Run], teacher: Run | None) -> list[str]:
    """Table I: per student, baseline KD vs dual, top-1/top-5 and the improvement."""
    res = results_by(runs)
    students = sorted({s for (m, s) in res if m in ("kd", "dual")}, key=_student_order(runs))
    rows, notes = [], []
    for s in students:
        kd1, kd5 = _mean_acc(res.get(("kd", s), []), s, 1), _mean_acc(res.get(("kd", s), []), s, 5)
        du1, du5 = _mean_acc(res.get(("dual", s), []), s, 1), _mean_acc(res.get(("dual", s), []), s, 5)
        d1 = None if kd1 is None or du1 is None else du1 - kd1
        d5 = None if kd5 is None or du5 is None else du5 - kd5
        rows.append([s, _f(kd1), _f(kd5), _f(du1), _f(du5), _f(d1, sign=True), _f(d5, sign=True)])
        if d1 is not None and d1 < 0:
            notes.append(f"- {s}: here the dual method is {-d1:.2f} points below baseline KD in top-1; "
                         "the paper reports the dual method above baseline KD for both students.")
    for r in runs:
        if r.mode == "dual" and r.final.ensemble_top1 is not None:
            rows.append([f"ensemble ({r.name})", "—", "—", _f(r.final.ensemble_top1), _f(r.final.ensemble_top5),
                         "—", "—"])
    out = ["## Table I: top-1 / top-5 accuracy (%), baseline KD vs uncertainty-aware dual-student KD", ""]
    out += _table(["student", "KD top-1", "KD top-5", "dual top-1", "dual top-5", "Δ top-1", "Δ top-5"], rows)
    out.append("")
    if teacher is not None:
        out += [f"Teacher {s} (run {teacher.name}): top-1 {_f(teacher.final.top1[s])}, top-5 "
                f"{_f(teacher.final.top5[s])}." for s in teacher.students] + [""]
    else:
        online = next((r for r in runs if r.final.teacher_val), None)
        if online is not None:
            tv = online.final.teacher_val
            out += [f"Teacher (online, measured by run {online.name}): top-1 {_f(tv['top1'][0])}, "
                    f"top-5 {_f(tv['top5'][0])}.", ""]
    return out + (notes + [""] if notes else [])


def table_two(runs: list[Run]) -> list[str]:
    rows = []
    for r in runs:
        n_img = [e.images for e in r.epochs]
        peak = max((e.peak_mem_mb for e in r.epochs if e.peak_mem_mb is not None), default=None)
        rows.append([r.name, r.mode, ", ".join(r.students), str(len(r.epochs)),
                     "—" if None in n_img else str(sum(n_img)), _f(r.train_time_s, 1), _f(r.images_per_s, 1),
                     _f(None if r.train_time_s is None else r.train_time_s / len(r.epochs), 1), _f(peak, 0)])
    out = ["## Table II: training time and throughput per run", ""]
    out += _table(["run", "mode", "students", "epochs", "train images", "train time (s)", "images/s", "s/epoch",
                   "peak memory (MB)"], rows)
    return out + ["", "Train time is the sum of the epochs' training time as the trainer measured it (validation "
                  "excluded); images/s is training images over that time, each image counted once however many "
                  "students it trains. Peak memory: the trainer's figure (GPU allocated on CUDA, process max RSS "
                  "on the CPU).", ""]


def table_three(runs: list[Run]) -> list[str]:
    res = results_by(runs)
    students = sorted({s for (_, s) in res}, key=_student_order(runs))
    rows, notes = [], []
    for s in students:
        accs = [_mean_acc(res.get((m, s), []), s, 1) for m in LADDER]
        if sum(a is not None for a in accs) < 2:
            continue
        cells, prev = [s], None
        for m, a in zip(LADDER, accs):
            delta = "" if a is None or prev is None else f" ({a - prev:+.2f})"
            cells.append(_f(a) + delta)
            if a is not None and prev is not None and a < prev:
                notes.append(f"- {s}: {LADDER_LABEL[m]} is {prev - a:.2f} points below the rung before it; "
                             "in the paper every rung improves on the one before.")
            prev = a if a is not None else prev
        rows.append(cells)
    out = ["## Table III: ablation ladder, top-1 % (change from the previous rung)", ""]
    out += _table(["student"] + [LADDER_LABEL[m] for m in LADDER], rows)
    return out + [""] + (notes + [""] if notes else [])


def epochs_section(runs: list[Run], plot_png: str | None) -> list[str]:
    out = ["## Validation top-1 per epoch", ""]
    if plot_png:
        out += [f"![validation accuracy per epoch]({plot_png})", ""]
    width = max(len(r.epochs) for r in runs)
    header = ["run", "student"] + [str(e + 1) for e in range(width)]
    rows = []
    for r in runs:
        series = [(s, [e.top1[s] for e in r.epochs]) for s in r.students]
        if len(r.students) > 1:
            series.append(("ensemble", [e.ensemble_top1 for e in r.epochs]))
        rows += [[r.name, s] + [_f(v, 1) for v in vals] + [""] * (width - len(vals)) for s, vals in series]
    return out + _table(header, rows) + [""]


def _student_order(runs: list[Run]):
    order = {s: i for i, s in enumerate(dict.fromkeys(s for r in runs for s in r.students))}
    return lambda s: order.get(s, len(order))


# ------------------------------------------------------------------------------------- the job


def _cache_of(runs: list[Run]) -> tuple[str, float, str] | None:
    """The first teacher cache a run names that still exists, with that run's tau and shards."""
    for r in runs:
        c = r.config.get("teacher_cache")
        if c and Path(c).exists():
            return c, float(r.config.get("loss", {}).get("tau", 4.0)), str(r.config.get("shards", ""))
    return None


def _teacher_run(runs: list[Run], cache: str | None) -> Run | None:
    """The run that trained the teacher: its directory holds another run's --teacher-weights, or its final
    weights are the ones the teacher cache was made from (sha256 in the cache's fingerprint)."""
    for r in runs:
        for other in runs:
            tw = other.config.get("teacher_weights")
            if other is not r and tw and Path(tw).resolve().parent == r.path.resolve():
                return r
    if cache is None:
        return None
    from pipeline.teacher_cache import TeacherCache

    from .cache_teacher import file_sha256
    from .checkpoint import final_weights_path

    with TeacherCache(cache, prefetch=False) as tc:
        want = tc.fingerprint.get("weights_sha256")
    for r in runs:
        if r.mode == "hard" and len(r.students) == 1:
            f = final_weights_path(r.path, 0, r.students[0])
            if want and f.is_file() and file_sha256(f) == want:
                return r
    return None


def _ordered(runs: list[Run], teacher: Run | None) -> list[Run]:
    """Teacher first, then the ladder's order (hard, kd, uw-kd, dual), then anything else; stable."""
    rank = {m: i for i, m in enumerate(LADDER)}
    return sorted(runs, key=lambda r: (r is not teacher, rank.get(r.mode, len(LADDER))))


def write_report(run_dirs: list[str | Path], out: str | Path, *, teacher: str | Path | None = None,
                 low_w: float = 0.5, learnable: str | Path | None = None, appendix: list[str] | None = None) -> Path:
    """Build OUT/report.md (+ PNGs when matplotlib is there) from the runs; returns the report's path.

    learnable: the learnable dataset's tree (or its learnable.json) the shards came from, to split the
    teacher statistics into clean and ambiguous samples. appendix: markdown lines put at the end."""
    if not run_dirs:
        raise ValueError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    if teacher is not None and Path(teacher).resolve() not in {p.resolve() for p in paths}:
        paths.insert(0, Path(teacher))
    runs = [load_run(p) for p in paths]
    cache = _cache_of(runs)
    if teacher is not None:
        teacher_run = next(r for r in runs if r.path.resolve() == Path(teacher).resolve())
    else:
        teacher_run = _teacher_run(runs, cache[0] if cache else None)
    runs = _ordered(runs, teacher_run)
    students_runs = [r for r in runs if r is not teacher_run]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = None
    if cache and learnable is not None:
        desc = Path(learnable)
        desc = desc / DESCRIPTION_FILE if desc.is_dir() else desc
        kinds = sample_kinds(cache[2], desc)
    stats = teacher_stats(cache[0], cache[1], low_w, kinds) if cache else None
    acc_png = "val_accuracy.png" if plots.plot_accuracy(students_runs or runs, out / "val_accuracy.png") else None
    hist_png = "w_histogram.png" if stats is not None and plots.plot_w_hist(stats, out / "w_histogram.png") else None

    lines = ["# kdpipe report", "", "Runs (every number below comes from these files; accuracies are each run's "
             "final epoch):", ""]
    for r in runs:
        lines.append(f"- `{r.path}`: mode {r.mode}, students {', '.join(r.students)}, {len(r.epochs)} epoch(s), "
                     f"final epoch {r.final.epoch + 1} from `{r.path / 'metrics.jsonl'}`"
                     + (" (teacher)" if r is teacher_run else ""))
    lines.append("")
    if acc_png is None or (stats is not None and hist_png is None):
        lines += ["Plots skipped: matplotlib is not installed (`pip install 'kdpipe[plots]'`).", ""]
    lines += table_one(students_runs, teacher_run)
    lines += table_two(runs)
    lines += table_three(students_runs)
    lines += teacher_section(students_runs, stats, hist_png, _table)
    lines += epochs_section(runs, acc_png)
    lines += appendix or []
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
