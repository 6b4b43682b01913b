"""lsq as maximum likelihood under the magnitude noise models, its Cramer-Rao std, the sigma
contract of fit(), and the noise options (small CPU simulations on the HCP table)."""
from __future__ import annotations

import numpy as np
import pytest

from vaemap_bids.fitting import fit
from vaemap_bids.fitting.base import ESTIMATORS
from vaemap_bids.fitting.options import check_options
from vaemap_bids.fitting.sigma import estimate_normalised_sigma
from vaemap_bids.physics import Acquisition, make_model
from vaemap_bids.simulate.noise import add_rician_noise


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def msdki(hcp_acq):
    return make_model("msdki", hcp_acq)


def normalised(model, truth, snr, seed):
    """Rician magnitudes divided by their own noisy mean b0, as real data and vaemap-sim are."""
    noisy = add_rician_noise(model.forward_numpy(truth), snr, np.random.default_rng(seed))
    return noisy / noisy[:, model.acquisition.b0_mask].mean(1, keepdims=True)


def test_csf_like_voxel_rician_bias_below_the_floor_biased_gaussian(msdki):
    """One CSF-like truth (D = 3, K = 0) in many noise draws. The Gaussian fit reads the noise
    floor as signal: kurtosis ~0.47 at SNR 20, D +0.4 at SNR 100. The Rician fit removes most
    of the K bias at SNR 20 and both biases at SNR 100. (At SNR 20 its D is not better: the
    b = 1 and 2 signals are 1 and 0.05 sigma, and the likelihood is flat up to the D bound.)"""
    truth = np.tile([3.0, 0.0], (150, 1))
    bias = {}
    for snr in (20, 100):
        y = normalised(msdki, truth, snr, seed=snr)
        for noise in ("gaussian", "rician"):
            res = fit(msdki, y, "lsq", device="cpu", sigma=1.0 / snr, progress=False,
                      options={"noise_model": noise})
            bias[snr, noise] = np.abs(res.params.mean(0) - truth[0])
    assert bias[20, "gaussian"][1] > 0.4
    assert bias[20, "rician"][1] < 0.35 * bias[20, "gaussian"][1]
    assert bias[100, "gaussian"][0] > 0.3
    assert np.all(bias[100, "rician"] < 0.4 * bias[100, "gaussian"])


@pytest.mark.parametrize("noise,d_range", [("rician", (0.8, 1.8)), ("gaussian", (0.5, 1.0))])
def test_lsq_std_coverage_on_a_small_simulation(msdki, noise, d_range):
    """WM/GM-like (physical) truths at SNR 30, sigma known: mean +- 1.96 std holds the truth in
    95 % of voxels; with 800 voxels the binomial sd is 0.8 %, so [0.92, 0.975] is a 3-4 sd band.
    The Gaussian fit is tested where the signal stays above the noise floor: below it, its
    floor bias (not its std) puts the truth outside (K coverage 0.81 for D up to 1.8)."""
    rng = np.random.default_rng(11)
    d = rng.uniform(*d_range, 800)
    # physical: K below 80 % of the validity edge 3 / (b_max D)
    k = rng.uniform(0.3, 0.8, 800) * np.minimum(1.5, 3.0 / (msdki.b_max_used * d))
    truth = np.column_stack([d, k])
    y = normalised(msdki, truth, 30, seed=12)
    res = fit(msdki, y, "lsq", device="cpu", sigma=1 / 30, progress=False,
              options={"noise_model": noise})
    assert res.std is not None and res.std.shape == truth.shape and np.all(res.std > 0)
    cover = (np.abs(res.params - truth) <= 1.96 * res.std).mean(0)
    assert np.all((cover >= 0.92) & (cover <= 0.975)), cover
    # the std is the spread of the estimates, not just a coverage: z-scores have sd ~ 1
    z = (res.params - truth) / res.std
    assert np.all(np.abs(z.std(0) - 1.0) < 0.1), z.std(0)
    assert res.hyperparameters["noise"]["model"] == noise
    assert res.hyperparameters["noise"]["sigma_source"] == "given"


def test_rician_fit_is_deterministic_and_follows_the_rows(msdki):
    rng = np.random.default_rng(4)
    truth = np.column_stack([rng.uniform(0.5, 2.5, 60), rng.uniform(0.0, 1.0, 60)])
    y = normalised(msdki, truth, 20, seed=5)
    y[7] = np.nan
    sigma = np.full(60, 0.05)
    sigma[7] = np.nan              # rows that are not fitted may carry anything
    sigma[9] = 0.08                # per-voxel sigma / S0
    a = fit(msdki, y, "lsq", device="cpu", seed=1, sigma=sigma, progress=False)
    b = fit(msdki, y, "lsq", device="cpu", seed=1, sigma=sigma, progress=False)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.std, b.std)
    assert np.isnan(a.params[7]).all() and np.isnan(a.std[7]).all()
    assert np.all(np.isfinite(a.std[a.valid]))
    assert a.hyperparameters["noise"]["sigma"] == "per voxel"
    assert a.hyperparameters["noise"]["sigma_max"] == pytest.approx(0.08)
    with pytest.raises(ValueError, match="one value per row"):
        fit(msdki, y, "lsq", device="cpu", sigma=np.full(59, 0.05), progress=False)
    with pytest.raises(ValueError, match="positive"):
        fit(msdki, y, "lsq", device="cpu", sigma=-1.0, progress=False)
    with pytest.raises(ValueError, match="positive"):
        fit(msdki, y, "lsq", device="cpu", sigma=np.where(np.arange(60) == 3, 0, 0.05),
            progress=False)


