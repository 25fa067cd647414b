"""The `kdpipe` command line: thin click commands that parse, build a config and call a job.

Each command imports its job lazily, so `kdpipe --help` stays fast and optional extras stay optional.
"""
from __future__ import annotations

from pathlib import Path

import click


class KdpipeGroup(click.Group):
    """Turns the user and data errors of every command into one line (see pipeline/errors.py).

    KdpipeError -> "Error: <one line>", exit 1 (ConfigError exits 2, like click's usage errors); a full disk
    -> one line naming the path. `--debug` or KDPIPE_DEBUG=1 lets the original exception through."""

    def invoke(self, ctx: click.Context):
        import errno

        from pipeline.errors import KdpipeError, one_line

        try:
            return super().invoke(ctx)
        except KdpipeError as e:
            if _debug(ctx):
                raise
            raise _OneLine(one_line(e), e.exit_code) from e
        except OSError as e:
            if e.errno != errno.ENOSPC or _debug(ctx):
                raise
            where = e.filename or "the output"
            raise _OneLine(f"no space left on the device writing {where}; what finished is kept: free space and "
                           f"rerun the same command to continue", 1) from e


class _OneLine(click.ClickException):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _debug(ctx: click.Context) -> bool:
    import os

    root = ctx.find_root()
    return bool((root.params or {}).get("debug")) or os.environ.get("KDPIPE_DEBUG", "") not in ("", "0")


@click.group(cls=KdpipeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdpipe")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (also KDPIPE_DEBUG=1).")
def main(debug: bool) -> None:
    """kdpipe: uncertainty-aware dual-student knowledge distillation on ImageNet-100."""


@main.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write the tree into.")
@click.option("--classes", "classes_file", type=click.Path(path_type=Path), default=None,
              help="Class list file (default: the ImageNet-100 list).")
@click.option("--num-classes", type=int, default=None, help="Use only the first N classes of the list.")
@click.option("--train-per-class", type=int, default=4, show_default=True)
@click.option("--val-per-class", type=int, default=2, show_default=True)
@click.option("--val-layout", type=click.Choice(["folders", "flat", "none"]), default="folders", show_default=True)
@click.option("--size", type=(int, int), default=(375, 500), show_default=True, help="Image height and width.")
@click.option("--oddities/--no-oddities", default=False, help="Add CMYK, PNG-as-JPEG and greyscale files.")
@click.option("--broken/--no-broken", default=False, help="Add truncated, zero-byte and non-image files.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--learnable", is_flag=True, default=False,
              help="Write the learnable dataset (drawn class families a CNN can learn; try --size 64 64) instead.")
@click.option("--ambiguous-share", type=float, default=0.15, show_default=True,
              help="With --learnable: share of samples made ambiguous (two-class mixes, occlusion, noise).")
def synth(out, classes_file, num_classes, train_per_class, val_per_class, val_layout, size, oddities, broken, seed,
          learnable, ambiguous_share):
    """Write a synthetic ImageNet tree in the real ILSVRC2012 layout (for tests, demos, benchmarks)."""
    from pipeline.classes import load_class_list
    from pipeline.synthetic import make_imagenet_tree

    wnids = load_class_list(classes_file)[:num_classes]
    if learnable:
        from pipeline.learnable import make_learnable_tree

        if oddities or broken or val_layout != "folders":
            raise click.UsageError("--learnable writes val as class folders and has no oddities or broken files")
        tree = make_learnable_tree(out, wnids, train_per_class=train_per_class, val_per_class=val_per_class,
                                   size=size, ambiguous_share=ambiguous_share, seed=seed, progress=True)
        click.echo(f"wrote {tree.count('train')} train and {tree.count('val')} val images of {len(wnids)} classes "
                   f"({len(tree.ambiguous)} ambiguous) to {out}")
        return
    tree = make_imagenet_tree(out, wnids, train_per_class=train_per_class, val_per_class=val_per_class,
                              val_layout=None if val_layout == "none" else val_layout, size=size,
                              oddities=oddities, broken=broken, seed=seed, progress=True)
    click.echo(f"wrote {tree.count('train')} train and {tree.count('val')} val images of "
               f"{len(wnids)} classes to {out}")


@main.group()
def bench() -> None:
    """Benchmarks: each prints a ratio against a baseline run in the same process."""


