"""The lsq estimator: our batched torch solver against the truth and against the peers (dipy's
MS-DKI, classic dmipy's ball + stick), plus the FitResult contract. Small CPU simulations."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from vaemap_bids.fitting import fit
from vaemap_bids.fitting import lsq
from vaemap_bids.fitting.reference import fit_ballstick_dmipy, fit_msdki_dipy
from vaemap_bids.physics import Acquisition, make_model
from vaemap_bids.physics.base import ParameterSpec, SignalModel


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rician(signal, snr, rng):
    """|S + N(0, s) + i N(0, s)| with s = 1 / SNR (S normalised to S0 = 1)."""
    sigma = 1.0 / snr
    return np.abs(signal + rng.normal(0, sigma, signal.shape)
                  + 1j * rng.normal(0, sigma, signal.shape)).astype(np.float32)


def msdki_truth(model, n, rng, d_range=(0.3, 2.0), k_hi=1.8):
    """Physical (D, K): K below both k_hi and 90 % of the validity edge 3 / (b_max D)."""
    d = rng.uniform(*d_range, n)
    k = rng.uniform(0.0, 1.0, n) * np.minimum(k_hi, 0.9 * 3.0 / (model.b_max_used * d))
    return np.column_stack([d, k])


def ballstick_truth(n, rng):
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return np.column_stack([rng.uniform(0.3, 0.8, n), rng.uniform(1.5, 2.5, n),
                            rng.uniform(0.5, 1.5, n), v])


def angle_deg(a, b):
    """Angle between fibre directions, antipodally symmetric (n and -n are the same fibre)."""
    cos = np.abs(np.sum(a * b, axis=1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


@pytest.fixture(scope="module")
def msdki(hcp_acq):
    return make_model("msdki", hcp_acq)


@pytest.fixture(scope="module")
def ballstick(hcp_acq):
    return make_model("ballstick", hcp_acq)


# ---- the written-out Jacobians ---------------------------------------------------------------
def test_msdki_residual_and_jacobian(msdki):
    rng = np.random.default_rng(0)
    problem = lsq._MeanSignalProblem(msdki, torch.device("cpu"), max_iter=1, tolerance=1e-6)
    truth = msdki_truth(msdki, 20, rng)
    # also points on the validity edge branch of k_max (large D)
    truth = np.vstack([truth, [[3.0, 0.4], [3.4, 0.1]]])
    raw = torch.as_tensor(msdki.unsquash(truth), dtype=torch.float64)
    ybar = torch.zeros(raw.shape[0], problem.bvals.numel(), dtype=torch.float64)
    r, jac_t = problem.evaluate(raw, ybar)
    params = msdki.squash(raw).numpy()
    expected = msdki.forward_numpy(params, bvals=problem.bvals.numpy()) * problem.sqrt_counts.numpy()
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    for p in range(2):
        step = torch.zeros_like(raw)
        step[:, p] = eps
        fd = (problem.evaluate(raw + step, ybar)[0] - problem.evaluate(raw - step, ybar)[0]) / (2 * eps)
        np.testing.assert_allclose(jac_t[:, p].numpy(), fd.numpy(), rtol=1e-5, atol=1e-7)


def test_ballstick_residual_and_jacobian(ballstick):
    rng = np.random.default_rng(1)
    problem = lsq._BallStickProblem(ballstick, torch.device("cpu"), torch.float64, n_starts=1,
                                    grid_dpar=[1.0], grid_diso=[1.0], max_iter=1, tolerance=1e-6)
    truth = ballstick_truth(10, rng)
    raw = torch.as_tensor(ballstick.unsquash(truth), dtype=torch.float64)
    zeros = torch.zeros(raw.shape[0], ballstick.n_measurements, dtype=torch.float64)
    r, jac_t = problem.evaluate(raw, zeros)
    np.testing.assert_allclose(r.numpy(), ballstick.forward_numpy(truth), rtol=1e-10, atol=1e-12)
    eps = 1e-6
    for p in range(5):
        step = torch.zeros(raw.shape[0], 5, dtype=torch.float64)
        step[:, p] = eps
        plus = problem.evaluate(problem.retract(raw, step), zeros)[0]
        minus = problem.evaluate(problem.retract(raw, -step), zeros)[0]
        np.testing.assert_allclose(jac_t[:, p].numpy(), ((plus - minus) / (2 * eps)).numpy(),
                                   rtol=1e-5, atol=1e-7)


# ---- MS-DKI ------------------------------------------------------------------------------------
def test_msdki_agrees_with_dipy(msdki):
    rng = np.random.default_rng(2)
    truth = msdki_truth(msdki, 1500, rng)
    for snr in (30, 100):
        signals = rician(msdki.forward_numpy(truth), snr, rng)
        ours = lsq.solve_lsq(msdki, signals)
        peer = fit_msdki_dipy(msdki.acquisition, signals)
        for col in range(2):
            assert np.corrcoef(ours[:, col], peer[:, col])[0, 1] > 0.99
            rmse_ours = np.sqrt(np.mean((ours[:, col] - truth[:, col]) ** 2))
            rmse_peer = np.sqrt(np.mean((peer[:, col] - truth[:, col]) ** 2))
            assert rmse_ours <= 1.02 * rmse_peer


def test_msdki_recovers_truth_and_stays_physical(msdki):
    rng = np.random.default_rng(3)
    truth = msdki_truth(msdki, 1000, rng)
    est = lsq.solve_lsq(msdki, rician(msdki.forward_numpy(truth), 500, rng))
    err = np.abs(est - truth)
    assert np.median(err[:, 0]) < 0.005 and np.percentile(err[:, 0], 95) < 0.02
    assert np.median(err[:, 1]) < 0.01 and np.percentile(err[:, 1], 95) < 0.05
    # at SNR 5 an unconstrained fit leaves the physical domain; ours never does
    noisy = rician(msdki.forward_numpy(truth), 5, rng)
    est = lsq.solve_lsq(msdki, noisy)
    lo, hi = msdki.bounds()
    assert np.all(est >= lo) and np.all(est <= hi)
    assert not msdki.invalid_mask(est).any()
    assert np.all(msdki.b_max_used * est[:, 0] * est[:, 1] < 3.0)


def test_msdki_any_shell_layout():
    """Interleaved volumes, jittered b-values within shells, b0 written as 5 s/mm^2, four shells:
    the shell-mean reduction still recovers the truth."""
    rng = np.random.default_rng(9)
    nominal = np.repeat([0.005, 0.5, 1.0, 1.5, 2.0], [6, 20, 20, 20, 20])
    bvals = nominal + np.where(nominal > 0.05, rng.uniform(-0.01, 0.01, nominal.size), 0.0)
    bvecs = rng.normal(size=(nominal.size, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    order = rng.permutation(nominal.size)
    model = make_model("msdki", Acquisition(bvals[order], bvecs[order]))
    truth = msdki_truth(model, 300, rng)
    # noiseless: what the shells' b jitter costs the reduction to shell means
    exact = lsq.solve_lsq(model, model.forward_numpy(truth))
    assert np.percentile(np.abs(exact - truth), 95) < 1e-3
    est = lsq.solve_lsq(model, rician(model.forward_numpy(truth), 500, rng))
    err = np.abs(est - truth)
    assert np.median(err[:, 0]) < 0.003 and np.median(err[:, 1]) < 0.01
    assert not model.invalid_mask(est).any()


# ---- ball-stick ----------------------------------------------------------------------------------
def test_ballstick_recovers_truth(ballstick):
    rng = np.random.default_rng(4)
    truth = ballstick_truth(300, rng)
    est = lsq.solve_lsq(ballstick, rician(ballstick.forward_numpy(truth), 100, rng))
    err = np.abs(est[:, :3] - truth[:, :3])
    assert np.median(err[:, 0]) < 0.01
    assert np.median(err[:, 1]) < 0.05
    assert np.median(err[:, 2]) < 0.02
    ang = angle_deg(est[:, 3:], truth[:, 3:])
    assert np.median(ang) < 1.0 and np.percentile(ang, 95) < 3.0
    np.testing.assert_allclose(np.linalg.norm(est[:, 3:], axis=1), 1.0, atol=1e-5)
    lo, hi = ballstick.bounds()
    assert np.all(est[:, :3] >= lo[:3]) and np.all(est[:, :3] <= hi[:3])


def test_ballstick_agrees_with_dmipy(ballstick):
    pytest.importorskip("dmipy")
    rng = np.random.default_rng(5)
    truth = ballstick_truth(6, rng)
    signals = rician(ballstick.forward_numpy(truth), 50, rng)
    ours = lsq.solve_lsq(ballstick, signals)
    peer = fit_ballstick_dmipy(ballstick.acquisition, signals)
    assert peer.shape == (6, 6)
    np.testing.assert_allclose(np.linalg.norm(peer[:, 3:], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours[:, 0], peer[:, 0], atol=0.03)
    np.testing.assert_allclose(ours[:, 1], peer[:, 1], atol=0.15)
    np.testing.assert_allclose(ours[:, 2], peer[:, 2], atol=0.05)
    assert np.all(angle_deg(ours[:, 3:], peer[:, 3:]) < 3.0)


def test_dmipy_missing_gives_a_clear_error(ballstick, monkeypatch):
    monkeypatch.setitem(sys.modules, "dmipy", None)
    monkeypatch.setitem(sys.modules, "dmipy.core", None)
    monkeypatch.setitem(sys.modules, "dmipy.core.acquisition_scheme", None)
    with pytest.raises(ImportError, match="optional extra"):
        fit_ballstick_dmipy(ballstick.acquisition, np.ones((1, ballstick.n_measurements)))


# ---- any other model: the automatic-Jacobian path ----------------------------------------------
class _MonoExponential(SignalModel):
    name = "adc_test"
    parameters = (ParameterSpec("adc", 0.0, 3.5, "um^2/ms", "Apparent diffusion coefficient"),)

    def forward(self, params):
        b, _ = self.tensors(params.device, params.dtype)
        return torch.exp(-b[None, :] * params[:, 0:1])

    def forward_numpy(self, params, bvals=None, bvecs=None):
        b = self.acquisition.bvals if bvals is None else bvals
        return np.exp(-b[None, :] * np.atleast_2d(params)[:, 0:1])


def test_generic_model_path(hcp_acq):
    rng = np.random.default_rng(6)
    model = _MonoExponential(hcp_acq.subset(hcp_acq.bvals < 1.5))
    truth = rng.uniform(0.3, 3.0, (200, 1))
    signals = rician(model.forward_numpy(truth), 200, rng)
    est = lsq.solve_lsq(model, signals, n_starts=2)
    assert np.percentile(np.abs(est - truth), 95) < 0.02


# ---- the fit() contract ------------------------------------------------------------------------
def test_fit_contract_nan_rows_and_determinism(hcp_acq, ballstick):
    rng = np.random.default_rng(7)
    truth = ballstick_truth(40, rng)
    signals = rician(ballstick.forward_numpy(truth), 50, rng)
    signals[[3, 17], 5] = np.nan
    signals[25, :] = np.inf
    first = fit(ballstick, signals, "lsq", device="cpu", seed=3, progress=False)
    second = fit(ballstick, signals, "lsq", device="cpu", seed=3, progress=False)
    bad = np.zeros(40, dtype=bool)
    bad[[3, 17, 25]] = True
    assert first.method == "lsq" and first.model == "ballstick" and first.seed == 3
    assert first.device == "cpu" and first.history == {}
    np.testing.assert_array_equal(first.valid, ~bad)
    assert first.params.shape == (40, 6)
    assert np.all(np.isnan(first.params[bad])) and np.all(np.isfinite(first.params[~bad]))
    np.testing.assert_array_equal(first.params, second.params)
    assert set(first.timings) == {"fit_seconds", "voxels_per_second"}
    assert first.hyperparameters["solver"] == "torch" and first.hyperparameters["n_starts"] >= 1
    maps = ballstick.split(first.params)
    assert maps["dir"].shape == (40, 3)


def test_fit_msdki_full_table_and_reference_solver(hcp_acq, msdki):
    rng = np.random.default_rng(8)
    truth = msdki_truth(msdki, 50, rng)
    # signals of the full acquisition (b up to 3): fit() keeps the model's volumes
    full = np.ones((50, hcp_acq.n_volumes), dtype=np.float32)
    full[:, msdki.volumes] = rician(msdki.forward_numpy(truth), 50, rng)
    full[10] = np.nan
    ours = fit(msdki, full, "lsq", device="cpu", progress=False)
    peer = fit(msdki, full, "lsq", device="cpu", progress=False, options={"solver": "reference"})
    assert np.isnan(ours.params[10]).all() and np.isnan(peer.params[10]).all()
    direct = fit_msdki_dipy(msdki.acquisition, full[~np.isnan(full).any(1)][:, msdki.volumes])
    np.testing.assert_allclose(peer.params[ours.valid], direct, rtol=1e-6)
    assert np.corrcoef(ours.params[ours.valid, 0], peer.params[ours.valid, 0])[0, 1] > 0.99


@pytest.mark.parametrize("bad", [{"solver": "scipy"}, {"n_starts": 0}, {"max_iter": 2.5},
                                 {"tolerance": 0}, {"dtype": "float16"}, {"grid_dpar": []},
                                 {"not_an_option": 1}])
def test_bad_options_raise(msdki, bad):
    with pytest.raises(ValueError):
        fit(msdki, np.ones((2, msdki.n_measurements), dtype=np.float32), "lsq", device="cpu",
            options=bad, progress=False)


def test_reference_rejects_bad_signals(msdki):
    with pytest.raises(ValueError, match="shape"):
        fit_msdki_dipy(msdki.acquisition, np.ones((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        fit_msdki_dipy(msdki.acquisition, np.full((1, msdki.n_measurements), np.nan))
