"""The `kdpipe` command line: thin click commands that parse, build a config and call a job.

Each command imports its job lazily, so `kdpipe --help` stays fast and optional extras stay optional.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from trainer.config import (CacheTeacherConfig, DemoCommandConfig, EvalConfig, ExportConfig, ReportConfig,
                            ShardConfig, SynthConfig, TrainConfig, VerifyConfig, command_config, missing_required)
from trainer.options import add_options, given, read_config_file

CONFIG_FILE = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
                           help="Start from this config: a run's config.json or a TOML file with the same keys; "
                                "flags given override it.")


class KdpipeGroup(click.Group):
    """Turns the user and data errors of every command into one line (see pipeline/core/errors.py).

    KdpipeError -> "Error: <one line>", exit 1 (ConfigError exits 2, like click's usage errors); a full disk, a
    read-only file system, a missing permission or a file where a directory must be -> one line naming the path.
    `--debug` or KDPIPE_DEBUG=1 lets the original exception through."""

    def invoke(self, ctx: click.Context):
        import errno

        from pipeline.core.errors import KdpipeError, one_line

        try:
            return super().invoke(ctx)
        except KdpipeError as e:
            if _debug(ctx):
                raise
            raise _OneLine(one_line(e), e.exit_code) from e
        except OSError as e:
            if _debug(ctx):
                raise
            if e.errno == errno.ENOSPC:
                where = e.filename or "the output"
                raise _OneLine(f"no space left on the device writing {where}; what finished is kept: free space "
                               f"and rerun the same command to continue", 1) from e
            if e.errno == errno.ENOTDIR and e.filename:  # e.g. --out afile/sub
                raise _OneLine(f"{e.filename}: not a directory (a part of this path is a file); choose another "
                               f"path", 1) from e
            if e.errno == errno.EEXIST and e.filename:  # a file where a directory must be made
                raise _OneLine(f"{e.filename} exists and is not a directory kdpipe can make or use; choose another "
                               f"path", 1) from e
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename:
                raise _OneLine(f"{e.filename}: {e.strerror} (a read-only or protected location); fix its "
                               f"permissions or choose another path", 1) from e
            raise


class _OneLine(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


DEBUG_ON, DEBUG_OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def debug_env() -> bool | None:
    """KDPIPE_DEBUG as a switch: True (1/true/yes/on), False (unset, empty, 0/false/no/off), None (anything else;
    the group refuses it before running a command)."""
    import os

    value = os.environ.get("KDPIPE_DEBUG", "").strip().lower()
    return True if value in DEBUG_ON else False if value in DEBUG_OFF else None


def _debug(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool((root.params or {}).get("debug")) or bool(debug_env())


@click.group(cls=KdpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdpipe")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also KDPIPE_DEBUG=1).")
@click.option("-v", "--verbose", is_flag=True, help="Also show debug messages.")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors: no progress, no info messages.")
def main(debug: bool, verbose: bool, quiet: bool) -> None:
    """kdpipe: uncertainty-aware dual-student knowledge distillation on ImageNet-100."""
    import os

    from pipeline.core.errors import ConfigError
    from pipeline.core.log import configure

    if debug_env() is None:
        raise ConfigError(f"KDPIPE_DEBUG={os.environ.get('KDPIPE_DEBUG')!r}: give 1, true, yes or on to show "
                          f"tracebacks, or 0, false, no or off (or unset it) for one-line errors")
    if verbose and quiet:
        raise ConfigError("give -v/--verbose or -q/--quiet, not both")
    configure(1 if verbose else -1 if quiet else 0)  # messages go through logging (pipeline/core/log.py)


@main.command()
@add_options(SynthConfig)
def synth(**params):
    """Write a synthetic ImageNet tree in the real ILSVRC2012 layout (for tests, demos, benchmarks)."""
    from pipeline.core.classes import load_class_list
    from pipeline.core.errors import ConfigError
    from pipeline.sources.synthetic import make_imagenet_tree

    cfg = command_config(SynthConfig, given(SynthConfig, params))
    out, classes_file, num_classes = Path(cfg.out), cfg.classes and Path(cfg.classes), cfg.num_classes
    wnids = load_class_list(classes_file)  # a malformed list: a ConfigError naming the file and line
    if num_classes is not None and not 1 <= num_classes <= len(wnids):
        raise ConfigError(f"--num-classes {num_classes}: the class list {classes_file or '(ImageNet-100)'} has "
                          f"{len(wnids)} classes; give 1..{len(wnids)}")
    wnids = wnids[:num_classes]
    if cfg.learnable:
        from pipeline.sources.learnable import make_learnable_tree

        if cfg.oddities or cfg.broken or cfg.val_layout != "folders":
            raise click.UsageError("--learnable writes val as class folders and has no oddities or broken files")
        tree = make_learnable_tree(out, wnids, train_per_class=cfg.train_per_class, val_per_class=cfg.val_per_class,
                                   size=cfg.size, ambiguous_share=cfg.ambiguous_share, seed=cfg.seed, progress=True)
        click.echo(f"wrote {tree.count('train')} train and {tree.count('val')} val images of {len(wnids)} classes "
                   f"({len(tree.ambiguous)} ambiguous) to {out}")
        return
    tree = make_imagenet_tree(out, wnids, train_per_class=cfg.train_per_class, val_per_class=cfg.val_per_class,
                              val_layout=None if cfg.val_layout == "none" else cfg.val_layout, size=cfg.size,
                              oddities=cfg.oddities, broken=cfg.broken, seed=cfg.seed, progress=True)
    click.echo(f"wrote {tree.count('train')} train and {tree.count('val')} val images of "
               f"{len(wnids)} classes to {out}")


@main.group()
def bench() -> None:
    """Benchmarks: each prints a ratio against a baseline run in the same process."""


# ---- commands are added below, one block per area (data, loader, train, cache, report, demo) ----


# ---- data: ImageNet tree -> WebDataset shards, and their verification (pipeline/shards/writer.py) ----
@main.command()
@add_options(ShardConfig)
def shard(**params):
    """Write ImageNet-100 (or --classes), or any class-folder tree (--imagefolder), as WebDataset shards +
    manifest + index. Resumable: rerun to continue."""
    from pipeline.sources.imagefolder import discover_imagefolder
    from pipeline.sources.imagenet import printable
    from pipeline.shards.writer import build_shards

    from pipeline.core.outdir import refuse_inside

    cfg = command_config(ShardConfig, given(ShardConfig, params))
    out = Path(cfg.out)
    refuse_inside(out, [("--imagenet", cfg.imagenet), ("--imagefolder", cfg.imagefolder)])
    source = cfg.imagenet or discover_imagefolder(cfg.imagefolder, val_share=cfg.val_share, seed=cfg.options.seed)
    report = build_shards(source, out, classes=cfg.classes, val_labels=cfg.val_labels, options=cfg.options,
                          workers=cfg.workers, overwrite=cfg.overwrite)
    splits = report.manifest["splits"]
    counts = ", ".join(f"{s} {v['count']} samples in {len(v['shards'])} shards" for s, v in splits.items())
    click.echo(f"{out}: {counts} (wrote {len(report.written)} shards, {len(report.reused)} found finished)")
    for name, src in report.changed:
        click.echo(f"{name}: written again: its source {printable(src)} changed since the earlier run", err=True)
    for split in [s for s, v in splits.items() if v["count"] == 0]:
        click.echo(f"warning: the {split} split holds 0 samples, so `kdpipe train` will refuse these shards "
                   f"({'see rejected.tsv' if report.rejected else 'no images found'}"
                   f"{'; --val-share carves val from train' if split == 'val' and cfg.imagefolder else ''})",
                   err=True)
    for name in report.shifted:
        click.echo(f"{name} and the shards after it: written again: the shards before them now hold another "
                   "number of samples, so their sample ids shifted", err=True)
    if report.rejected:
        click.echo(f"rejected {len(report.rejected)} files (listed in {out / 'rejected.tsv'}):", err=True)
        for split, src, reason in report.rejected[:10]:
            click.echo(f"  {split}\t{printable(src)}\t{printable(reason)}", err=True)
        if cfg.strict:
            raise click.ClickException(f"--strict: {len(report.rejected)} files rejected")


@main.command()
@add_options(VerifyConfig)
def verify(**params):
    """Check shards against their manifest and index, and/or a teacher cache unit by unit. Lists every
    problem found, one a line, and exits 1 if there is any."""
    cfg = command_config(VerifyConfig, given(VerifyConfig, params))
    if cfg.shards is None and cfg.cache is None:
        raise click.UsageError("give --shards DIR, --cache STORE, or both")
    shards, cache, workers = cfg.shards and Path(cfg.shards), cfg.cache and Path(cfg.cache), cfg.workers
    problems: dict[Path, int] = {}  # what was checked -> number of problems found
    if shards is not None:
        from pipeline.shards.writer import verify_shards

        result = verify_shards(shards, workers=workers, progress=True)
        problems[shards] = len(result.problems)
        for problem in result.problems:
            click.echo(problem, err=True)
        if result.ok:
            click.echo(f"{shards}: {result.shards} shards, {result.samples} samples OK")
    if cache is not None:
        from pipeline.cache.store import TeacherCache

        report = TeacherCache(cache, prefetch=False).verify()
        problems[cache] = len(report.problems())
        for problem in report.problems():
            click.echo(f"{cache}: {problem}", err=True)
        if report.ok:
            click.echo(f"{cache}: {report.checked} units ({report.units} expected), every checksum OK")
        elif report.damage:
            click.echo(f"{cache}: rerun `kdpipe cache-teacher` with the same options to recompute the damaged units",
                       err=True)
    if any(problems.values()):
        raise click.ClickException(f"{sum(problems.values())} problems in "
                                   + ", ".join(str(p) for p, n in problems.items() if n))


# ---- cache: teacher logits in a Zarr store (trainer/jobs/cache_teacher.py) ----
@main.command("cache-teacher")
@add_options(CacheTeacherConfig)
@CONFIG_FILE
def cache_teacher_cmd(config_file, **params):
    """Run the teacher once per (augmentation epoch, train sample) and store logits + confidence weights.

    Resumable (rerun the same command after any interruption; damaged units are recomputed) and parallel
    under torchrun."""
    from trainer.jobs.cache_teacher import cache_teacher

    cfg = command_config(CacheTeacherConfig, given(CacheTeacherConfig, params),
                         read_config_file(config_file) if config_file else None)
    path = cache_teacher(cfg)
    click.echo(f"teacher cache complete: {path}")


# ---- report: the paper's tables and plots from runs' metrics (trainer/report/build.py) ----
@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@add_options(ReportConfig)
def report(runs, **params):
    """Write OUT/report.md (assumptions, Tables I-IV with verdicts, convergence, teacher uncertainty and its
    most/least confident views, accuracy per epoch) and PNG plots from RUNS; seeds of one mode are pooled."""
    from trainer.report.build import write_report
    from trainer.report.teacher import read_description

    cfg = command_config(ReportConfig, {**given(ReportConfig, params), "runs": tuple(str(r) for r in runs)})
    out, learnable = Path(cfg.out), cfg.learnable and Path(cfg.learnable)
    teacher_run = cfg.teacher and Path(cfg.teacher)
    if learnable is not None:  # a side input that cannot be read is refused before anything is written
        read_description(learnable)
    # write_report takes OUT's lock: a report into a run being trained (or another report) is refused
    path = write_report([Path(r) for r in cfg.runs], out, teacher=teacher_run, low_w=cfg.low_w,
                        learnable=learnable)
    click.echo(f"wrote {path}")


# ---- train: dual-student distillation, evaluation, train-step benchmark (trainer/engine/loop.py) ----
@main.command()
@add_options(TrainConfig)
@CONFIG_FILE
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly from its config.json and "
              "checkpoint-last.pt; flags given must agree with its config (paths, workers, logging may change).")
@click.option("--stop-after-steps", type=click.IntRange(min=1), default=None,
              help="Stop (with a checkpoint) once the run has trained N global steps in all (a resumed run "
              "counts its checkpoint's steps; one already there trains none).")
def train(config_file, resume, stop_after_steps, **params):
    """Train one or more students (the paper: ResNet-18 + MobileNetV2) from a teacher on ImageNet-100 shards."""
    from pipeline.core.errors import ConfigError, MissingDataError
    from trainer.config import resolve_train
    from trainer.engine.inputs import INPUTS
    from trainer.engine.interrupt import interrupted_line, sigterm_as_interrupt
    from trainer.engine.rundir import RunDir
    from trainer.jobs.train import train as train_job

    flags = given(TrainConfig, params)
    saved = None
    if resume:
        if config_file:
            raise ConfigError("--resume continues from the run's own config.json: drop --config")
        if "out" not in flags:
            raise ConfigError("--resume needs --out RUN (the run directory to continue)")
        RunDir(flags["out"]).is_run()  # a directory kdpipe did not write is refused before its files are read
        saved_file = RunDir(flags["out"]).config_path
        if not saved_file.is_file():
            raise MissingDataError(f"--resume: {saved_file} not found; is {flags['out']} a `kdpipe train` run?")
        saved = read_config_file(saved_file, "--resume: the run's")
    cfg = resolve_train(flags, read_config_file(config_file) if config_file else None, saved,
                        saved_name=str(RunDir(flags.get("out", "")).config_path))
    missing = missing_required(TrainConfig, dataclasses.asdict(cfg))
    if missing:
        raise ConfigError(f"missing required option(s): {', '.join(missing)}")
    try:
        with sigterm_as_interrupt() as term:
            result = train_job(cfg, resume=resume, stop_after_steps=stop_after_steps,
                               given_inputs=set(flags) & set(INPUTS))
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: say how to continue, then end as the signal would
        line = interrupted_line(cfg.out, e)
        if line:
            click.echo(line, err=True)
        if term.received:
            raise SystemExit(143) from None  # 128 + SIGTERM, what the shell reports for a process it killed
        raise
    if result["stopped"] and not result["trained_steps"]:
        click.echo(f"nothing trained: the run's checkpoint is already at step {result['global_step']} "
                   f"(--stop-after-steps {stop_after_steps} counts the run's steps in all); continue with "
                   f"`kdpipe train --out {cfg.out} --resume`")
    elif result["stopped"]:
        click.echo(f"stopped after {result['global_step']} steps; continue with "
                   f"`kdpipe train --out {cfg.out} --resume`")
    else:
        click.echo(f"done: {RunDir(cfg.out).metrics_path}, final weights {cfg.out}/student*.safetensors")


@main.command("eval")
@add_options(EvalConfig)
def eval_cmd(**params):
    """Top-1 / top-5 on the val split for each student and their ensemble (mean of softmaxes)."""
    from trainer.engine.evaluate import eval_checkpoint, format_table

    cfg = command_config(EvalConfig, given(EvalConfig, params))
    path, names, result = eval_checkpoint(cfg)
    click.echo(f"{path}:")
    click.echo(format_table(names, result))


@main.command("export")
@add_options(ExportConfig)
def export_cmd(**params):
    """Export a finished run's students (ONNX), each checked against PyTorch on one batch."""
    from trainer.jobs.export import export_run

    export_run(command_config(ExportConfig, given(ExportConfig, params)))


def _run_tool(script: str, args: tuple[str, ...]) -> None:
    """Run the `tools` package's <script> main(argv) from a source checkout (benchmarks are not installed)."""
    import importlib
    import sys

    root = Path(__file__).resolve().parent.parent
    if not (root / "tools" / "__init__.py").is_file():
        raise click.ClickException(f"{root / 'tools'} not found: `kdpipe bench` runs from a source checkout")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.import_module(f"tools.{Path(script).stem}").main(list(args))


_PASS_THROUGH = {"add_help_option": False,
                 "context_settings": {"ignore_unknown_options": True, "allow_extra_args": True}}


@bench.command("train", **_PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_train(args):
    """Dual-student step vs a plain PyTorch loop; online teacher vs cached logits (tools/bench_train.py -h)."""
    _run_tool("bench_train.py", args)


# ---- demo: the whole pipeline on the built-in learnable dataset (trainer/jobs/demo.py) ----
@main.command()
@add_options(DemoCommandConfig)
def demo(**params):
    """Generate a learnable dataset, shard it, train a teacher, cache it, run hard -> kd -> uw-kd -> dual, report."""
    import dataclasses

    from trainer.jobs.demo import PRESETS, run_demo

    opts = command_config(DemoCommandConfig, given(DemoCommandConfig, params))
    out, preset, tiny = Path(opts.out), opts.preset, opts.tiny
    if tiny and preset not in (None, "tiny"):
        raise click.UsageError(f"--tiny is --preset tiny; it cannot go with --preset {preset}")
    cfg = PRESETS["tiny" if tiny else preset or "cpu"]
    changed = {k: getattr(opts, k) for k in ("backend", "device", "seeds") if getattr(opts, k) is not None}
    cfg = dataclasses.replace(cfg, **changed)
    path = run_demo(out, cfg)
    click.echo(f"report: {path}")


# ---- loader: images/s of kdpipe's backends vs torchvision ImageFolder + PIL (tools/bench_loader.py) ----
@bench.command("loader", **_PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_loader(args):
    """Loader img/s and per-stage times vs ImageFolder + PIL, e.g. --shards DIR --backends torch,dali
    (tools/bench_loader.py -h)."""
    _run_tool("bench_loader.py", args)


if __name__ == "__main__":
    main()
