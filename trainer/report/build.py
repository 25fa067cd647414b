"""`kdpipe report`: the paper's tables and plots, built only from what runs recorded.

Reads each RUN/config.json and RUN/metrics.jsonl (through trainer.engine.metrics, the one definition of a metrics
line) and, where a run used a teacher cache, the cache's per-sample weights. Writes OUT/report.md: the
assumptions table, Table I (baseline KD vs dual), Table II (time, images/s), Table III (the ablation ladder
with each rung's change, a 95 % interval and a verdict), convergence (final training loss), Table IV
(parameters and compression), the teacher's uncertainty (statistics, histogram, the most and least confident
training views), and accuracy per epoch. Runs of one mode with different seeds are pooled (mean ± sd);
the statistics are in trainer/report/stats.py. Every accuracy is a run's final epoch (a run that has not
trained every epoch of its config is refused: check_finished); the report names the file each number comes from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import ConfigError, MissingDataError, RunFormatError
from pipeline.sources.learnable import DESCRIPTION_FILE
from pipeline.core.outdir import claim_dir

from trainer.report import plots
from trainer.report import tables
from trainer.report.assumptions import report_section
from trainer.engine.metrics import EpochMetrics, StudentMetrics, read_metrics_path
from trainer.engine.rundir import RunDir, directory_lock
from trainer.report.teacher import sample_kinds, teacher_section, teacher_stats
from trainer.report.views import teacher_views_section

LADDER = tables.LADDER
REPORT_MARKER = ".kdpipe-report"


@dataclass(frozen=True)
class Run:
    """One run directory: its config.json and its epochs (a later metrics line for an epoch wins)."""

    path: Path
    config: dict
    epochs: tuple[EpochMetrics, ...]
    students: tuple[str, ...]  # names as shown; a name used twice in one run becomes "name#i"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def mode(self) -> str:
        return str(self.config.get("mode", "?"))

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def final(self) -> EpochMetrics:
        return self.epochs[-1]

    def student(self, name: str, epoch: EpochMetrics | None = None) -> StudentMetrics:
        return (epoch or self.final).students[self.students.index(name)]

    def acc(self, name: str, k: int = 1, epoch: EpochMetrics | None = None) -> float | None:
        """Validation top-k (%) of a student at an epoch (default the final one); None if not measured."""
        s = self.student(name, epoch)
        return s.val_top1 if k == 1 else s.val_top5

    @property
    def runtime(self) -> dict:
        return self.config.get("runtime") or {}

    @property
    def reused_views(self) -> bool:
        """True when training repeated augmented views (fewer distinct views per sample than epochs); without
        the runtime record (older runs), when the run allowed it (reuse_views)."""
        vps = self.runtime.get("views_per_sample")
        return int(vps) < len(self.epochs) if vps is not None else bool(self.config.get("reuse_views"))

    @property
    def train_time_s(self) -> float | None:
        times = [e.epoch_time_s for e in self.epochs]
        return None if any(t is None for t in times) else float(sum(times))

    @property
    def images_per_s(self) -> float | None:
        """All training images over all epoch time (falls back to the mean of the per-epoch figures)."""
        t = self.train_time_s
        if t:
            return sum(e.images for e in self.epochs) / t
        per = [e.images_per_s for e in self.epochs if e.images_per_s is not None]
        return sum(per) / len(per) if per else None


def load_run(path: str | Path) -> Run:
    """Read RUN/config.json and RUN/metrics.jsonl; a later line for the same epoch (a resume) wins."""
    path = Path(path)
    cfg_file, met_file = RunDir(path).config_path, RunDir(path).metrics_path
    for f in (cfg_file, met_file):
        if not f.is_file():
            raise MissingDataError(f"run {path}: {f.name} not found (is this a `kdpipe train --out` directory?)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{cfg_file}: not valid JSON ({e}); rerun the job or restore the file") from e
    students = tuple(config.get("students", ()))
    if len(set(students)) != len(students):
        students = tuple(f"{s}#{i}" for i, s in enumerate(students))
    epochs = read_metrics_path(met_file)
    if not epochs:
        raise RunFormatError(f"{met_file}: no epochs recorded yet; report a run after its first epoch")
    if not epochs[-1].val_images:
        raise RunFormatError(f"{met_file}: epoch {epochs[-1].epoch} measured its accuracy on 0 validation images; "
                             f"train on shards with a val split that has samples")
    bad = [e.epoch for e in epochs if len(e.students) != len(students)]
    if bad:
        raise RunFormatError(f"{met_file}: epoch {bad[0]} has {len(epochs[0].students)} students, config.json "
                             f"names {len(students)}; is this metrics file from another run?")
    return Run(path=path, config=config, epochs=tuple(epochs), students=students)


def epochs_done(run: Run) -> tuple[int, int] | None:
    """(epochs recorded, epochs configured) of a run; None when its config names no epoch count (older formats)."""
    planned = run.config.get("epochs")
    if not isinstance(planned, int) or isinstance(planned, bool):
        return None
    return len({e.epoch for e in run.epochs} & set(range(planned))), planned


def check_finished(runs: list[Run]) -> None:
    """Refuse runs that have not trained every epoch of their config (stopped, or still training): the report takes
    each run's last epoch as its result, so an unfinished run would be pooled with finished ones as if it were one."""
    short = [(r, d) for r in runs if (d := epochs_done(r)) is not None and d[0] < d[1]]
    if short:
        named = "; ".join(f"{r.path} has {n} of {m} epochs" for r, (n, m) in short)
        fix = f"`kdpipe train --out {short[0][0].path} --resume`" if len(short) == 1 else \
            "`kdpipe train --out RUN --resume`"
        raise RunFormatError(f"{named} (unfinished or still training): finish {'it' if len(short) == 1 else 'them'} "
                             f"with {fix}, or leave {'it' if len(short) == 1 else 'them'} out")


