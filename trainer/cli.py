"""The `kdpipe` command line: thin click commands that parse, build a config and call a job.

Each command imports its job lazily, so `kdpipe --help` stays fast and optional extras stay optional.
"""
from __future__ import annotations

from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdpipe")
def main() -> None:
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
def synth(out, classes_file, num_classes, train_per_class, val_per_class, val_layout, size, oddities, broken, seed):
    """Write a synthetic ImageNet tree in the real ILSVRC2012 layout (for tests, demos, benchmarks)."""
    from pipeline.classes import load_class_list
    from pipeline.synthetic import make_imagenet_tree

    wnids = load_class_list(classes_file)[:num_classes]
    tree = make_imagenet_tree(out, wnids, train_per_class=train_per_class, val_per_class=val_per_class,
                              val_layout=None if val_layout == "none" else val_layout, size=size,
                              oddities=oddities, broken=broken, seed=seed, progress=True)
    click.echo(f"wrote {tree.count('train')} train and {tree.count('val')} val images of "
               f"{len(wnids)} classes to {out}")


@main.group()
def bench() -> None:
    """Benchmarks: each prints a ratio against a baseline run in the same process."""


# ---- commands are added below, one block per area (data, loader, train, cache, report, demo) ----


if __name__ == "__main__":
    main()