# ---- commands are added below, one block per area (data, loader, train, cache, report, demo) ----


# ---- data: ImageNet tree -> WebDataset shards, and their verification (pipeline/shards.py) ----
@main.command()
@click.option("--imagenet", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="ImageNet root holding train/ (and val/), or a Kaggle download (ILSVRC/Data/CLS-LOC).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Shard directory.")
@click.option("--classes", "classes_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Class list file (default: the canonical ImageNet-100 list).")
@click.option("--val-labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Labels for a flat val/: 'file<TAB>wnid' or LOC_val_solution.csv (default: shipped ILSVRC2012).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Samples per shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train shuffle.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality for re-encoded images (CMYK, PNG, --max-side).")
@click.option("--max-side", type=click.IntRange(min=1), default=None,
              help="Re-encode images whose longer side exceeds N px (default: off, bytes pass through).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all cores).")
@click.option("--strict", is_flag=True, help="Exit nonzero if any file was rejected.")
@click.option("--overwrite", is_flag=True, help="Replace an output made with different options or inputs.")
def shard(imagenet, out, classes_file, val_labels, shard_size, seed, quality, max_side, workers, strict, overwrite):
    """Write ImageNet-100 (or --classes) as WebDataset shards + manifest + index. Resumable: rerun to continue."""
    from pipeline.shards import OptionsMismatch, ShardOptions, build_shards

    opts = ShardOptions(shard_size=shard_size, seed=seed, quality=quality, max_side=max_side)
    try:
        report = build_shards(imagenet, out, classes=classes_file, val_labels=val_labels, options=opts,
                              workers=workers, overwrite=overwrite)
    except (OptionsMismatch, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    splits = report.manifest["splits"]
    counts = ", ".join(f"{s} {v['count']} samples in {len(v['shards'])} shards" for s, v in splits.items())
    click.echo(f"{out}: {counts} (wrote {len(report.written)} shards, {len(report.reused)} found finished)")
    if report.rejected:
        click.echo(f"rejected {len(report.rejected)} files (listed in {out / 'rejected.tsv'}):", err=True)
        for split, src, reason in report.rejected[:10]:
            click.echo(f"  {split}\t{src}\t{reason}", err=True)
        if strict:
            raise click.ClickException(f"--strict: {len(report.rejected)} files rejected")


@main.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes (default: all cores).")
def verify(shards, workers):
    """Check every shard against the manifest: counts, checksums, ids, labels, and that every image decodes."""
    from pipeline.shards import verify_shards

    result = verify_shards(shards, workers=workers, progress=True)
    for problem in result.problems:
        click.echo(problem, err=True)
    if not result.ok:
        raise click.ClickException(f"{len(result.problems)} problems in {shards}")
    click.echo(f"{shards}: {result.shards} shards, {result.samples} samples OK")


# ---- cache: teacher logits in a Zarr store (trainer/cache_teacher.py) ----
@main.command("cache-teacher")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--teacher", default="resnet50", show_default=True, help="Teacher architecture.")
@click.option("--teacher-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Local weights: kdpipe checkpoint, C-way or ImageNet-1k state dict.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Zarr store to create or resume.")
@click.option("--epochs", type=int, default=1, show_default=True,
              help="Augmentation epochs E; training epoch e reuses epoch e mod E (views and logits).")
@click.option("--seed", type=int, default=0, show_default=True, help="Must equal the training seed.")
@click.option("--image-size", type=int, default=224, show_default=True, help="Must equal the training crop.")
@click.option("--topk", type=int, default=0, show_default=True, help="0: full logits; K: top-K log-probs.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--chunk", "chunk_n", type=int, default=4096, show_default=True,
              help="Samples per store chunk and per unit of resumable, parallel work.")
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("--num-workers", type=int, default=None)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="auto: bf16 autocast on CUDA, fp32 on the CPU.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
def cache_teacher_cmd(shards, teacher, teacher_weights, out, epochs, seed, image_size, topk, batch_size, chunk_n,
                      backend, num_workers, precision, device):
    """Run the teacher once per (augmentation epoch, train sample) and store logits + confidence weights.

    Resumable (rerun the same command after any interruption) and parallel under torchrun."""
    from trainer.cache_teacher import CacheTeacherConfig, cache_teacher

    try:
        cfg = CacheTeacherConfig(shards=str(shards), out=str(out), teacher_weights=str(teacher_weights),
                                 teacher=teacher, epochs=epochs, seed=seed, image_size=image_size, topk=topk,
                                 batch_size=batch_size, chunk_n=chunk_n, backend=backend, num_workers=num_workers,
                                 precision=precision, device=device)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    from pipeline.teacher_cache import CacheMismatchError, IncompleteCacheError

    try:
        path = cache_teacher(cfg)
    except (CacheMismatchError, IncompleteCacheError, FileExistsError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"teacher cache complete: {path}")


# ---- report: the paper's tables and plots from runs' metrics (trainer/report.py) ----
@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for report.md and the PNG plots.")
@click.option("--teacher", "teacher_run", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The teacher's own training run (shown as the teacher row; found automatically when a run's "
                   "--teacher-weights lie in one of the RUNS).")
@click.option("--low-w", type=float, default=0.5, show_default=True,
              help="Samples with teacher weight w below this count as low-confidence.")
@click.option("--learnable", type=click.Path(exists=True, path_type=Path), default=None,
              help="The learnable dataset the shards came from (tree or its learnable.json): split the teacher's "
                   "statistics into clean and ambiguous samples.")
def report(runs, out, teacher_run, low_w, learnable):
    """Write OUT/report.md (assumptions, Tables I-IV with verdicts, convergence, teacher uncertainty and its
    most/least confident views, accuracy per epoch) and PNG plots from RUNS; seeds of one mode are pooled."""
    from trainer.report import write_report

    try:
        path = write_report(list(runs), out, teacher=teacher_run, low_w=low_w, learnable=learnable)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {path}")


# ---- train: dual-student distillation, evaluation, train-step benchmark (trainer/loop.py) ----
@main.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run directory: config.json, metrics.jsonl, checkpoints, final weights.")
@click.option("--mode", type=click.Choice(["hard", "kd", "uw-kd", "dual"]), default="dual", show_default=True,
              help="Preset: hard (CE only), kd (alpha .3, beta .7), uw-kd (kd weighted by w), dual (.4/.4/.2).")
@click.option("--students", default=None, help="Comma-separated models (default: resnet18,mobilenet_v2 for dual, "
              "resnet18 otherwise; also resnet50, tiny_cnn, tiny_resnet, tiny_mobilenet).")
@click.option("--teacher", default="resnet50", show_default=True, help="Architecture of the online teacher.")
@click.option("--teacher-weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Online teacher weights: kdpipe checkpoint, C-way or ImageNet-1k state dict.")
@click.option("--teacher-cache", type=click.Path(exists=True), default=None,
              help="Zarr teacher cache (kdpipe cache-teacher) instead of an online teacher.")
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Per rank.")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Peak LR; cosine to 0 per step.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=1e-4, show_default=True)
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True)
@click.option("--alpha", type=float, default=None, help="CE weight (default: the preset's).")
@click.option("--beta", type=float, default=None, help="Teacher-term weight (default: the preset's).")
@click.option("--gamma", type=float, default=None, help="Peer-term weight (default: the preset's).")
@click.option("--tau", type=float, default=None, help="Temperature [default: 4].")
@click.option("--uncertainty/--no-uncertainty", default=None, help="Weight the teacher term by w (default: preset).")
@click.option("--entropy-tau", type=float, default=None, help="Temperature of the entropy behind w [default: 1].")
@click.option("--kl-direction", type=click.Choice(["forward", "reverse"]), default=None,
              help="forward: KL(teacher || student) (default); reverse: the paper's KL(student || teacher).")
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("--num-workers", type=int, default=None)
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="auto: bf16 on CUDA, fp32 on CPU; fp16 uses one GradScaler per student.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile each student.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--log-every", type=int, default=20, show_default=True, help="Steps between progress updates.")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT/checkpoint-last.pt.")
@click.option("--stop-after-steps", type=int, default=None, help="Stop (with a checkpoint) after N global steps.")
def train(shards, out, mode, students, teacher, teacher_weights, teacher_cache, epochs, batch_size, lr, momentum,
          weight_decay, warmup_epochs, alpha, beta, gamma, tau, uncertainty, entropy_tau, kl_direction, image_size,
          seed, backend, num_workers, amp, channels_last, compile_, device, log_every, resume, stop_after_steps):
    """Train one or more students (the paper: ResNet-18 + MobileNetV2) from a teacher on ImageNet-100 shards."""
    from pipeline.teacher_cache import IncompleteCacheError
    from trainer.config import make_config
    from trainer.loop import NonFiniteLossError
    from trainer.train_job import train as train_job

    try:
        cfg = make_config(mode, tuple(students.split(",")) if students else None,
                          loss=dict(alpha=alpha, beta=beta, gamma=gamma, tau=tau, uncertainty=uncertainty,
                                    entropy_tau=entropy_tau, direction=kl_direction),
                          optim=dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup_epochs),
                          shards=str(shards), out=str(out), teacher=teacher, teacher_weights=teacher_weights,
                          teacher_cache=teacher_cache, epochs=epochs, batch_size=batch_size, image_size=image_size,
                          seed=seed, backend=backend, num_workers=num_workers, amp=amp, channels_last=channels_last,
                          compile=compile_, device=device, log_every=log_every)
        result = train_job(cfg, resume=resume, stop_after_steps=stop_after_steps)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, IncompleteCacheError) as e:
        raise click.ClickException(str(e)) from e
    if result["stopped"]:
        click.echo(f"stopped after {result['global_step']} steps; continue with --resume (checkpoint in {out})")
    else:
        click.echo(f"done: {out}/metrics.jsonl, final weights {out}/student*.pt")