# ------------------------------------------------------------------------------------- finding things

def dataset_of(run: Run) -> str | None:
    """The identity of the data a run trained on: the manifest sha256 it recorded (runs of older versions:
    that of the manifest still at its recorded shards path, if any); None when unknown."""
    from pipeline.reader.index import manifest_sha256

    from trainer.engine.inputs import recorded_inputs

    recorded = recorded_inputs(run.config).get("shards") or {}
    if recorded.get("manifest_sha256"):
        return str(recorded["manifest_sha256"])
    shards = run.config.get("shards")
    if shards and (Path(shards) / "manifest.json").is_file():
        return manifest_sha256(shards)
    return None


def check_one_dataset(runs: list[Run]) -> None:
    """Refuse runs of different datasets in one report (their accuracies would be pooled into one cell),
    naming two runs that differ."""
    known = [(r, d) for r in runs if (d := dataset_of(r)) is not None]
    for r, d in known[1:]:
        if d != known[0][1]:
            first = known[0][0]
            raise RunFormatError(f"runs {first.path} and {r.path} were trained on different datasets (shards "
                                 f"{first.config.get('shards')}, manifest sha256 {known[0][1][:12]}.. vs "
                                 f"{r.config.get('shards')}, {d[:12]}..); report the runs of one dataset together")



def _cache_of(runs: list[Run]) -> tuple[str, float, str] | None:
    """The teacher cache of the lowest seed that a run names and that still exists (or is a URL: reading it says
    whether it does), with that run's tau and shards (with several seeds the statistics and the picture come from
    that one cache)."""
    from pipeline.core.remote import is_url

    for r in sorted(runs, key=lambda r: r.seed):
        c = r.config.get("teacher_cache")
        if c and (is_url(c) or Path(c).exists()):
            return c, float(r.config.get("loss", {}).get("tau", 4.0)), str(r.config.get("shards", ""))
    return None


