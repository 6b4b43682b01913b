"""The cluster simulation, Rician noise, the metrics and the vaemap-sim command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vaemap_bids.physics import make_model
from vaemap_bids.cli import sim as sim_cli
from vaemap_bids.simulate import benchmark
from vaemap_bids.simulate.clusters import PAPER_CLUSTERS, simulate_clusters
from vaemap_bids.simulate.metrics import bias, mean_sd, parameter_metrics, pearson_r, rmse, summarise
from vaemap_bids.simulate.noise import add_rician_noise, rician_sigma


@pytest.fixture(scope="module")
def sim(hcp_acq):
    return simulate_clusters(hcp_acq, n_voxels=20_000, snr=20, seed=3)


# ---- truth -----------------------------------------------------------------------------------
def test_truth_is_physical_and_uses_the_shells_up_to_b2(sim):
    d, k = sim.params[:, 0], sim.params[:, 1]
    assert sim.acquisition.bvals.max() == pytest.approx(2.0, abs=0.05)  # b = 3 shell dropped
    assert sim.b_max == sim.acquisition.bvals.max()
    assert np.all(d > 0) and np.all(k >= 0)
    assert np.all(sim.b_max * d * k < 3.0)
    assert not sim.model.invalid_mask(sim.params).any()
    lo, hi = sim.model.bounds()
    assert np.all(sim.params >= lo) and np.all(sim.params <= hi)
    # the clean signal therefore decreases with b in every voxel
    order = np.argsort(sim.acquisition.bvals, kind="stable")
    assert np.all(np.diff(sim.clean[:, order], axis=1) <= 1e-12)


def test_stored_truth_reproduces_the_clean_signal_exactly(sim, hcp_acq):
    fresh = make_model("msdki", hcp_acq)
    np.testing.assert_array_equal(fresh.forward_numpy(sim.params), sim.clean)
    torch_signal = fresh.forward(torch.as_tensor(sim.params[:500], dtype=torch.float64)).numpy()
    np.testing.assert_allclose(torch_signal, sim.clean[:500], rtol=1e-12, atol=0)
    assert sim.clean.shape == sim.noisy.shape == (sim.n_voxels, fresh.n_measurements)


def test_cluster_proportions_follow_the_weights(sim):
    weights = np.asarray(PAPER_CLUSTERS["weights"])
    counts = np.bincount(sim.labels, minlength=3)
    sd = np.sqrt(sim.n_voxels * weights * (1 - weights))
    assert np.all(np.abs(counts - sim.n_voxels * weights) < 4 * sd)
    for c, st in enumerate(sim.rejection):
        assert st["n_voxels"] == counts[c]
        assert st["n_draws"] - st["n_rejected"] == counts[c]
        kept = sim.params[sim.labels == c]
        np.testing.assert_allclose(st["effective_mean"], kept.mean(axis=0))
    # CSF-like: mean K = 0, so K >= 0 rejects about half of its draws
    assert sim.rejection[2]["acceptance_rate"] == pytest.approx(0.5, abs=0.05)
    # WM-like sits on the validity edge (2 * 1 * 1.5 = 3): truncation moves its effective mean
    assert sim.rejection[0]["effective_mean"][0] < 0.9


def test_noisy_signal_is_normalised_by_its_own_noisy_b0(sim, hcp_acq):
    b0 = sim.acquisition.b0_mask
    np.testing.assert_allclose(sim.noisy[:, b0].mean(axis=1), 1.0, rtol=1e-12)
    assert not np.allclose(sim.noisy[:, b0], 1.0)  # the b0 volumes are noisy too
    raw = simulate_clusters(hcp_acq, 500, snr=20, seed=3, renormalise=False)
    assert not np.allclose(raw.noisy[:, b0].mean(axis=1), 1.0)
    clean = simulate_clusters(hcp_acq, 500, snr=np.inf, seed=3, renormalise=False)
    np.testing.assert_array_equal(clean.noisy, clean.clean)


def test_determinism_and_common_truth_across_snr(hcp_acq):
    a = simulate_clusters(hcp_acq, 2000, snr=20, seed=7)
    b = simulate_clusters(hcp_acq, 2000, snr=20, seed=7)
    c = simulate_clusters(hcp_acq, 2000, snr=50, seed=7)
    d = simulate_clusters(hcp_acq, 2000, snr=20, seed=8)
    np.testing.assert_array_equal(a.noisy, b.noisy)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.params, c.params)  # same truth at every SNR
    assert not np.array_equal(a.noisy, c.noisy)
    assert not np.array_equal(a.params, d.params)


def test_simulation_rejects_bad_input(hcp_acq):
    with pytest.raises(ValueError, match="n_voxels"):
        simulate_clusters(hcp_acq, 0)
    with pytest.raises(ValueError, match="SNR"):
        simulate_clusters(hcp_acq, 10, snr=0)
    with pytest.raises(ValueError, match="weights"):
        simulate_clusters(hcp_acq, 10, weights=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="almost never physical"):
        simulate_clusters(hcp_acq, 10, means=((3.0, 3.0),), variances=(0.001,), weights=(1.0,),
                          names=("impossible",))
    with pytest.raises(ValueError, match="two-parameter"):
        simulate_clusters(hcp_acq, 10, model="ballstick")


# ---- noise -----------------------------------------------------------------------------------
def test_rician_noise_at_zero_signal_is_rayleigh():
    snr = 10.0
    sigma = rician_sigma(snr)
    mag = add_rician_noise(np.zeros(400_000), snr, np.random.default_rng(0))
    assert mag.min() >= 0
    assert mag.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.01)
    assert np.mean(mag ** 2) == pytest.approx(2 * sigma ** 2, rel=0.01)


def test_rician_noise_at_high_snr_is_gaussian():
    snr = 100.0
    sigma = 1 / snr
    mag = add_rician_noise(np.ones(400_000), snr, np.random.default_rng(1))
    assert mag.mean() == pytest.approx(1 + sigma ** 2 / 2, abs=5 * sigma / np.sqrt(mag.size))
    assert mag.std() == pytest.approx(sigma, rel=0.01)


def test_rician_noise_shapes_seeds_and_errors():
    sig = np.linspace(0, 1, 60).reshape(3, 4, 5).astype(np.float32)
    a = add_rician_noise(sig, 20, 5)
    b = add_rician_noise(sig, 20, np.random.default_rng(5))
    assert a.shape == sig.shape and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(add_rician_noise(sig, np.inf, 0), sig.astype(np.float64))
    for bad in (0, -5, np.nan):
        with pytest.raises(ValueError, match="SNR"):
            add_rician_noise(sig, bad, 0)
    with pytest.raises(ValueError, match="NaN"):
        add_rician_noise(np.array([1.0, np.nan]), 20, 0)


# ---- metrics ---------------------------------------------------------------------------------
def test_metrics_on_known_values():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    est = np.array([1.0, 2.0, 3.0, 6.0])
    assert rmse(est, truth) == pytest.approx(1.0)
    assert bias(est, truth) == pytest.approx(0.5)
    assert pearson_r(2 * truth + 1, truth) == pytest.approx(1.0)
    assert pearson_r(-truth, truth) == pytest.approx(-1.0)
    assert np.isnan(pearson_r(np.ones(4), truth))  # constant estimate: r undefined
    s = summarise(np.array([1.0, np.nan, 3.0, 6.0]), truth)  # NaN left out and counted
    assert s["n"] == 3 and s["n_missing"] == 1
    assert s["rmse"] == pytest.approx(np.sqrt(4 / 3))
    with pytest.raises(ValueError, match="values"):
        rmse(est[:3], truth)
    ms = mean_sd([1.0, 2.0, 3.0, float("nan")])
    assert ms == {"mean": 2.0, "sd": 1.0, "n": 3}


def test_parameter_metrics_per_cluster_and_pooled():
    truth = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, 1.0]])
    est = truth + np.array([[0.1, 0.0], [0.1, 0.0], [-0.2, 0.5], [-0.2, 0.5]])
    labels = np.array([0, 0, 1, 1])
    m = parameter_metrics(est, truth, labels, ["msd", "msk"], ["a", "b", "empty"])
    assert m["msd"]["a"]["bias"] == pytest.approx(0.1)
    assert m["msd"]["b"]["rmse"] == pytest.approx(0.2)
    assert m["msd"]["pooled"]["bias"] == pytest.approx(-0.05)
    assert m["msk"]["b"]["bias"] == pytest.approx(0.5)
    assert m["msd"]["empty"]["n"] == 0 and np.isnan(m["msd"]["empty"]["rmse"])
    with pytest.raises(ValueError, match="labels"):
        parameter_metrics(est, truth, labels[:3], ["msd", "msk"], ["a", "b"])


# ---- command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--snr", "-1"], ["--methods", "nope"], ["--n-voxels", "2"],
                                  ["--epochs", "0"], ["--sweep", "--snr", "10", "20"],
                                  ["--sweep", "--betas", "lots"]])
def test_cli_bad_arguments_exit_64(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sim_cli.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == sim_cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("vaemap-sim: error:") and "\n" not in err


def test_cli_bad_config_and_device(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("vaegmm:\n  no_such_option: 1\n")
    assert sim_cli.main(["--quick", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 64
    assert "no_such_option" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert sim_cli.main(["--quick", "--device", "cuda", "--out", str(tmp_path / "o")]) == 75


def test_vaemap_sim_quick_end_to_end(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "sim"
    rc = sim_cli.main(["--quick", "--n-voxels", "200", "--methods", "lsq", "vaegmm",
                         "--epochs", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / benchmark.RESULTS_JSON).read_text())
    assert res["complete"] is True
    assert res["configuration"]["snrs"] == [20.0] and res["configuration"]["seeds"] == [0]
    assert "2000" in res["note"]
    assert {r["method"] for r in res["runs"]} == {"lsq", "vaegmm"}
    for run in res["runs"]:
        assert run["voxels_per_s"] > 0
        for lab in ("msd", "msk"):
            for cl in ("WM-like", "GM-like", "CSF-like", "pooled"):
                assert set(run["metrics"][lab][cl]) >= {"rmse", "bias", "r", "n"}
        assert run["metrics"]["msd"]["pooled"]["n"] == 200
    lsq = res["summary"]["lsq"]["20"]["metrics"]["msd"]["pooled"]
    assert lsq["rmse"]["mean"] < 0.3  # lsq on 180 DW volumes at SNR 20 recovers D well
    assert "20" in res["comparisons"]
    assert len(res["simulation"]["0"]["rejection"]) == 3
    md = (out / benchmark.RESULTS_MD).read_text()
    assert "## SNR 20" in md and "| vaegmm |" in md
    png = (out / benchmark.scatter_name(20.0)).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_vaemap_sim_sweep_tiny(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "sweep"
    argv = ["--sweep", "--sweep-methods", "vaeunig", "--latent-dims", "1", "2", "--betas", "0.01",
            "--n-voxels", "150", "--epochs", "2", "--out", str(out)]
    try:
        benchmark.sweep_keys("vaeunig")
    except benchmark.UsageError:
        assert sim_cli.main(argv) == 64  # no latent/KL options to sweep: one clear line
        assert "--sweep needs" in capsys.readouterr().err
        return
    assert sim_cli.main(argv) == 0
    res = json.loads((out / benchmark.SWEEP_JSON).read_text())
    grid = {(r["method"], r["latent_dim"], r["beta"]) for r in res["summary"]}
    assert grid == {("ssl", None, None), ("vaeunig", 1, 0.01), ("vaeunig", 2, 0.01)}
    assert (out / benchmark.SWEEP_PNG).read_bytes()[:4] == b"\x89PNG"
    assert "latent dim" in (out / benchmark.SWEEP_MD).read_text()


def test_oracle_row_ratios_and_coverage(tmp_path):
    """lsq and the oracle on a small run: the oracle is a row with a std, every RMSE is shown as
    a multiple of the oracle's, and coverage is reported for every method with a std."""
    torch.set_num_threads(1)
    out = tmp_path / "sim"
    rc = sim_cli.main(["--n-voxels", "90", "--snr", "30", "--seeds", "0", "--methods", "lsq",
                         "oracle", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / benchmark.RESULTS_JSON).read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert set(runs) == {"lsq", "oracle"}
    assert runs["lsq"]["noise"]["sigma_source"] == "given"
    assert runs["lsq"]["noise"]["sigma"] == "per voxel"   # sigma / noisy mean b0
    for run in runs.values():
        cov = run["coverage"]["msd"]
        assert set(cov) == {"WM-like", "GM-like", "CSF-like", "pooled"}
        assert 0.0 <= cov["pooled"] <= 1.0
    # the posterior mean has the least pooled squared error of any estimator
    for lab in ("msd", "msk"):
        assert (runs["oracle"]["metrics"][lab]["pooled"]["rmse"]
                <= runs["lsq"]["metrics"][lab]["pooled"]["rmse"])
    md = (out / benchmark.RESULTS_MD).read_text()
    assert "| oracle | " in md and "(1.00×)" in md and "95 % coverage" in md
    assert "noisy measured mean b0" in md
