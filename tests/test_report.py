"""`kdpipe report`: tables from hand-written runs in the trainer's metrics.jsonl format, teacher stats, plots."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from trainer.report import build as rep
from trainer.cli import main
from trainer.report.teacher import sample_kinds


def _line(epoch, students, top1, top5, *, images=1000, t=10.0, w=None, ens=None, loss=1.0, val_images=200):
    """One epoch's record as trainer/engine/loop.py writes it."""
    rec = {"epoch": epoch, "lr": 0.1, "images": images, "epoch_time_s": t, "images_per_s": images / t,
           "peak_mem_mb": 500.0 + epoch, "peak_mem_kind": "cpu_max_rss", "val_images": val_images, "teacher_val": None,
           "w_mean": w, "val_ensemble_top1": ens[0] if ens else top1[0], "val_ensemble_top5": ens[1] if ens else top5[0]}
    if w is not None:
        rec.update(teacher_entropy_tau1=1.5, teacher_entropy_tau=4.2)
    for i, s in enumerate(students):
        rec[f"s{i}"] = {"name": s, "loss": loss + i, "hard": loss / 2 + i, "teacher": 0.0, "peer": 0.0, "w": w or 0.0,
                        "train_acc": 50.0, "val_top1": top1[i], "val_top5": top5[i]}
    return rec