def check_cache_inputs(runs: list[Run], cache: str, shards: str) -> None:
    """The teacher cache and shards the report reads for a run must still be what the run recorded."""
    from pipeline.reader.index import manifest_sha256
    from pipeline.cache.store import TeacherCache

    from trainer.engine.inputs import check_inputs, fingerprint_sha256, recorded_inputs

    run = next(r for r in runs if r.config.get("teacher_cache") == cache)
    recorded, now = recorded_inputs(run.config), {}
    if recorded.get("teacher_cache"):
        with TeacherCache(cache, prefetch=False) as tc:
            now["teacher_cache"] = {"path": cache, "fingerprint_sha256": fingerprint_sha256(tc.fingerprint)}
    if recorded.get("shards") and shards and (Path(shards) / "manifest.json").is_file():
        now["shards"] = {"path": shards, "manifest_sha256": manifest_sha256(shards)}
    check_inputs({k: recorded[k] for k in now}, now, RunDir(run.path).config_path,
                 "the report would describe other data than the run's: restore the run's inputs")


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
    from pipeline.cache.store import TeacherCache

    from pipeline.core.digest import file_sha256
    from trainer.engine.checkpoint import final_weights_path

    with TeacherCache(cache, prefetch=False) as tc:
        want = tc.fingerprint.get("weights_sha256")
    for r in runs:
        if r.mode == "hard" and len(r.students) == 1:
            f = final_weights_path(r.path, 0, r.students[0])
            if want and f.is_file() and file_sha256(f) == want:
                return r
    return None


def _ordered(runs: list[Run], teacher: Run | None) -> list[Run]:
    """Teacher first, then the ladder's order (hard, kd, uw-kd, dual), then anything else; seeds ascending."""
    rank = {m: i for i, m in enumerate(LADDER)}
    return sorted(runs, key=lambda r: (r is not teacher, rank.get(r.mode, len(LADDER)), r.seed))


def _num_classes(runs: list[Run], cache: str | None) -> int | None:
    """The class count: from a run's shard manifest, else the teacher cache's; None if neither is there."""
    from pipeline.reader.index import read_manifest

    for r in runs:
        shards = r.config.get("shards")
        if shards and (Path(shards) / "manifest.json").is_file():
            return len(read_manifest(shards)["classes"])
    if cache is not None:
        from pipeline.cache.store import TeacherCache

        with TeacherCache(cache, prefetch=False) as tc:
            return int(tc.num_classes)
    return None


def _teacher_arch(runs: list[Run], teacher: Run | None, cache: str | None) -> str | None:
    if teacher is not None:
        return teacher.config["students"][0]
    if cache is not None:
        from pipeline.cache.store import TeacherCache

        with TeacherCache(cache, prefetch=False) as tc:
            if tc.fingerprint.get("teacher"):
                return str(tc.fingerprint["teacher"])
    return next((r.config.get("teacher") for r in runs if r.config.get("teacher_weights")), None)


def _run_line(r: Run, teacher: Run | None) -> str:
    rt = r.runtime
    parts = [f"mode {r.mode}", f"seed {r.seed}", f"students {', '.join(r.students)}", f"{len(r.epochs)} epoch(s)",
             f"final epoch {r.final.epoch + 1} from `{RunDir(r.path).metrics_path}`"]
    if rt.get("global_batch") is not None:
        parts.append(f"global batch {rt['global_batch']} = {rt.get('world_size', 1)} rank(s) x "
                     f"{rt.get('per_rank_batch', rt['global_batch'])}")
    if r.reused_views:
        vps, cache_e = rt.get("views_per_sample"), rt.get("cache_epochs")
        parts.append(f"**reused views**{tables.REUSED_MARK}: {vps if vps is not None else '?'} distinct view(s) per "
                     f"sample over {len(r.epochs)} epochs" + (f" (cache of {cache_e} augmentation epochs)"
                                                              if cache_e else ""))
    return f"- `{r.path}`: " + ", ".join(parts) + (" (teacher)" if r is teacher else "")