def test_sigma_is_estimated_when_not_given(msdki):
    """No sigma: from the 18 normalised b0 repeats (HCP), else from the Gaussian residuals."""
    rng = np.random.default_rng(6)
    truth = np.column_stack([rng.uniform(0.6, 1.6, 1500), rng.uniform(0.3, 1.2, 1500)])
    y = normalised(msdki, truth, 25, seed=7)
    res = fit(msdki, y, "lsq", device="cpu", progress=False)
    noise = res.hyperparameters["noise"]
    assert noise["sigma_source"] == "b0-repeats" and noise["n_b0"] == 18
    assert noise["sigma"] == pytest.approx(1 / 25, rel=0.04)
    # one b0 only: the residuals of the least-squares fit (tissue well above the floor)
    acq = msdki.acquisition
    keep = ~acq.b0_mask
    keep[np.flatnonzero(acq.b0_mask)[0]] = True
    one = make_model("msdki", acq.subset(keep))
    sigma, info = estimate_normalised_sigma(one, y[:, keep], "rician")
    assert info["sigma_source"] == "gaussian-residuals" and info["n_b0"] == 1
    assert sigma == pytest.approx(1 / 25, rel=0.1)


def test_reference_solver_is_gaussian_and_has_a_std(msdki):
    rng = np.random.default_rng(8)
    truth = np.column_stack([rng.uniform(0.6, 1.6, 40), rng.uniform(0.3, 1.2, 40)])
    y = normalised(msdki, truth, 50, seed=9)
    res = fit(msdki, y, "lsq", device="cpu", sigma=0.02, progress=False,
              options={"solver": "reference"})
    assert res.hyperparameters["noise"]["model"] == "gaussian"
    assert res.hyperparameters["noise"]["asked"] == "rician"
    assert res.std.shape == (40, 2) and np.all(np.isfinite(res.std))
    ours = fit(msdki, y, "lsq", device="cpu", sigma=0.02, progress=False,
               options={"noise_model": "gaussian"})
    np.testing.assert_allclose(res.std, ours.std, rtol=0.15)


def test_ncchi_fit_runs_and_beats_rician_on_ncchi_data(msdki):
    """Root-sum-of-squares of 4 channels: the model that matches the data is the better fit."""
    rng = np.random.default_rng(10)
    truth = np.column_stack([rng.uniform(1.5, 2.5, 150), rng.uniform(0.2, 0.8, 150)])
    clean = msdki.forward_numpy(truth)
    s = 0.05
    # channel c carries clean / 2 (sum of squares of the noise-free parts = clean^2)
    chans = [clean / 2 + s * rng.standard_normal(clean.shape) for _ in range(4)]
    chans += [s * rng.standard_normal(clean.shape) for _ in range(4)]
    mag = np.sqrt(sum(c ** 2 for c in chans))
    y = mag / mag[:, msdki.acquisition.b0_mask].mean(1, keepdims=True)
    err = {}
    for noise, coils in (("ncchi", 4), ("rician", 1)):
        res = fit(msdki, y, "lsq", device="cpu", sigma=s, progress=False,
                  options={"noise_model": noise, "n_coils": coils})
        err[noise] = np.abs(res.params.mean(0) - truth.mean(0))
    assert err["ncchi"][1] < err["rician"][1]


@pytest.mark.parametrize("method", ["lsq", "ssl", "vaeunig", "vaegmm"])
def test_every_method_has_checked_noise_options(method):
    opts = check_options(method, "msdki", {})
    assert opts["noise_model"] == "rician" and opts["n_coils"] == 1
    assert check_options(method, "msdki", {"noise_model": "ncchi", "n_coils": 8})["n_coils"] == 8
    for bad, word in (({"noise_model": "poisson"}, "noise.model"),
                      ({"noise_model": "rician", "n_coils": 4}, "ncchi"),
                      ({"noise_model": "ncchi", "n_coils": 0}, "n_coils")):
        with pytest.raises(ValueError, match=word):
            check_options(method, "msdki", bad)
    assert ("std" in ESTIMATORS["lsq"].outputs)
