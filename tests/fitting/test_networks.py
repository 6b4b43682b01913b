"""Network estimators (ssl, vaeunig, vaegmm) and their trainer: recovery, schedules, the mixture
prior, determinism, masking and option checks. CPU, small data, few epochs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vaemap_bids.fitting import fit
from vaemap_bids.fitting.networks import (VAEGMM, VAEUniG, build_network, categorical_kl_uniform,
                                          gaussian_kl)
from vaemap_bids.fitting.options import method_options
from vaemap_bids.fitting.train import (beta_at, fit_network, resolve_batch_size, tau_at,
                                       train_network)
from vaemap_bids.physics import make_model

FAST = {"epochs": 15, "batch_size": 32, "lr": 3e-3, "patience": 4}
# The VAEs converge more slowly than ssl (sampled z, a decoder behind the encoder): more epochs.
VAE_FAST = dict(FAST, epochs=40, patience=8, warmup_epochs=2, ramp_epochs=4, n_posterior_samples=8)
GMM_FAST = dict(VAE_FAST, tau_start=1.0, tau_end=0.3)
OPTIONS = {"ssl": FAST, "vaeunig": VAE_FAST, "vaegmm": GMM_FAST}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # module scope: set before the module-scoped fits below (2 shared cores, avoid oversubscription)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rician(signal: np.ndarray, snr: float, rng: np.random.Generator) -> np.ndarray:
    """|S + N(0, s) + i N(0, s)| with s = 1 / SNR on the normalised signal."""
    s = 1.0 / snr
    return np.abs(signal + s * rng.standard_normal(signal.shape)
                  + 1j * s * rng.standard_normal(signal.shape))


@pytest.fixture(scope="module")
def msdki_data(hcp_acq):
    """1500 physical MS-DKI voxels (D, K spread over the brain's range), Rician SNR 50."""
    rng = np.random.default_rng(7)
    model = make_model("msdki", hcp_acq)
    n = 1500
    d = rng.uniform(0.5, 2.5, n)
    k = rng.uniform(0.0, 0.9, n) * np.minimum(2.0, 3.0 / (model.b_max_used * d))
    truth = np.stack([d, k], axis=1)
    assert not model.invalid_mask(truth).any()
    y = rician(model.forward_numpy(truth), 50.0, rng).astype(np.float32)
    return model, truth, y


@pytest.fixture(scope="module")
def fits(msdki_data):
    model, _, y = msdki_data
    return {m: fit(model, y, m, device="cpu", seed=3, options=OPTIONS[m], progress=False)
            for m in OPTIONS}


# ---- recovery --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ssl", "vaeunig", "vaegmm"])
def test_recovers_truth_at_high_snr(msdki_data, fits, method):
    model, truth, _ = msdki_data
    res = fits[method]
    maps = res.maps(model)
    r_d = np.corrcoef(maps["msd"], truth[:, 0])[0, 1]
    r_k = np.corrcoef(maps["msk"], truth[:, 1])[0, 1]
    # LSQ on these data reaches r(D) ~ 0.999 and r(K) ~ 0.97: a short training must come close.
    assert r_d > 0.97, f"{method}: r(D) = {r_d:.3f}"
    assert r_k > 0.80, f"{method}: r(K) = {r_k:.3f}"
    assert np.median(np.abs(maps["msd"] - truth[:, 0])) < 0.08
    assert not model.invalid_mask(res.params).any()  # squashing keeps every voxel physical


def test_result_contents(msdki_data, fits):
    model, _, y = msdki_data
    n = len(y)
    assert fits["ssl"].std is None and fits["ssl"].latent_mean is None
    assert fits["ssl"].responsibilities is None
    for method in ("vaeunig", "vaegmm"):
        res = fits[method]
        assert res.std.shape == (n, model.n_params)
        assert np.all(np.isfinite(res.std)) and np.all(res.std >= 0) and res.std.mean() > 0
        assert res.latent_mean.shape == (n, res.hyperparameters["latent_dim"])
        assert {"loss", "recon", "kl", "beta", "val_loss", "lr"} <= set(res.history)
        assert np.all(np.diff(res.history["lr"]) <= 0)  # only ever decays
        assert res.hyperparameters["hidden_width"] == model.n_measurements
    resp = fits["vaegmm"].responsibilities
    assert resp.shape == (n, GMM_FAST.get("n_components", 3))
    np.testing.assert_allclose(resp.sum(axis=1), 1.0, atol=1e-5)
    assert np.all(resp >= 0)
    assert len(fits["vaegmm"].history["tau"]) == fits["vaegmm"].hyperparameters["epochs_run"]


# ---- schedules -------------------------------------------------------------------------------
def test_kl_schedule_warmup_then_linear_ramp():
    opts = {"beta": 0.01, "warmup_epochs": 3, "ramp_epochs": 4}
    betas = [beta_at(e, opts) for e in range(12)]
    assert betas[:3] == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(betas[3:7], [0.0025, 0.005, 0.0075, 0.01])
    assert betas[7:] == [0.01] * 5
    assert max(betas) <= 0.01
    assert beta_at(5, {"beta": 0.2, "warmup_epochs": 2, "ramp_epochs": 0}) == 0.2


def test_history_follows_schedule(msdki_data, fits):
    hist = fits["vaeunig"].history
    warm, ramp = VAE_FAST["warmup_epochs"], VAE_FAST["ramp_epochs"]
    assert hist["beta"][:warm] == [0.0] * warm
    assert np.all(np.array(hist["beta"][warm:]) > 0)
    # during the ramp, beta / (the noise-level weight 2 sigma^2 / T) grows linearly to 1
    t = msdki_data[0].n_measurements
    weight = [b / (2 * r / t) for b, r in zip(hist["beta"][warm:warm + ramp + 2],
                                              hist["recon"][warm - 1:])]
    np.testing.assert_allclose(weight, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rtol=1e-6)


def test_auto_beta_follows_the_noise_level(msdki_data):
    """beta: auto = ramp(epoch) * 2 sigma^2 / T, sigma^2 the previous epoch's reconstruction MSE."""
    model, _, y = msdki_data
    opts = dict(VAE_FAST, epochs=6, warmup_epochs=2, ramp_epochs=2, beta="auto", patience=10)
    res = fit(model, y[:500], "vaeunig", device="cpu", seed=0, options=opts, progress=False)
    hist, hyper = res.history, res.hyperparameters
    t = model.n_measurements
    ramp = [0, 0, 0.5, 1, 1, 1]
    expected = [w * 2 * prev / t for w, prev in zip(ramp, [0.0] + hist["recon"][:-1])]
    np.testing.assert_allclose(hist["beta"], expected, rtol=1e-6)
    assert 0.5 * 0.02 ** 2 < hist["recon"][-1] < 20 * 0.02 ** 2  # SNR 50: sigma^2 = 4e-4 (+ fit)
    best = hyper["best_epoch"] - 1
    assert hyper["beta_used"] == pytest.approx(hist["beta"][best])
    assert hyper["noise_variance_estimate"] == pytest.approx(hist["recon"][best - 1])
    with pytest.raises(ValueError, match="warmup_epochs"):
        fit(model, y[:50], "vaeunig", options=dict(opts, warmup_epochs=0), progress=False)


def test_auto_batch_size():
    assert resolve_batch_size("auto", 9_000) == 256        # small data: enough steps per epoch
    assert resolve_batch_size("auto", 100_000) == 1562
    assert resolve_batch_size("auto", 810_000) == 8192     # a whole brain: large batches
    assert resolve_batch_size("auto", 100) == 100          # never more than the data
    assert resolve_batch_size(512, 10_000) == 512


def test_tau_anneals_geometrically():
    opts = {"tau_start": 2.0, "tau_end": 0.5, "warmup_epochs": 2, "ramp_epochs": 3}
    taus = [tau_at(e, opts) for e in range(8)]
    assert taus[0] == 2.0
    assert np.all(np.diff(taus) <= 0)
    np.testing.assert_allclose(taus[4:], 0.5)


# ---- losses and the mixture prior ------------------------------------------------------------
def test_kl_terms_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, lv = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    pm, plv = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(pm, (0.5 * plv).exp()))
    torch.testing.assert_close(gaussian_kl(mu, lv, pm, plv), ref.sum(1))
    ref0 = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mu, lv), ref0.sum(1))
    logits = torch.randn(5, 4, generator=g)
    cat = torch.distributions.Categorical(logits=logits)
    uniform = torch.distributions.Categorical(probs=torch.full((5, 4), 0.25))
    torch.testing.assert_close(categorical_kl_uniform(logits),
                               torch.distributions.kl_divergence(cat, uniform))


