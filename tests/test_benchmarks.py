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


def test_training_roofline_benchmark_counts_the_trainers_work(tmp_path):
    out = tmp_path / "roofline.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_training.py"), "roofline", "--n", "600",
         "--epochs", "1", "--batch-sizes", "256", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert result["matmul_peak_flops"] > 1e8
    (run,) = result["runs"]
    # vaegmm on 198 MS-DKI volumes: three hidden layers of width 198 and the heads, forward and
    # backward, are some 10^5-10^6 FLOP per voxel and epoch
    assert 1e5 < run["flop_per_voxel_epoch"] < 1e7
    assert 0 < run["fraction_of_peak"] < 1.5
def test_spatial_benchmark_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "spatial.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_spatial.py"), "--models", "msdki", "--snr", "20",
         "--shape", "10", "11", "9", "--epochs", "3", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert set(case["methods"]) == {"lsq", "mppca+lsq", "patch2self+lsq", "vaegmm", "svae"}
    for method, res in case["methods"].items():
        wm = res["metrics"]["msd"]["WM"]
        assert res["seconds"] > 0 and wm["all"]["rmse"] > 0 and wm["all"]["n"] > 0, method
        assert "coverage" in wm["all"], method   # every method has a std (lsq: Cramer-Rao)
    assert set(case["targets"]["msd WM"]) == {"svae/lsq", "svae/best_denoise", "edge svae/lsq",
                                              "svae coverage"}
    assert "time svae/vaegmm" in case["targets"]
    assert "| svae |" in out.with_suffix(".md").read_text()
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