# ------------------------------------------------------------------------------------- the job


def write_report(run_dirs: list[str | Path], out: str | Path, *, teacher: str | Path | None = None,
                 low_w: float = 0.5, learnable: str | Path | None = None, appendix: list[str] | None = None,
                 views: bool = True) -> Path:
    """Build OUT/report.md (+ PNGs when matplotlib is there) from the runs; returns the report's path.

    Holds OUT's writer lock (trainer.engine.rundir.directory_lock) throughout, whoever calls it (`kdpipe report`,
    the demo): a second report into OUT, or a report into a run being trained, is a BusyError.
    learnable: the learnable dataset's tree (or its learnable.json) the shards came from, to split the
    teacher statistics into clean and ambiguous samples. appendix: markdown lines put at the end.
    views: draw the picture of the most and least confident training views (needs the shards)."""
    with directory_lock(out):
        return _write_report(run_dirs, Path(out), teacher=teacher, low_w=low_w, learnable=learnable,
                             appendix=appendix, views=views)


def _write_report(run_dirs: list[str | Path], out: Path, *, teacher: str | Path | None, low_w: float,
                  learnable: str | Path | None, appendix: list[str] | None, views: bool) -> Path:
    if not run_dirs:
        raise ConfigError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    if teacher is not None and Path(teacher).resolve() not in {p.resolve() for p in paths}:
        paths.insert(0, Path(teacher))
    runs = [load_run(p) for p in paths]
    check_finished(runs)
    check_one_dataset(runs)
    cache = _cache_of(runs)
    if cache is not None:
        check_cache_inputs(runs, cache[0], cache[2])
    if teacher is not None:
        teacher_run = next(r for r in runs if r.path.resolve() == Path(teacher).resolve())
    else:
        teacher_run = _teacher_run(runs, cache[0] if cache else None)
    runs = _ordered(runs, teacher_run)
    students_runs = [r for r in runs if r is not teacher_run]
    out = Path(out)
    kinds = None
    data = cache[2] if cache else str(runs[0].config.get("shards") or "")
    if learnable is not None and data and (Path(data) / "manifest.json").is_file():
        desc = Path(learnable)
        desc = desc / DESCRIPTION_FILE if desc.is_dir() else desc
        kinds = sample_kinds(data, desc)  # refuses a description of another dataset
    stats = teacher_stats(cache[0], cache[1], low_w, kinds) if cache else None
    claim_dir(out, REPORT_MARKER, "a report", legacy=lambda p: (p / "report.md").is_file())
    acc_png = "val_accuracy.png" if plots.plot_accuracy(students_runs or runs, out / "val_accuracy.png") else None
    hist_png = "w_histogram.png" if stats is not None and plots.plot_w_hist(stats, out / "w_histogram.png") else None

    lines = ["# kdpipe report", "", "Runs (every number below comes from these files; accuracies are each run's "
             "final epoch):", ""]
    lines += [_run_line(r, teacher_run) for r in runs] + [""]
    if acc_png is None or (stats is not None and hist_png is None):
        lines += ["Plots skipped: matplotlib is not installed (`pip install 'kdpipe[plots]'`).", ""]
    lines += report_section([(r.name, r.config) for r in runs])
    lines += tables.table_one(students_runs, teacher_run)
    lines += tables.table_two(runs)
    lines += tables.table_three(students_runs)
    lines += tables.convergence(students_runs)
    lines += tables.table_four(students_runs, _teacher_arch(runs, teacher_run, cache[0] if cache else None),
                               _num_classes(runs, cache[0] if cache else None))
    lines += teacher_section(students_runs, stats, hist_png, tables.md_table)
    if views and cache is not None:
        lines += teacher_views_section(cache[0], cache[2], out / "teacher_views.png", kinds=kinds)
    lines += tables.epochs_section(runs, acc_png)
    lines += appendix or []
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