def test_reparameterisation_noise_is_standard_normal(msdki_data):
    model, _, y = msdki_data
    torch.manual_seed(0)
    net = VAEUniG(model, hidden_width=16, latent_dim=4)
    s = torch.as_tensor(y[:1]).repeat(20000, 1)
    with torch.no_grad():
        out = net(s, torch.Generator().manual_seed(1))
    eps = (out["z"] - out["mu"]) / torch.exp(0.5 * out["logvar"])
    assert abs(float(eps.mean())) < 0.03
    assert abs(float(eps.std()) - 1.0) < 0.03


def test_gmm_prior_is_learnable_and_used(msdki_data):
    model, _, y = msdki_data
    torch.manual_seed(0)
    net = VAEGMM(model, hidden_width=32, latent_dim=4, n_components=3)
    assert net.prior_mean.requires_grad and net.prior_logvar.requires_grad
    s = torch.as_tensor(y[:256])
    out = net(s, torch.Generator().manual_seed(0))
    net.loss(s, out, beta=0.1)["loss"].backward()
    for p in (net.prior_mean, net.prior_logvar):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the Gaussian KL is against the c-selected component, not N(0, I)
    c = torch.eye(3)[[0, 1, 2, 0]]
    mean, logvar = net.prior_given(c)
    torch.testing.assert_close(mean, net.prior_mean.detach()[[0, 1, 2, 0]])
    torch.testing.assert_close(logvar, net.prior_logvar.detach()[[0, 1, 2, 0]])