def make_run(root, name, mode, students, finals, *, epochs=2, cache=None, tau=4.0, teacher_weights=None, seed=0,
             train_loss=1.0, **config):
    """A run dir whose last epoch has top-1 = finals[i] (top-5 = finals + 20); earlier epochs 10 points lower.
    Student i's final training loss is train_loss + i, its cross-entropy train_loss / 2 + i."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"mode": mode, "students": list(students), "loss": {"tau": tau}, "teacher_cache": cache,
           "teacher_weights": teacher_weights, "epochs": epochs, "seed": seed, **config}
    (run / "config.json").write_text(json.dumps(cfg))
    lines = []
    for e in range(epochs):
        top1 = [f - 10 * (epochs - 1 - e) for f in finals]
        ens = (max(top1) + 1, max(top1) + 21) if len(students) > 1 else None
        lines.append(_line(e, students, top1, [a + 20 for a in top1], t=10.0 + e,
                           w=None if mode == "hard" else 0.6, ens=ens, loss=train_loss))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


@pytest.fixture
def ladder(tmp_path):
    """teacher, hard, kd, uw-kd (both students each, independent) and dual runs."""
    rn, mb = "resnet18", "mobilenet_v2"
    runs = [make_run(tmp_path, "teacher", "hard", ["resnet50"], [80.0], epochs=3),
            make_run(tmp_path, "hard", "hard", [rn, mb], [50.0, 45.0]),
            make_run(tmp_path, "kd", "kd", [rn, mb], [55.0, 48.0], teacher_weights=str(tmp_path / "teacher" / "w.pt")),
            make_run(tmp_path, "uw-kd", "uw-kd", [rn, mb], [57.0, 47.0]),
            make_run(tmp_path, "dual", "dual", [rn, mb], [58.5, 49.25])]
    return runs


def test_tables_match_the_runs(tmp_path, ladder):
    path = rep.write_report(ladder, tmp_path / "out")
    text = path.read_text()
    # Table I: KD vs dual, one seed: each accuracy with its binomial SE on 200 validation images
    # (55 %: 100 sqrt(.55 .45 / 200) = 3.52), the change with a normal 95 % interval from the two SEs
    # (1.96 hypot(3.518, 3.484) = 9.70); the teacher run is found through kd's teacher_weights.
    assert ("| resnet18 | 55.00 ± 3.52 SE | 75.00 ± 3.06 SE | 58.50 ± 3.48 SE | 78.50 ± 2.90 SE | +3.50 | "
            "[-6.20, +13.20] | within noise | 1 | +3.50 |") in text
    assert "| mobilenet_v2 | 48.00 ± 3.53 SE | 68.00 ± 3.30 SE | 49.25 ± 3.54 SE |" in text
    assert "| ensemble (1 dual run(s)) | — | — | 59.50 ± 3.47 SE | 79.50 ± 2.85 SE |" in text
    assert "Teacher resnet50 (run teacher): top-1 80.00, top-5 100.00." in text
    # Table II: time = sum of epoch times, images/s = images / time.
    assert "| kd | kd | 0 | resnet18, mobilenet_v2 | 2 | 2000 | 21.0 | 95.2 | 10.5 | 501 |" in text
    # Table III: the ladder, each rung's change; mobilenet's uw-kd step goes down and the report says so.
    assert "| resnet18 | 50.00 ± 3.54 SE | 55.00 ± 3.52 SE | 57.00 ± 3.50 SE | 58.50 ± 3.48 SE |" in text
    assert "| mobilenet_v2 | +KD -> +uncertainty weight | -1.00 | [-10.79, +8.79] | within noise | 1 |" in text
    assert "mobilenet_v2: +uncertainty weight is 1.00 points below the rung before it (within noise)" in text
    assert "- resnet18: +" not in text
    # Convergence: the final epoch's training loss (student i: 1 + i) and its cross-entropy (0.5 + i).
    assert "| resnet18 | 1.000 | 1.000 | 1.000 | 1.000 |" in text and "| mobilenet_v2 | 1.500 | 1.500 |" in text
    # The assumptions table is in every report; these hand-written configs lack the keys: all default.
    assert "## Assumptions where the paper is silent" in text
    assert "| `--kl-direction forward\\|reverse` | default |" in text
    # Per-epoch table and plots.
    assert "| dual | ensemble | 49.5 | 59.5 |  |" in text  # padded to the teacher's 3 epochs
    assert (tmp_path / "out" / "val_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![validation accuracy per epoch](val_accuracy.png)" in text


def test_dual_below_kd_is_called_out(tmp_path):
    runs = [make_run(tmp_path, "kd", "kd", ["resnet18"], [60.0]),
            make_run(tmp_path, "dual", "dual", ["resnet18", "mobilenet_v2"], [58.0, 40.0])]
    text = rep.write_report(runs, tmp_path / "out").read_text()
    assert "| resnet18 | 60.00 ± 3.46 SE | 80.00 ± 2.83 SE | 58.00 ± 3.49 SE | 78.00 ± 2.93 SE | -2.00 |" in text
    assert "| mobilenet_v2 | — | — | 40.00 ± 3.46 SE | 60.00 ± 3.46 SE | — | — | — | 0 | — |" in text
    assert "resnet18: here the dual method is 2.00 points below baseline KD in top-1 (within noise)" in text


def _cache(path, logits, fingerprint=None):
    from pipeline.cache.store import CacheLayout, TeacherCacheWriter

    e, n, c = logits.shape
    w = TeacherCacheWriter.create(path, CacheLayout(epochs=e, num_samples=n, num_classes=c, chunk_n=n),
                                  fingerprint or {"t": 1})
    for epoch in range(e):
        w.write_unit(epoch, 0, logits[epoch])


def test_teacher_statistics_from_the_cache(tmp_path):
    c = 10
    confident = np.zeros((1, 30, c), np.float32)
    confident[0, :, 0] = 12.0  # w close to 1
    uniform = np.zeros((1, 10, c), np.float32)  # w = 0
    logits = np.concatenate([confident, uniform], axis=1)
    _cache(tmp_path / "t.zarr", logits)
    run = make_run(tmp_path, "dual", "dual", ["resnet18", "mobilenet_v2"], [50.0, 40.0], cache=str(tmp_path / "t.zarr"))
    stats = rep.teacher_stats(tmp_path / "t.zarr", tau=4.0, low_w=0.5)
    p = np.exp(12.0) / (np.exp(12.0) + 9)
    h1 = -(p * math.log(p) + (1 - p) * math.log((1 - p) / 9))
    a = stats["all"]
    assert a["low_share"] == pytest.approx(0.25) and a["count"] == 40
    assert a["entropy_tau1"] == pytest.approx((30 * h1 + 10 * math.log(c)) / 40, rel=1e-3)
    assert a["w_mean"] == pytest.approx((30 * (1 - h1 / math.log(c))) / 40, rel=1e-3)
    assert a["entropy_tau1"] < a["entropy_tau"] <= math.log(c)
    text = rep.write_report([run], tmp_path / "out").read_text()
    assert f"| all samples | 40 | {a['w_mean']:.4f} | {a['entropy_tau1']:.4f} | {a['entropy_tau']:.4f} | 25.0 % |" in text
    assert (tmp_path / "out" / "w_histogram.png").stat().st_size > 1000
    assert "| dual | dual | 0.6000 | 1.5000 | 4.2000 |" in text  # the trainer's own batch statistics


def test_tables_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(rep.plots, "_pyplot", lambda: None)
    run = make_run(tmp_path, "kd", "kd", ["resnet18"], [60.0])
    text = rep.write_report([run], tmp_path / "out").read_text()
    assert "## Table I" in text and "Plots skipped: matplotlib is not installed" in text
    assert not list((tmp_path / "out").glob("*.png"))


def test_resumed_epoch_lines_keep_the_last(tmp_path):
    run = make_run(tmp_path, "kd", "kd", ["resnet18"], [60.0])
    extra = _line(1, ["resnet18"], [61.0], [81.0])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    r = rep.load_run(run)
    assert [e.epoch for e in r.epochs] == [0, 1] and r.acc("resnet18") == 61.0


def test_bad_runs_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        rep.load_run(tmp_path / "empty")
    run = make_run(tmp_path, "kd", "kd", ["resnet18"], [60.0])
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3"):
        rep.load_run(run)


def test_cli_report(tmp_path, ladder):
    result = CliRunner().invoke(main, ["report", *map(str, ladder[1:]), "--teacher", str(ladder[0]),
                                       "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.md").is_file() and "report.md" in result.output
    bad = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "r2")])
    assert bad.exit_code != 0 and "config.json not found" in bad.output


def test_teacher_statistics_split_clean_and_ambiguous(tmp_path):
    """With the learnable dataset's description, w is broken down by kind (ids found through the shards)."""
    from pipeline.sources.learnable import make_learnable_tree
    from pipeline.shards.writer import ShardOptions, build_shards

    wnids = ["n01749939", "n02488291", "n02869837"]
    tree = make_learnable_tree(tmp_path / "data", wnids, train_per_class=8, val_per_class=1, size=24,
                               ambiguous_share=0.25, seed=0)
    build_shards(tmp_path / "data", tmp_path / "shards", classes=wnids, options=ShardOptions(shard_size=10),
                 workers=1, progress=False)
    kinds = sample_kinds(tmp_path / "shards", tmp_path / "data" / "learnable.json")
    assert len(kinds) == 24 and (kinds != "").sum() == len(tree.ambiguous_in("train")) == 6
    logits = np.zeros((1, 24, 3), np.float32)
    logits[0, kinds == "", 0] = 10.0  # confident on clean samples, uniform on ambiguous ones
    _cache(tmp_path / "t.zarr", logits)
    run = make_run(tmp_path, "kd", "kd", ["resnet18"], [50.0], cache=str(tmp_path / "t.zarr"))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "shards": str(tmp_path / "shards")}))
    text = rep.write_report([run], tmp_path / "out", learnable=tmp_path / "data").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().endswith(" samples")]
    by = {line.split("|")[1].strip(): line for line in rows}
    assert "| clean samples | 18 |" in by["clean samples"] and "| 0.0 % |" in by["clean samples"]
    amb = [k for k in by if k not in ("all samples", "clean samples")]
    assert amb and all("| 0.0000 |" in by[k] and "| 100.0 % |" in by[k] for k in amb)


