"""What the teacher is unsure of: the most and least confident training views according to a teacher cache,
rendered through the training loader (same shards, aug spec, seed and augmentation epoch as the cache), so
the picture shows exactly the pixels the students saw with those logits."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from trainer.report.plots import _pyplot, _save_fig
from trainer.report.tables import md_table


def pick_extremes(w: np.ndarray, k: int = 16) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(aug epoch, sample id) of the k highest and the k lowest w over a (E, N) array, each sample at most
    once per list (its most, resp. least, confident epoch); ties go to the lower epoch, then id."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be (epochs, samples), got shape {w.shape}")
    flat = w.ravel()

    def first_k(order: np.ndarray) -> list[tuple[int, int]]:
        seen, out = set(), []
        for pos in order:
            e, i = divmod(int(pos), w.shape[1])
            if i not in seen:
                seen.add(i)
                out.append((e, i))
                if len(out) == k:
                    break
        return out

    return first_k(np.argsort(-flat, kind="stable")), first_k(np.argsort(flat, kind="stable"))


def render_views(shards: str | Path, seed: int, spec, backend: str,
                 picks: list[tuple[int, int]]) -> tuple[dict[tuple[int, int], np.ndarray], dict[int, int]]:
    """HWC uint8 pixels per (aug epoch, id) and each id's label, from ImageNet100Loader.iter_views."""
    from pipeline.reader.loader import ImageNet100Loader

    loader = ImageNet100Loader(shards, "train", batch_size=max(1, len(picks)), seed=seed, backend=backend,
                               device="cpu", spec=spec, normalize=False, num_workers=0)
    pixels, labels = {}, {}
    for epoch in sorted({e for e, _ in picks}):
        ids = [i for e, i in picks if e == epoch]
        for batch in loader.iter_views(ids, epoch):
            for img, lab, i in zip(batch.images, batch.labels.tolist(), batch.ids.tolist()):
                pixels[(epoch, int(i))] = img.permute(1, 2, 0).contiguous().numpy()
                labels[int(i)] = int(lab)
    return pixels, labels


def teacher_views_section(cache_path: str | Path, shards: str | Path, png: Path, k: int = 16,
                          kinds: np.ndarray | None = None) -> list[str]:
    """Markdown (and the PNG) of the k most and k least confident training views of the cache."""
    from pipeline.core.augment import AugSpec
    from pipeline.reader.index import read_manifest
    from pipeline.reader.backends.registry import backend_entry, backend_names
    from pipeline.reader.index import manifest_sha256
    from pipeline.cache.store import TeacherCache

    out = ["## What the teacher is unsure of", ""]
    with TeacherCache(cache_path, prefetch=False) as cache:
        fp = cache.fingerprint
        w = np.stack([cache.lookup(e, np.arange(cache.num_samples))[1] for e in range(cache.epochs)])
        most, least = pick_extremes(w, k)
        top = {(e, i): int(np.argmax(cache.lookup(e, np.array([i]))[0][0])) for e, i in most + least}
    from pipeline.core.remote import is_url

    if is_url(shards):  # the views are rendered by random access into local shards
        return out + [f"Not drawn: the shards of the run that used `{cache_path}` are a URL ({shards}); the picture "
                      "reads local shards only (give the report a run trained on a local copy).", ""]
    if not shards or not (Path(shards) / "manifest.json").is_file():
        return out + [f"Not drawn: the shards of the run that used `{cache_path}` ({shards or 'unknown'}) are "
                      "not there.", ""]
    if manifest_sha256(shards) != fp.get("manifest_sha256"):
        return out + [f"Not drawn: `{shards}` are not the shards the cache `{cache_path}` was made from.", ""]
    fields = {f.name for f in dataclasses.fields(AugSpec)}
    spec = AugSpec(**{k_: (tuple(v) if isinstance(v, list) else v) for k_, v in fp.get("aug_spec", {}).items()
                      if k_ in fields})
    if spec.fingerprint() != fp.get("aug_fingerprint"):
        return out + [f"Not drawn: this kdpipe cannot rebuild the augmentation of `{cache_path}` "
                      f"(spec {fp.get('aug_fingerprint')}, rebuilt {spec.fingerprint()}).", ""]
    backend = str(fp.get("backend", "torch"))
    note = ""
    entry = backend_entry(backend) if backend in backend_names() else None
    if entry is not None and entry.stand_in and not entry.available():  # e.g. DALI not installed: torch draws
        backend, note = entry.stand_in, " " + entry.stand_in_note
    pixels, labels = render_views(shards, int(fp["seed"]), spec, backend, most + least)
    names = [c.get("name", c["wnid"]).split(",")[0] for c in read_manifest(shards)["classes"]]
    picks = [("most confident", e, i) for e, i in most] + [("least confident", e, i) for e, i in least]
    rows = [[group, str(i), str(e), f"{w[e, i]:.3f}", names[labels[i]], names[top[(e, i)]]]
            + ([kinds[i] or "clean"] if kinds is not None else []) for group, e, i in picks]
    drawn = _draw(png, picks, pixels, labels, top, w, names)
    out += [f"The {len(most)} most and {len(least)} least confident training views according to the teacher cache "
            f"`{cache_path}` (w as cached: 1 - H/log C at tau = 1), each rendered by the training loader "
            f"(`ImageNet100Loader.iter_views`, seed {fp['seed']}, its augmentation epoch, {backend} backend on the "
            f"CPU): the crop, flip and colour factors of the view the students saw with those logits, and its "
            f"very pixels where training decoded on the CPU (a GPU decoder can differ by a few grey levels)."
            f"{note}", ""]
    if drawn:
        out += [f"![most and least confident training views]({png.name})", "",
                "Each title: w, the true label, the teacher's top class (green: the teacher is right; red: wrong).",
                ""]
    header = ["group", "sample id", "aug epoch", "w", "true label", "teacher's top class"]
    return out + md_table(header + (["kind"] if kinds is not None else []), rows) + [""]


def _draw(png: Path, picks, pixels, labels, top, w, names) -> bool:
    """The grid of views (8 a row), each titled with w, the true label and the teacher's top class."""
    plt = _pyplot()
    if plt is None:
        return False
    cols = 8
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 2.05 * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for n, (group, e, i) in enumerate(picks):
        ax = axes.ravel()[n]
        ax.imshow(pixels[(e, i)], interpolation="nearest")
        right = top[(e, i)] == labels[i]
        ax.set_title(f"w={w[e, i]:.3f}\ntrue: {names[labels[i]][:14]}\nteacher: {names[top[(e, i)]][:14]}",
                     fontsize=7, color="tab:green" if right else "tab:red")
    most_rows = -(-sum(group == "most confident" for group, _, _ in picks) // cols)
    fig.suptitle(f"Most confident training views (rows 1-{most_rows}) and least confident (rows {most_rows + 1}-"
                 f"{rows}), by the teacher cache's w", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.85 / fig.get_figheight(), wspace=0.08,
                        hspace=0.55)  # fixed margins: tight_layout costs a second per call with 32 panels
    _save_fig(fig, png)
    plt.close(fig)
    return True
