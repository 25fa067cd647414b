"""The report's tables (markdown lines) from loaded runs (trainer.report.build.Run): Tables I-IV, convergence,
accuracy per epoch. Runs of one mode are pooled by seed; cells and verdicts come from stats.py."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.report import stats as st

LADDER = ("hard", "kd", "uw-kd", "dual")  # the paper's ablation order
LADDER_LABEL = {"hard": "hard labels", "kd": "+KD", "uw-kd": "+uncertainty weight", "dual": "+peer (dual)"}
REUSED_MARK = "†"  # next to a number that comes from a run which repeated augmented views

# The paper's models: name, parameters in millions as the paper gives them (1000-class heads).
PAPER_MODELS = {"resnet50": ("ResNet-50", 25.6), "resnet18": ("ResNet-18", 11.7), "mobilenet_v2": ("MobileNetV2", 3.5)}
# The demo's tiny CPU models and the paper's model each one stands in for.
STAND_INS = {"tiny_resnet": "resnet50", "tiny_cnn": "resnet18", "tiny_mobilenet": "mobilenet_v2"}


def paper_model(name: str, role: str = "student") -> str | None:
    """The paper's model a model is or stands in for (a tiny teacher stands in for ResNet-50); None if neither."""
    name = name.split("#")[0]
    if name in PAPER_MODELS:
        return name
    if name in STAND_INS:
        return "resnet50" if role == "teacher" else STAND_INS[name]
    return None