def test_teacher_run_found_through_the_cache_and_runs_put_in_ladder_order(tmp_path):
    """`kdpipe report runs/*` (alphabetical) still finds the teacher: its final weights are the cache's."""
    import hashlib

    teacher = make_run(tmp_path, "teacher", "hard", ["tiny_resnet"], [70.0])
    weights = b"teacher weights"
    (teacher / "student0-tiny_resnet.pt").write_bytes(weights)
    _cache(tmp_path / "t.zarr", np.zeros((1, 4, 3), np.float32),
           {"weights_sha256": hashlib.sha256(weights).hexdigest()})
    dual = make_run(tmp_path, "dual", "dual", ["a", "b"], [50.0, 40.0], cache=str(tmp_path / "t.zarr"))
    kd = make_run(tmp_path, "kd", "kd", ["a"], [45.0], cache=str(tmp_path / "t.zarr"))
    text = rep.write_report([dual, kd, teacher], tmp_path / "out").read_text()
    assert "Teacher tiny_resnet (stands in for ResNet-50) (run teacher): top-1 70.00" in text
    listed = [line.split("`")[1] for line in text.splitlines() if line.startswith("- `")]
    assert listed == [str(teacher), str(kd), str(dual)]


def test_online_teacher_accuracy_is_reported(tmp_path):
    run = make_run(tmp_path, "dual", "dual", ["a", "b"], [50.0, 40.0])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines[-1]["teacher_val"] = {"top1": [71.5], "top5": [90.25], "ensemble_top1": 71.5, "ensemble_top5": 90.25}
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = rep.write_report([run], tmp_path / "out").read_text()
    assert "Teacher (online, measured by run dual): top-1 71.50, top-5 90.25." in text


