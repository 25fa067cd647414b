"""The GPU check's --quick mode runs the same code on the CPU, so the script cannot rot between GPU runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_runs_and_reports(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "QUICK CPU smoke test" in proc.stdout
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    assert r["quick"] is True and r["device"].startswith("CPU")
    assert r["geometry"]["ok"] and r["geometry"]["same_ids"]
    assert r["decode"]["cpu"]["images_per_s"] > 0 and r["decode"]["cpu"]["images"] == 16  # the large set, 1 epoch
    assert r["equal"] == {"skipped": "CUDA graphs need a CUDA device"} and r["loss_falls"]["graphed"] is False
    for b in ("8", "4"):
        assert r["steps"][b]["cached_eager_images_per_s"] > 0 and r["steps"][b]["online_eager_host_ms"] > 0
    cache = r["cache_teacher"]["cpu"]
    assert cache["images"] == 4 * 4 * 2 and cache["cache_teacher_images_per_s"] > 0  # 4 classes x 4 x 2 epochs
    assert "steady_images_per_s" in cache and "fixed_seconds" in cache
    loops = {(x["batch"], x["decode_device"]): x for x in r["train_loop"]}
    assert set(loops) == {(8, "cpu"), (4, "cpu")} and all(x["images_per_s"] > 0 for x in loops.values())
    est = r["estimate"]["4"]
    assert abs(est["minutes_50_epochs"] * est["images_per_s"] * 60 - 50 * 126_689) < 1.0
    assert "total" in proc.stdout and "ERROR" not in proc.stdout


def test_compile_rows_build_the_trainers_compiled_students(monkeypatch):
    """gpu_check --compile MODES goes through `--compile MODE` of the trainer (torch.compile recorded, not run)."""
    import torch

    from tools import gpu_measure as gm

    modes = []
    monkeypatch.setattr(torch, "compile", lambda m, mode=None: modes.append(mode) or m)
    r = gm.bench_compile(4, torch.device("cpu"), gm.QUICK, ["max-autotune-no-cudagraphs", "default"])
    assert modes == ["max-autotune-no-cudagraphs"] * 4 + [None] * 4  # 2 students x 2 batch sizes, per mode
    assert set(r) == {"max-autotune-no-cudagraphs/8", "max-autotune-no-cudagraphs/4", "default/8", "default/4"}
    assert all(x["images_per_s"] > 0 and "graphs_images_per_s" not in x for x in r.values())  # graphs: CUDA only
