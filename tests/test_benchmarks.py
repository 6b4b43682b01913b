"""The benchmark scripts run end to end at a tiny size (their figures are measured elsewhere)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_hcp_scale_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "hcp.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_hcp_scale.py"), "--n-voxels", "2000",
         "--models", "msdki", "--methods", "lsq", "ssl", "--epochs", "1", "--nprocs", "2",
         "--root", str(tmp_path / "run"), "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["subject"]["shape"][-1] == 288          # the full HCP table
    assert 1000 < report["subject"]["brain_voxels"] < 6000
    assert set(report["fits"]) == {"sub-hcp_model-msdki_desc-lsq_fit.json",
                                   "sub-hcp_model-msdki_desc-ssl_fit.json"}
    nodes = {row["node"].rsplit("/", 1)[-1] for row in report["nodes"]}
    assert {"prepare_series", "fit_msdki_lsq", "fit_msdki_ssl"} <= nodes
    assert all(row["wall_s"] >= 0 and row["peak_rss_gb"] > 0 for row in report["nodes"])
    assert not (tmp_path / "run").exists()                # generated on the fly, then removed


@pytest.mark.slow
def test_qsm_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "qsm.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_qsm.py"), "--shape", "24", "28", "22",
         "--voxel-mm", "6", "--methods", "tkd", "tv", "--oblique-deg", "15", "--threads", "1",
         "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    for case in ("axial", "oblique"):
        rows = report[case]["estimated_field"]
        assert set(rows) == {"tkd", "tv"}
        for row in rows.values():
            assert {"rmse", "nrmse", "hfen", "ssim", "slope", "seconds",
                    "nucleus_error_ppm"} <= set(row)
            assert 0 < row["nrmse"] < 5
    assert set(report["axial"]["true_field"]) == {"tkd", "tv"}