def test_seeds_give_mean_sd_and_paired_verdicts(tmp_path):
    """Three seeds per mode: cells are mean ± sd, changes a paired t interval over seeds with a verdict."""
    kd, dual, hard = [55.0, 56.0, 57.0], [58.0, 59.5, 60.0], [56.0, 54.0, 58.0]
    runs = []
    for s in range(3):
        runs += [make_run(tmp_path, f"hard-s{s}", "hard", ["r18"], [hard[s]], seed=s),
                 make_run(tmp_path, f"kd-s{s}", "kd", ["r18"], [kd[s]], seed=s),
                 make_run(tmp_path, f"dual-s{s}", "dual", ["r18", "mnv2"], [dual[s], 40.0 + s], seed=s)]
    text = rep.write_report(runs, tmp_path / "out").read_text()
    # dual - kd per seed: 3, 3.5, 3 -> mean 3.1667, sd 0.2887, t(0.975, 2) = 4.3027: half width 0.7172.
    assert ("| r18 | 56.00 ± 1.00 | 76.00 ± 1.00 | 59.17 ± 1.04 | 79.17 ± 1.04 | +3.17 | [+2.45, +3.88] | better "
            "| 3 |") in text
    # kd - hard per seed: -1, 2, -1 -> mean 0, sd 1.732: within noise.
    assert "| r18 | hard labels -> +KD | +0.00 | [-4.30, +4.30] | within noise | 3 |" in text
    assert "| r18 | 56.00 ± 2.00 | 56.00 ± 1.00 | — | 59.17 ± 1.04 |" in text
    # The ensemble is pooled over the three dual runs; the seed column of Table II names each run's seed.
    assert "| ensemble (3 dual run(s)) | — | — | 60.17 ± 1.04 |" in text
    assert "| dual-s2 | dual | 2 | r18, mnv2 |" in text


def test_seeds_that_do_not_pair_get_no_verdict(tmp_path):
    runs = [make_run(tmp_path, "kd-s0", "kd", ["r18"], [55.0], seed=0),
            make_run(tmp_path, "dual-s1", "dual", ["r18", "b"], [58.0, 40.0], seed=1)]
    text = rep.write_report(runs, tmp_path / "out").read_text()
    assert "| +3.00 | — | no common seed | 0 |" in text