def label(name: str, role: str = "student") -> str:
    """A model's name as the tables show it: a stand-in says which of the paper's models it stands for."""
    paper = paper_model(name, role)
    if paper is None or paper == name.split("#")[0]:
        return name
    return f"{name} (stands in for {PAPER_MODELS[paper][0]})"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _f(x: float | None, nd: int = 2, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


@dataclass(frozen=True)
class Cell:
    """One table cell pooled over seeds: {seed: value} (runs of one seed averaged), the validation count
    (for the binomial SE with one seed) and whether any of its runs reused views."""

    by_seed: dict[int, float]
    n_val: int | None = None
    reused: bool = False

    @property
    def mean(self) -> float | None:
        return st.mean_sd(list(self.by_seed.values()))[0] if self.by_seed else None

    def text(self, nd: int = 2) -> str:
        if not self.by_seed:
            return "—"
        m, sd = st.mean_sd(list(self.by_seed.values()))
        if sd is not None:
            s = f"{m:.{nd}f} ± {sd:.{nd}f}"
        elif self.n_val:
            s = f"{m:.{nd}f} ± {st.binomial_se(m, self.n_val):.{nd}f} SE"
        else:
            s = f"{m:.{nd}f}"
        return s + (f" {REUSED_MARK}" if self.reused else "")


def cell(runs: list, mode: str, student: str, value: Callable, *, accuracy: bool = True) -> Cell:
    """The runs of `mode` that trained `student`: value(run, student) per seed (None values skipped)."""
    groups: dict[int, list[float]] = {}
    n_val, reused = [], False
    for r in runs:
        if r.mode != mode or student not in r.students:
            continue
        v = value(r, student)
        if v is None:
            continue
        groups.setdefault(r.seed, []).append(float(v))
        reused |= r.reused_views
        if accuracy and r.final.val_images:
            n_val.append(int(r.final.val_images))
    return Cell({s: sum(v) / len(v) for s, v in sorted(groups.items())}, min(n_val) if n_val else None, reused)


def top1(r, s) -> float | None:
    return r.acc(s, 1)


def top5(r, s) -> float | None:
    return r.acc(s, 5)


def change(a: Cell, b: Cell) -> tuple[str, str, str, str]:
    """(mean change, 95 % CI, verdict, seeds) from a to b, as table cells."""
    ci = st.change_ci(a.by_seed, b.by_seed, a.n_val, b.n_val)
    if ci is None:
        d = None if a.mean is None or b.mean is None else b.mean - a.mean
        return _f(d, sign=True), "—", "no common seed" if d is not None else "—", "0"
    return (_f(ci.mean, sign=True), f"[{ci.lo:+.2f}, {ci.hi:+.2f}]", ci.verdict,
            str(ci.n) if ci.method == "paired t" else "1")


def _students(runs: list, modes=None) -> list[str]:
    return list(dict.fromkeys(s for r in runs if modes is None or r.mode in modes for s in r.students))


def _reused_note(cells: list[Cell]) -> list[str]:
    return ([f"{REUSED_MARK} from a run that repeated augmented views (more epochs than distinct views; see the "
             "run list).", ""] if any(c.reused for c in cells) else [])


def table_one(runs: list, teacher) -> list[str]:
    """Table I: per student, baseline KD vs dual, top-1/top-5, the change with its interval and verdict."""
    rows, notes, cells = [], [], []
    for s in _students(runs, ("kd", "dual")):
        kd1, kd5, du1, du5 = (cell(runs, m, s, f) for m in ("kd", "dual") for f in (top1, top5))
        cells += [kd1, kd5, du1, du5]
        d1, ci, verdict, n = change(kd1, du1)
        d5 = None if kd5.mean is None or du5.mean is None else du5.mean - kd5.mean
        rows.append([label(s), kd1.text(), kd5.text(), du1.text(), du5.text(), d1, ci, verdict, n, _f(d5, sign=True)])
        if kd1.mean is not None and du1.mean is not None and du1.mean < kd1.mean:
            notes.append(f"- {s}: here the dual method is {kd1.mean - du1.mean:.2f} points below baseline KD in "
                         f"top-1 ({verdict}); the paper reports the dual method above baseline KD for both students.")
    duals = [r for r in runs if r.mode == "dual" and len(r.students) > 1]
    ens1 = cell(duals, "dual", duals[0].students[0], lambda r, _: r.final.val_ensemble_top1) if duals else Cell({})
    ens5 = cell(duals, "dual", duals[0].students[0], lambda r, _: r.final.val_ensemble_top5) if duals else Cell({})
    if ens1.by_seed:
        rows.append([f"ensemble ({len(duals)} dual run(s))", "—", "—", ens1.text(), ens5.text()] + ["—"] * 5)
    out = ["## Table I: top-1 / top-5 accuracy (%), baseline KD vs uncertainty-aware dual-student KD", ""]
    out += md_table(["student", "KD top-1", "KD top-5", "dual top-1", "dual top-5", "Δ top-1", "95 % CI",
                     "verdict", "seeds", "Δ top-5"], rows)
    out.append("")
    if teacher is not None:
        out += [f"Teacher {label(s, 'teacher')} (run {teacher.name}): top-1 {_f(teacher.acc(s, 1))}, top-5 "
                f"{_f(teacher.acc(s, 5))}." for s in teacher.students] + [""]
    else:
        online = next((r for r in runs if r.final.teacher_val), None)
        if online is not None:
            tv = online.final.teacher_val
            out += [f"Teacher (online, measured by run {online.name}): top-1 {_f(tv['top1'][0])}, "
                    f"top-5 {_f(tv['top5'][0])}.", ""]
    return out + _reused_note(cells) + (notes + [""] if notes else []) + [st.method_note(), ""]


def table_two(runs: list) -> list[str]:
    rows = []
    for r in runs:
        peak = max((e.peak_mem_mb for e in r.epochs if e.peak_mem_mb is not None), default=None)
        rows.append([r.name + (f" {REUSED_MARK}" if r.reused_views else ""), r.mode, str(r.seed), ", ".join(r.students),
                     str(len(r.epochs)), str(sum(e.images for e in r.epochs)), _f(r.train_time_s, 1),
                     _f(r.images_per_s, 1), _f(None if r.train_time_s is None else r.train_time_s / len(r.epochs), 1),
                     _f(peak, 0)])
    out = ["## Table II: training time and throughput per run", ""]
    out += md_table(["run", "mode", "seed", "students", "epochs", "train images", "train time (s)", "images/s",
                     "s/epoch", "peak memory (MB)"], rows)
    return out + ["", "Train time is the sum of the epochs' training time as the trainer measured it (validation "
                  "excluded); images/s is training images over that time, each image counted once however many "
                  "students it trains. Peak memory: the trainer's figure (GPU allocated on CUDA, process max RSS "
                  "on the CPU).", ""]


def table_three(runs: list) -> list[str]:
    """Table III: the ladder per student (mean ± sd or ± SE), then each rung's change with its verdict."""
    rows, changes, notes, cells = [], [], [], []
    for s in _students(runs):
        per = {m: cell(runs, m, s, top1) for m in LADDER}
        if sum(bool(c.by_seed) for c in per.values()) < 2:
            continue
        cells += per.values()
        rows.append([label(s)] + [per[m].text() for m in LADDER])
        prev = None
        for m in LADDER:
            if not per[m].by_seed:
                continue
            if prev is not None:
                d, ci, verdict, n = change(per[prev], per[m])
                changes.append([label(s), f"{LADDER_LABEL[prev]} -> {LADDER_LABEL[m]}", d, ci, verdict, n])
                if per[m].mean < per[prev].mean:
                    notes.append(f"- {s}: {LADDER_LABEL[m]} is {per[prev].mean - per[m].mean:.2f} points below the "
                                 f"rung before it ({verdict}); in the paper every rung improves on the one before.")
            prev = m
    out = ["## Table III: ablation ladder, top-1 %", ""]
    out += md_table(["student"] + [LADDER_LABEL[m] for m in LADDER], rows) + [""]
    if changes:
        out += ["Each rung's change in top-1 (points), with its 95 % confidence interval:", ""]
        out += md_table(["student", "change", "Δ top-1", "95 % CI", "verdict", "seeds"], changes) + [""]
    return out + _reused_note(cells) + _views_mismatch(runs) + (notes + [""] if notes else [])


def _views_mismatch(runs: list) -> list[str]:
    """A note where ladder runs of one seed saw different numbers of distinct views per sample."""
    out = []
    for seed in sorted({r.seed for r in runs}):
        vps = {r.name: r.runtime.get("views_per_sample") for r in runs if r.seed == seed}
        known = {k: v for k, v in vps.items() if v is not None}
        if len(set(known.values())) > 1:
            out.append(f"- seed {seed}: the rungs did not see the same number of distinct views per sample ("
                       + ", ".join(f"{k}: {v}" for k, v in known.items()) + "), so their comparison mixes in "
                       "view repetition.")
    return out + [""] if out else []


def convergence(runs: list) -> list[str]:
    """The final epoch's training loss per student and rung: each rung's own objective, and its CE part."""
    students = _students(runs, LADDER)
    if not students:
        return []
    out = ["## Convergence: final-epoch training loss", ""]
    for title, field in (("the rung's objective: alpha CE + beta teacher + gamma peer", "loss"),
                         ("its cross-entropy with the labels (the same quantity in every rung)", "hard")):
        rows = [[label(s)] + [cell(runs, m, s, lambda r, s_, f=field: getattr(r.student(s_), f),
                                   accuracy=False).text(3) for m in LADDER] for s in students]
        out += [f"Per-sample mean over the final epoch's training batches, {title}:", ""]
        out += md_table(["student"] + [LADDER_LABEL[m] for m in LADDER], rows) + [""]
    return out


def param_count(name: str, num_classes: int) -> int | None:
    """Parameters of registry model `name` with a num_classes head (built on the meta device: no memory);
    None for a name the registry does not know."""
    import torch

    from trainer.engine.models import MODELS, build_model

    if name not in MODELS:
        return None
    with torch.device("meta"):
        model = build_model(name, num_classes)
    return sum(p.numel() for p in model.parameters())


def _m(n: int | None, nd: int) -> str:
    return "—" if n is None else f"{n / 1e6:.{nd}f}"


def table_four(runs: list, teacher: str | None, num_classes: int | None) -> list[str]:
    """Table IV: parameters (M) and compression vs the teacher of the models used, beside the paper's."""
    out = ["## Table IV: model size and compression", ""]
    if num_classes is None:
        return out + ["Not computed: neither the runs' shards nor a teacher cache was found to give the class "
                      "count.", ""]
    models = ([(teacher, "teacher")] if teacher else []) + \
        [(s, "student") for s in dict.fromkeys(s.split("#")[0] for r in runs for s in r.students)]
    t_params = param_count(teacher, num_classes) if teacher else None
    paper_teacher = PAPER_MODELS["resnet50"][1]
    rows = []
    for name, role in models:
        n, paper = param_count(name, num_classes), paper_model(name, role)
        p_name, p_m = PAPER_MODELS.get(paper, (None, None))
        rows.append([name, role, p_name if paper and paper != name else "—", _m(n, 3),
                     f"{t_params / n:.2f}x" if t_params and n else "—", p_name or "—", _f(p_m, 1),
                     f"{paper_teacher / p_m:.2f}x" if p_m else "—",
                     _m(param_count(paper, num_classes), 2) if paper else "—"])
    out += md_table(["model", "role", "stands in for", "parameters (M)", "compression vs teacher", "paper's model",
                     "paper's parameters (M)", "paper's compression", f"paper's model at {num_classes} classes (M)"],
                    rows)
    return out + ["", f"Parameters are counted from the models as built here (`trainer.engine.models.build_model(name, "
                  f"{num_classes})`). The paper's figures (25.6 / 11.7 / 3.5 M) are torchvision's 1000-class counts; "
                  f"the last column is the same architecture with this run's {num_classes}-class head. Compression "
                  "is the teacher's parameters over the model's.", ""]


def epochs_section(runs: list, plot_png: str | None) -> list[str]:
    out = ["## Validation top-1 per epoch", ""]
    if plot_png:
        out += [f"![validation accuracy per epoch]({plot_png})", ""]
    width = max(len(r.epochs) for r in runs)
    header = ["run", "student"] + [str(e + 1) for e in range(width)]
    rows = []
    for r in runs:
        series = [(s, [r.acc(s, 1, e) for e in r.epochs]) for s in r.students]
        if len(r.students) > 1:
            series.append(("ensemble", [e.val_ensemble_top1 for e in r.epochs]))
        rows += [[r.name, s] + [_f(v, 1) for v in vals] + [""] * (width - len(vals)) for s, vals in series]
    return out + md_table(header, rows) + [""]
