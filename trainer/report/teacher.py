"""The report's teacher-uncertainty part: statistics of w and entropy over a teacher cache, optionally split
by the learnable dataset's clean and ambiguous samples (does the teacher's confidence track ambiguity?)."""
from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np

from pipeline.core.entropy import entropy


def teacher_stats(cache_path: str | Path, tau: float, low_w: float = 0.5,
                  kinds: np.ndarray | None = None) -> dict:
    """Mean w, mean entropy at tau=1 and at tau (nats), share with w < low_w, over every cached (epoch, sample).

    kinds: optional label per train sample id ("" = clean, else the ambiguity kind); adds a per-kind breakdown.
    """
    from pipeline.cache.store import TeacherCache
    from pipeline.core.errors import RunFormatError

    with TeacherCache(cache_path, prefetch=False) as cache:
        cache.check_complete()
        ws, h1, ht = [], [], []
        for e in range(cache.epochs):
            logits, w = cache.lookup(e, np.arange(cache.num_samples))
            ws.append(w)
            h1.append(entropy(logits, 1.0))
            ht.append(entropy(logits, tau))
        c, n = cache.num_classes, cache.num_samples
    w, e1, et = np.stack(ws), np.stack(h1), np.stack(ht)  # (E, N)
    out = {"path": str(cache_path), "epochs": len(ws), "samples": n, "classes": c, "tau": tau, "low_w": low_w,
           "log_c": math.log(c), "w": w.ravel(), "all": _summary(w, e1, et, low_w), "by_kind": {}}
    if kinds is not None:
        if len(kinds) != n:
            raise RunFormatError(f"{cache_path}: {len(kinds)} sample kinds for a cache of {n} samples")
        for kind in sorted(set(kinds.tolist()), key=lambda k: (k != "", k)):
            sel = kinds == kind
            out["by_kind"][kind or "clean"] = _summary(w[:, sel], e1[:, sel], et[:, sel], low_w)
        out["w_clean"], out["w_ambiguous"] = w[:, kinds == ""].ravel(), w[:, kinds != ""].ravel()
    return out


def _summary(w: np.ndarray, e1: np.ndarray, et: np.ndarray, low_w: float) -> dict:
    return {"count": int(w.shape[1]), "w_mean": float(w.mean()), "entropy_tau1": float(e1.mean()),
            "entropy_tau": float(et.mean()), "low_share": float((w < low_w).mean())}


def read_description(path: str | Path) -> dict:
    """A learnable dataset's learnable.json, or the tree holding it (report --learnable); anything else is a
    ConfigError naming it (checked when `report` starts, used or not)."""
    from pipeline.core.errors import ConfigError, one_line
    from pipeline.sources.learnable import DESCRIPTION_FILE

    path = Path(path) / DESCRIPTION_FILE if Path(path).is_dir() else Path(path)
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON
        raise ConfigError(f"--learnable {path}: not a learnable dataset's description ({one_line(e, 200)}); give "
                          f"the tree `kdpipe synth --learnable` wrote or its learnable.json") from e
    if not isinstance(data, dict) or not isinstance(data.get("ambiguous"), dict):
        raise ConfigError(f"--learnable {path}: not a learnable dataset's description (no \"ambiguous\" object); "
                          f"give the tree `kdpipe synth --learnable` wrote or its learnable.json")
    return data