def test_reused_views_and_departures_are_named_next_to_the_numbers(tmp_path):
    runtime = {"world_size": 2, "global_batch": 64, "per_rank_batch": 32, "cache_epochs": 2, "views_per_sample": 2}
    runs = [make_run(tmp_path, "kd", "kd", ["r18"], [55.0], epochs=4, reuse_views=True, runtime=runtime,
                     loss={"tau": 4.0, "direction": "reverse", "uncertainty": False}),
            make_run(tmp_path, "dual", "dual", ["r18", "b"], [58.0, 40.0], epochs=2,
                     loss={"tau": 4.0, "weight_fn": "entropy", "entropy_tau": 4.0})]
    text = rep.write_report(runs, tmp_path / "out").read_text()
    assert ("global batch 64 = 2 rank(s) x 32, **reused views**†: 2 distinct view(s) per sample over 4 epochs "
            "(cache of 2 augmentation epochs)") in text
    assert "| r18 | 55.00 ± 3.52 SE † |" in text and "† from a run that repeated augmented views" in text
    assert "| kd † | kd |" in text and "| dual | dual |" in text
    # Assumptions: each run's value where it differs from its mode's default (kd: w = 1 is kd's default).
    assert "kd: `loss.direction` = reverse (default forward)" in text
    assert "dual: `loss.weight_fn` = entropy (default confidence)" in text
    assert "dual: `loss.entropy_tau` = 4.0 (default 1.0)" in text
    assert "kd: `reuse_views` = true (default false)" in text
    assert "kd: `loss.weight_fn`" not in text
    # --reuse-views given, but the cache had a view for every epoch: nothing was repeated, nothing marked.
    enough = make_run(tmp_path, "kd2", "kd", ["r18"], [55.0], epochs=2, reuse_views=True,
                      runtime={**runtime, "views_per_sample": 2})
    assert "†" not in rep.write_report([enough], tmp_path / "out2").read_text()


def test_table_four_counts_parameters_of_the_models_used(tmp_path):
    """Parameters from the models as built, with the class count from the cache; stand-ins named."""
    from trainer.engine.models import build_model

    _cache(tmp_path / "t.zarr", np.zeros((1, 4, 100), np.float32), {"teacher": "tiny_resnet"})
    run = make_run(tmp_path, "dual", "dual", ["tiny_cnn", "tiny_mobilenet"], [50.0, 40.0],
                   cache=str(tmp_path / "t.zarr"))
    text = rep.write_report([run], tmp_path / "out", views=False).read_text()
    n = {m: sum(p.numel() for p in build_model(m, 100).parameters()) for m in ("tiny_resnet", "tiny_cnn")}
    assert (f"| tiny_resnet | teacher | ResNet-50 | {n['tiny_resnet'] / 1e6:.3f} | 1.00x | ResNet-50 | 25.6 | 1.00x "
            "| 23.71 |") in text
    assert (f"| tiny_cnn | student | ResNet-18 | {n['tiny_cnn'] / 1e6:.3f} | {n['tiny_resnet'] / n['tiny_cnn']:.2f}x "
            "| ResNet-18 | 11.7 | 2.19x | 11.23 |") in text
    assert "| tiny_mobilenet | student | MobileNetV2 |" in text and "| MobileNetV2 | 3.5 | 7.31x | 2.35 |" in text
    assert "| tiny_cnn (stands in for ResNet-18) |" in text  # Table I/III name the stand-in too


def test_pick_extremes_takes_each_sample_once():
    from trainer.report.views import pick_extremes

    w = np.array([[0.9, 0.1, 0.5, 0.2], [0.95, 0.3, 0.6, 0.05]])
    most, least = pick_extremes(w, k=2)
    assert most == [(1, 0), (1, 2)] and least == [(1, 3), (0, 1)]
    assert pick_extremes(w, k=10)[0] == [(1, 0), (1, 2), (1, 1), (0, 3)]


