"""`kdpipe demo --tiny`: the whole chain (generate, shard, teacher, cache, ladder, report) runs and resumes;
`--seeds 2` adds a second seed's cache and ladder to the same directory, and the report pools them."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil

import pytest
from click.testing import CliRunner

from pipeline.cache.store import TeacherCache
from trainer.cli import main
from trainer.jobs.demo import LADDER, TINY, DemoConfig, cache_path, ladder_run, run_demo


def _numbers(run) -> list[dict]:
    """A run's metrics without the timing and memory figures (which differ between identical runs)."""
    from trainer.engine.metrics import TIMING_FIELDS as skip
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_tiny_demo_end_to_end_seeds_and_resume(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdpipe")  # the demo's "[demo] ..." lines are kdpipe's info messages
    out, runs = tmp_path / "demo", tmp_path / "demo" / "runs"
    report = run_demo(out, TINY)  # one seed, as `make demo`
    text = report.read_text()
    for section in ("## Assumptions where the paper is silent", "## Table I", "## Table II", "## Table III",
                    "## Convergence", "## Table IV", "## Teacher uncertainty", "## What the teacher is unsure of",
                    "## Demo stages"):
        assert section in text
    assert (out / "shards" / "manifest.json").is_file() and (cache_path(out, 0) / "zarr.json").is_file()
    for mode in LADDER:
        cfg = json.loads((ladder_run(runs, mode, 0) / "config.json").read_text())
        assert cfg["seed"] == TINY.seed and cfg["epochs"] == TINY.epochs and cfg["mode"] == mode
        assert (cfg["teacher_cache"] is not None) == (mode != "hard")
    kd, dual = _final(ladder_run(runs, "kd", 0)), _final(ladder_run(runs, "dual", 0))
    se = 100 * math.sqrt(kd["s0"]["val_top1"] / 100 * (1 - kd["s0"]["val_top1"] / 100) / kd["val_images"])
    assert f"| tiny_cnn (stands in for ResNet-18) | {kd['s0']['val_top1']:.2f} ± {se:.2f} SE |" in text
    assert f"| {dual['s0']['val_top1'] - kd['s0']['val_top1']:+.2f} |" in text
    for png in ("val_accuracy.png", "w_histogram.png", "teacher_views.png"):
        assert (out / "report" / png).is_file()

    # --seeds 2 on the same directory: the shared stages and seed 0 are reused, seed 1 gets its own cache
    # (made for seed 1's views) and ladder; a lost run of seed 0 is redone identically.
    caplog.clear()
    before = {m: _numbers(ladder_run(runs, m, 0)) for m in LADDER}
    shutil.rmtree(ladder_run(runs, "dual", 0))
    text = run_demo(out, dataclasses.replace(TINY, seeds=2)).read_text()
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert said.count("finished earlier, skipped") == 1 + len(LADDER) - 1  # teacher + three seed-0 rungs
    assert "dual-s0: training mode dual" in said and "uw-kd-s1: training mode uw-kd" in said
    assert before == {m: _numbers(ladder_run(runs, m, 0)) for m in LADDER}
    for seed in (0, 1):
        with TeacherCache(cache_path(out, seed), prefetch=False) as c:
            assert c.fingerprint["seed"] == seed
        assert json.loads((ladder_run(runs, "kd", seed) / "config.json").read_text())["seed"] == seed
    # The report pools the seeds: Table I's cell is the mean ± sd of the two kd runs, each change has a verdict.
    acc = [_final(ladder_run(runs, "kd", s))["s0"]["val_top1"] for s in (0, 1)]
    sd = abs(acc[0] - acc[1]) / math.sqrt(2)
    assert f"| tiny_cnn (stands in for ResNet-18) | {sum(acc) / 2:.2f} ± {sd:.2f} |" in text
    changes = [line for line in text.splitlines() if " -> " in line and line.startswith("| tiny_")]
    assert len(changes) == 6 and all(line.endswith(" | 2 |") for line in changes)
    assert all(any(f"| {v} |" in line for v in ("better", "worse", "within noise")) for line in changes)


def test_demo_refuses_a_directory_made_with_other_settings(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(TINY, epochs=3))))
    with pytest.raises(FileExistsError, match=r"other settings \(epochs: 3 -> 1"):
        run_demo(out, TINY)


def test_demo_seeds_option():
    assert DemoConfig().seeds == 1  # `make demo` stays one seed
    result = CliRunner().invoke(main, ["demo", "--tiny", "--seeds", "0", "--out", "/nonexistent/x"])
    assert result.exit_code == 2 and "'--seeds': 0 is not in the range x>=1" in result.output
    with pytest.raises(ValueError, match="--seeds must be at least 1, got 0"):
        run_demo("/nonexistent/x", dataclasses.replace(TINY, seeds=0))


def _tree(root) -> dict:
    """Every file under root (its marker aside) and its text."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".kdpipe-demo"}


@pytest.mark.parametrize("files", [{"timings.json": "MINE", "report/report.md": "MINE"}, {"notes.txt": "hi"},
                                   {"demo.json": '{"mine": 1}'}])
def test_demo_never_writes_into_a_directory_it_did_not_make(tmp_path, files):
    from clitools import cli, error_line

    out = tmp_path / "u"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = _tree(out)
    line = error_line(cli("demo", "--tiny", "--out", out, code=1))
    listed = ", ".join(sorted({name.split("/")[0] for name in files}))
    assert line == (f"Error: --out {out} holds files kdpipe did not write ({listed}); kdpipe writes a demo only into "
                    f"a new or empty directory or its own earlier output, and never replaces files it did not write: "
                    f"choose another --out")
    assert _tree(out) == before and not (out / ".kdpipe-demo").exists()


def test_demo_takes_an_empty_directory_its_own_and_an_older_versions_directory(tmp_path, monkeypatch):
    import trainer.jobs.demo as demo

    monkeypatch.setattr(demo, "_run_stages", lambda out, cfg: out / "report" / "report.md")  # the claim only
    empty = tmp_path / "empty"
    empty.mkdir()
    run_demo(empty, TINY)
    assert json.loads((empty / "demo.json").read_text())["epochs"] == TINY.epochs
    assert (empty / ".kdpipe-demo").is_file()
    (empty / "timings.json").write_text("{}")  # the demo's own files: a rerun continues
    run_demo(empty, dataclasses.replace(TINY, seeds=2))
    with pytest.raises(FileExistsError, match=r"other settings \(epochs: 1 -> 3"):
        run_demo(empty, dataclasses.replace(TINY, epochs=3))
    # made before the marker: demo.json with the demo's settings and only the demo's entries
    old = tmp_path / "old"
    for sub in ("imagenet", "shards", "runs/teacher", "report", "teacher-s0.zarr"):
        (old / sub).mkdir(parents=True)
    (old / "demo.json").write_text(json.dumps({k: v for k, v in dataclasses.asdict(TINY).items() if k != "seeds"}))
    run_demo(old, TINY)
    assert (old / ".kdpipe-demo").is_file()
    (old / ".kdpipe-demo").unlink()
    (old / "notes.txt").write_text("mine")  # not only the demo's entries: not recognised as its output
    with pytest.raises(FileExistsError, match=r"holds files kdpipe did not write \(demo.json, imagenet, notes.txt"):
        run_demo(old, TINY)
    assert not (old / ".kdpipe-demo").exists()
