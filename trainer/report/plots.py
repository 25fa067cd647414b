"""The report's PNG plots (matplotlib is an optional extra: without it these return False and the
report keeps its tables)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_replace


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or None when matplotlib is not installed (plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_accuracy(runs: list, path: Path) -> bool:
    """Validation top-1 per epoch: one panel per student (and the ensemble), one line per mode; several
    seeds of a mode are drawn as their mean with the min-max band."""
    plt = _pyplot()
    if plt is None:
        return False
    from matplotlib.ticker import MaxNLocator

    students = list(dict.fromkeys(s for r in runs for s in r.students))
    panels = students + (["ensemble"] if any(len(r.students) > 1 for r in runs) else [])
    modes = list(dict.fromkeys(r.mode for r in runs))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for mode in modes:
            series = [_series(r, panel) for r in runs if r.mode == mode]
            series = [s for s in series if s is not None]
            if not series:
                continue
            n = min(len(s) for s in series)
            ys = np.array([s[:n] for s in series], dtype=float)
            xs = np.arange(1, n + 1)
            color = f"C{modes.index(mode)}"  # one colour per mode in every panel
            ax.plot(xs, ys.mean(axis=0), marker="o", ms=3, color=color,
                    label=mode if len(series) == 1 else f"{mode} ({len(series)} runs: mean, range)")
            if len(series) > 1 and n > 1:
                ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=color, alpha=0.2)
            elif len(series) > 1:  # one epoch: the range as an error bar
                m = ys.mean(axis=0)
                ax.errorbar(xs, m, yerr=[m - ys.min(axis=0), ys.max(axis=0) - m], color=color, capsize=3, ls="none")
            ax.set_xlim(0.5, max(ax.get_xlim()[1], n + 0.5))
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation top-1 (%)")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def _series(run, panel: str) -> list[float] | None:
    """A run's validation top-1 per epoch for a panel (a student, or the ensemble); None if not in it."""
    if panel == "ensemble":
        ys = [e.val_ensemble_top1 for e in run.epochs] if len(run.students) > 1 else None
    else:
        ys = [run.acc(panel, 1, e) for e in run.epochs] if panel in run.students else None
    return None if ys is None or any(y is None for y in ys) else ys


def plot_w_hist(stats: dict, path: Path) -> bool:
    """Histogram of the teacher's per-sample weight w, with the low-confidence threshold and the mean."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.4))
    if "w_clean" in stats:  # the learnable dataset: clean and deliberately ambiguous samples, stacked
        ax.hist([stats["w_clean"], stats["w_ambiguous"]], bins=50, range=(0.0, 1.0), stacked=True,
                color=["tab:blue", "tab:orange"], label=["clean", "ambiguous"])
    else:
        ax.hist(stats["w"], bins=50, range=(0.0, 1.0), color="tab:blue")
    ax.axvline(stats["low_w"], color="tab:red", ls="--", label=f"w = {stats['low_w']:g}")
    ax.axvline(stats["all"]["w_mean"], color="k", ls=":", label=f"mean {stats['all']['w_mean']:.3f}")
    ax.set_xlabel("teacher confidence weight w = 1 - H / log C")
    ax.set_ylabel("samples x aug. epochs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return True


def _save_fig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    atomic_replace(tmp, path)
