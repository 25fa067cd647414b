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
    assert r["decode"]["images_per_s"] > 0 and r["decode"]["images"] == 16
    for b in ("8", "4"):
        assert r["steps"][b]["ceiling_images_per_s"] > 0 and r["loader_fed"][b]["images_per_s"] > 0
    assert r["cache_teacher"]["images"] == 16 and r["cache_teacher"]["ratio"] > 0
    est = r["estimate"]["loader_fed_cached"]
    assert abs(est["hours_50_epochs"] * est["images_per_s"] * 3600 - 50 * 126_689) < 1.0