def sample_kinds(shards: str | Path, description: str | Path) -> np.ndarray:
    """Per train sample id: "" for a clean sample, else its ambiguity kind from the learnable dataset's
    learnable.json. Sources come from each sample's .json member, read in order (no extraction by name).

    The description must be of the dataset the shards were made from (RunFormatError naming both otherwise):
    the same classes, every sample's source one of its train files, and, where the tree's images lie beside
    it and the shards kept their bytes, the same JPEG bytes (crc32) for the first samples."""
    import zlib

    from pipeline.core.errors import RunFormatError, ShardFormatError
    from pipeline.reader.index import read_manifest

    from pipeline.sources.learnable import DESCRIPTION_FILE

    shards, description = Path(shards), Path(description)
    desc = read_description(description)  # a ConfigError naming the file when it is no description at all
    description = description / DESCRIPTION_FILE if description.is_dir() else description
    try:
        ambiguous, wnids = desc["ambiguous"], list(desc["wnids"])
        files = {rel for rels in desc["train"].values() for rel in rels}
    except (KeyError, TypeError, AttributeError) as e:
        raise RunFormatError(f"--learnable {description}: not a learnable dataset's description "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None

    def foreign(why: str) -> RunFormatError:
        return RunFormatError(f"--learnable {description} does not describe the dataset of the runs' shards "
                              f"{shards}: {why}; give the learnable dataset those shards were made from")

    manifest = read_manifest(shards)
    if sorted(wnids) != sorted(c["wnid"] for c in manifest["classes"]):
        raise foreign(f"{len(wnids)} classes vs the shards' {len(manifest['classes'])} (or other class names)")
    train = manifest["splits"]["train"]
    root = description.parent
    same_bytes = manifest.get("options", {}).get("max_side") is None
    kinds = np.full(int(train["count"]), "", dtype=object)
    seen = 0
    for shard in train["shards"]:
        with tarfile.open(shards / shard["name"]) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    meta = json.load(tar.extractfile(member))
                    if meta["source"] not in files:
                        raise foreign(f"sample {meta['id']} comes from {meta['source']!r}, not one of its files")
                    image = root / meta["source"]
                    if same_bytes and seen < 8 and image.is_file() \
                            and zlib.crc32(image.read_bytes()) != int(meta["jpg_crc32"]):
                        raise foreign(f"{image} differs from sample {meta['id']} of the shards (another seed?)")
                    kinds[int(meta["id"])] = ambiguous.get(meta["source"], {}).get("kind", "")
                    seen += 1
    if seen != len(kinds):
        raise ShardFormatError(f"{shards}: found {seen} sample records in the train shards, manifest says "
                               f"{len(kinds)}")
    return kinds


def teacher_section(runs: list, stats: dict | None, hist_png: str | None, table) -> list[str]:
    """Markdown: the cache's statistics (and per kind), the histogram, and the trainer's own batch means."""
    out = ["## Teacher uncertainty", ""]
    if stats is not None:
        out += [f"From the teacher cache `{stats['path']}` ({stats['epochs']} augmentation epoch(s) x "
                f"{stats['samples']} samples, C = {stats['classes']}, log C = {stats['log_c']:.3f} nats):", ""]
        groups = [("all samples", stats["all"])] + [(f"{k} samples", v) for k, v in stats["by_kind"].items()]
        out += table(["samples", "count", "mean w", "mean entropy, tau=1 (nats)",
                      f"mean entropy, tau={stats['tau']:g} (nats)", f"share with w < {stats['low_w']:g}"],
                     [[name, str(s["count"]), f"{s['w_mean']:.4f}", f"{s['entropy_tau1']:.4f}",
                       f"{s['entropy_tau']:.4f}", f"{100 * s['low_share']:.1f} %"] for name, s in groups])
        out += ["", "w = 1 - H(softmax(z_T)) / log C at tau = 1 (the weight the trainer uses by default)."
                + (" Kinds are the learnable dataset's deliberately ambiguous samples (mix: blended with another "
                   "class; occlude: a patch over the shape; noise: heavy noise)." if stats["by_kind"] else ""), ""]
        if hist_png:
            out += [f"![histogram of w]({hist_png})", ""]
    rows = [[r.name, r.mode, _f4(r.final.w_mean), _f4(r.final.teacher_entropy_tau1), _f4(r.final.teacher_entropy_tau)]
            for r in runs if r.final.w_mean is not None]
    if rows:
        out += ["As the trainer saw it on its training batches (final epoch; w as applied, so 1 in modes "
                "without uncertainty weighting):", ""]
        out += table(["run", "mode", "mean w applied", "mean entropy tau=1", "mean entropy tau"], rows) + [""]
    if stats is None and not rows:
        out += ["No run used a teacher, so there are no teacher statistics.", ""]
    return out


def _f4(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"