def test_gmm_prior_moves_during_training(msdki_data):
    model, _, y = msdki_data
    opts = method_options("vaegmm", dict(GMM_FAST, epochs=8), model.name)
    torch.manual_seed(0)
    net = build_network("vaegmm", model, opts)
    before = (net.prior_mean.detach().clone(), net.prior_logvar.detach().clone())
    train_network(net, torch.as_tensor(y[:600]), opts, generator=torch.Generator().manual_seed(0),
                  progress=False)
    assert not torch.allclose(net.prior_mean.detach(), before[0])
    assert not torch.allclose(net.prior_logvar.detach(), before[1])


# ---- determinism, masking, options ------------------------------------------------------------
@pytest.mark.parametrize("method", ["ssl", "vaegmm"])
def test_same_seed_same_maps(msdki_data, method):
    model, _, y = msdki_data
    opts = dict(OPTIONS[method], epochs=3)
    a = fit(model, y[:400], method, device="cpu", seed=11, options=opts, progress=False)
    b = fit(model, y[:400], method, device="cpu", seed=11, options=opts, progress=False)
    c = fit(model, y[:400], method, device="cpu", seed=12, options=opts, progress=False)
    np.testing.assert_array_equal(a.params, b.params)
    assert a.history == b.history
    if method == "vaegmm":
        np.testing.assert_array_equal(a.std, b.std)
        np.testing.assert_array_equal(a.responsibilities, b.responsibilities)
    assert not np.array_equal(a.params, c.params)


def test_nan_rows_are_excluded(msdki_data):
    model, _, y = msdki_data
    signals = y[:300].copy()
    bad = np.zeros(300, dtype=bool)
    bad[[0, 17, 299]] = True
    signals[0, 5] = np.nan
    signals[17, :] = np.nan
    signals[299, -1] = np.inf
    res = fit(model, signals, "vaegmm", device="cpu", seed=0,
              options=dict(GMM_FAST, epochs=2), progress=False)
    np.testing.assert_array_equal(res.valid, ~bad)
    for arr in (res.params, res.std, res.responsibilities, res.latent_mean):
        assert arr.shape[0] == 300
        assert np.all(np.isnan(arr[bad])) and np.all(np.isfinite(arr[~bad]))


def test_ballstick_runs_and_gives_unit_directions(hcp_acq):
    rng = np.random.default_rng(0)
    model = make_model("ballstick", hcp_acq)
    n = 300
    dirs = rng.normal(size=(n, 3))
    truth = np.column_stack([rng.uniform(0.2, 0.8, n), rng.uniform(1.5, 2.5, n),
                             rng.uniform(0.5, 2.0, n), dirs / np.linalg.norm(dirs, axis=1, keepdims=True)])
    y = rician(model.forward_numpy(truth), 30.0, rng).astype(np.float32)
    res = fit(model, y, "vaegmm", device="cpu", seed=0, options=dict(GMM_FAST, epochs=2),
              progress=False)
    np.testing.assert_allclose(np.linalg.norm(res.maps(model)["dir"], axis=1), 1.0, atol=1e-5)
    assert res.std.shape == (n, model.n_params)


@pytest.mark.parametrize("method, options, match", [
    ("ssl", {"no_such_option": 1}, "unknown option"),
    ("ssl", {"epochs": 0}, "epochs"),
    ("ssl", {"lr": -1.0}, "lr"),
    ("ssl", {"activation": "sigmoid"}, "activation"),
    ("vaeunig", {"beta": -0.1}, "beta"),
    ("vaeunig", {"n_posterior_samples": 1}, "n_posterior_samples"),
    ("vaeunig", {"validation_fraction": 1.0}, "validation_fraction"),
    ("vaegmm", {"n_components": 1}, "n_components"),
    ("vaegmm", {"tau_start": 0.5, "tau_end": 1.0}, "tau_end"),
])
def test_bad_options_raise(msdki_data, method, options, match):
    model, _, y = msdki_data
    with pytest.raises(ValueError, match=match):
        fit(model, y[:50], method, device="cpu", options=options, progress=False)


def test_fit_network_checks_its_inputs(msdki_data):
    model, _, y = msdki_data
    with pytest.raises(ValueError, match="not a network method"):
        fit_network(model, y[:10], np.ones(10, bool), "lsq", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="valid marks"):
        fit_network(model, y[:10], np.ones(11, bool), "ssl", device=torch.device("cpu"))
    with pytest.raises(ValueError, match="shape"):
        fit_network(model, y[:10, :5], np.ones(10, bool), "ssl", device=torch.device("cpu"))