@main.command("eval")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Run directory (uses --which checkpoint).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A kdpipe checkpoint or final-weights file.")
@click.option("--which", type=click.Choice(["last", "best"]), default="last", show_default=True)
@click.option("--shards", type=click.Path(exists=True, file_okay=False), default=None,
              help="Shards to evaluate on (default: the run's own).")
@click.option("--image-size", type=int, default=None, help="Crop size (default: the run's own, else 224).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("--num-workers", type=int, default=None)
@click.option("--device", default="auto", show_default=True)
def eval_cmd(run_dir, checkpoint, which, shards, image_size, batch_size, backend, num_workers, device):
    """Top-1 / top-5 on the val split for each student and their ensemble (mean of softmaxes)."""
    from trainer.evaluate import eval_checkpoint, format_table

    if (run_dir is None) == (checkpoint is None):
        raise click.UsageError("give exactly one of --run and --checkpoint")
    path = checkpoint or run_dir / f"checkpoint-{which}.pt"
    try:
        names, result = eval_checkpoint(str(path), shards=shards, image_size=image_size, batch_size=batch_size,
                                        backend=backend, device=device, num_workers=num_workers)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{path}:")
    click.echo(format_table(names, result))


def _run_tool(script: str, args: tuple[str, ...]) -> None:
    """Run tools/<script>'s main(argv) from a source checkout (benchmarks are not installed)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / script
    if not path.is_file():
        raise click.ClickException(f"{path} not found: `kdpipe bench` runs from a source checkout")
    spec = importlib.util.spec_from_file_location(f"kdpipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(list(args))


_PASS_THROUGH = {"add_help_option": False,
                 "context_settings": {"ignore_unknown_options": True, "allow_extra_args": True}}


@bench.command("train", **_PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_train(args):
    """Dual-student step vs a plain PyTorch loop; online teacher vs cached logits (tools/bench_train.py -h)."""
    _run_tool("bench_train.py", args)


# ---- demo: the whole pipeline on the built-in learnable dataset (trainer/demo.py) ----
@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"), show_default=True,
              help="Directory for the data, shards, runs, teacher cache and report (rerun to resume).")
@click.option("--tiny", is_flag=True, help="A seconds-long version (5 classes, 1 epoch) that checks the chain.")
@click.option("--backend", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run the ladder with N seeds (data, shards and teacher shared; one teacher cache per seed); "
                   "the report gives mean ± sd and a verdict per rung.")
def demo(out, tiny, backend, device, seeds):
    """Generate a learnable dataset, shard it, train a teacher, cache it, run hard -> kd -> uw-kd -> dual, report."""
    import dataclasses

    from trainer.demo import TINY, DemoConfig, run_demo

    cfg = dataclasses.replace(TINY if tiny else DemoConfig(), backend=backend, device=device, seeds=seeds)
    try:
        path = run_demo(out, cfg)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
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