def test_picture_of_confident_views_is_what_training_saw(tmp_path):
    """The report's views come from the cache's seed, spec and epoch: the same pixels as the training loader's."""
    from pipeline.core.augment import AugSpec
    from pipeline.sources.learnable import make_learnable_tree
    from pipeline.reader.loader import ImageNet100Loader
    from pipeline.shards.writer import ShardOptions, build_shards, manifest_sha256
    from pipeline.cache.store import cache_fingerprint
    from trainer.report.views import render_views

    wnids = ["n01749939", "n02488291", "n02869837"]
    make_learnable_tree(tmp_path / "data", wnids, train_per_class=8, val_per_class=1, size=24, seed=0)
    build_shards(tmp_path / "data", tmp_path / "shards", classes=wnids, options=ShardOptions(shard_size=10),
                 workers=1, progress=False)
    spec, seed = AugSpec(image_size=16), 3
    fp = cache_fingerprint(manifest_sha256=manifest_sha256(tmp_path / "shards"), wnids=wnids, spec=spec, seed=seed,
                           teacher="tiny_cnn", weights_sha256="x", precision="fp32", backend="torch")
    logits = np.zeros((2, 24, 3), np.float32)
    logits[1, 5, 2], logits[0, 9, 1] = 14.0, 12.0  # the two confident views; all others uniform (w = 0)
    _cache(tmp_path / "t.zarr", logits, fp)
    run = make_run(tmp_path, "kd", "kd", ["tiny_cnn"], [50.0], cache=str(tmp_path / "t.zarr"),
                   shards=str(tmp_path / "shards"))
    text = rep.write_report([run], tmp_path / "out").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| most confident |")]
    assert rows[0].startswith("| most confident | 5 | 1 |") and rows[1].startswith("| most confident | 9 | 0 |")
    assert len(rows) == 16 and "| least confident | 0 | 0 | 0.000 |" in text
    png = tmp_path / "out" / "teacher_views.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![most and least confident" in text
    # The same (epoch, id) through the training loader's own epoch iteration gives identical pixels.
    pixels, labels = render_views(tmp_path / "shards", seed, spec, "torch", [(1, 5), (0, 9)])
    loader = ImageNet100Loader(tmp_path / "shards", "train", 8, seed=seed, spec=spec, backend="torch", device="cpu",
                               normalize=False, num_workers=0)
    for epoch, i in [(1, 5), (0, 9)]:
        loader.set_epoch(epoch)
        seen = {int(j): img for b in loader for j, img in zip(b.ids, b.images)}
        assert np.array_equal(seen[i].permute(1, 2, 0).numpy(), pixels[(epoch, i)])


def test_a_run_measured_on_no_validation_images_is_refused(tmp_path):
    run = make_run(tmp_path, "hard", "hard", ["resnet18"], [0.0])
    lines = [{**json.loads(x), "val_images": 0} for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    res = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "epoch 1 measured its accuracy on 0 validation images" in res.output.splitlines()[-1]
    assert not (tmp_path / "out" / "report.md").exists()


def test_an_unfinished_run_is_refused_not_pooled_with_finished_ones(tmp_path):
    """A run with fewer epochs than its config.json (stopped by --stop-after-steps, or still training) would enter
    its mode's cell with an early epoch's accuracy, pooled with finished runs: refused in one line naming it."""
    done = make_run(tmp_path, "dual-ref", "dual", ["resnet18"], [91.67], epochs=3)
    half = make_run(tmp_path, "half", "dual", ["resnet18"], [62.5], epochs=3, seed=1)
    metrics = half / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")  # stopped in its second epoch
    res = CliRunner().invoke(main, ["report", str(done), str(half), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 1 and type(res.exception) is SystemExit, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"Error: {half} has 1 of 3 epochs (unfinished or still training): finish it with `kdpipe train --out "
        f"{half} --resume`, or leave it out")
    assert not list((tmp_path / "rep").glob("*"))  # nothing written (at most the writer lock, a dotfile)
    other = make_run(tmp_path, "other", "kd", ["resnet18"], [50.0], epochs=4)
    with open(other / "metrics.jsonl", "w") as f:
        f.write(json.dumps(_line(0, ["resnet18"], [40.0], [60.0])) + "\n")
        f.write(json.dumps(_line(1, ["resnet18"], [45.0], [65.0])) + "\n")
    with pytest.raises(rep.RunFormatError, match=rf"{half} has 1 of 3 epochs; {other} has 2 of 4 epochs \(unfinished"
                                                 r".*finish them with `kdpipe train --out RUN --resume`, or leave "
                                                 r"them out"):
        rep.write_report([done, half, other], tmp_path / "rep")
    # a run whose config names no epoch count (an older format) is reported as it stands
    old = make_run(tmp_path, "old", "kd", ["resnet18"], [55.0], epochs=2)
    (old / "config.json").write_text(json.dumps({k: v for k, v in json.loads((old / "config.json").read_text()).items()
                                                 if k != "epochs"}))
    text = rep.write_report([done, old], tmp_path / "rep").read_text()
    assert f"- `{old}`: mode kd, seed 0, students resnet18, 2 epoch(s)" in text and "| 91.67" in text
