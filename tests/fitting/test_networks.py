"""Network estimators (ssl, vaeunig, vaegmm) and their trainer: recovery, schedules, the
likelihood, the exact mixture KL, posterior moments and refinement, coverage, the in-memory
predictor, determinism, masking and option checks. CPU, small data, few epochs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vaemap_bids.fitting import fit
from vaemap_bids.fitting.networks import (VAEGMM, VAEUniG, build_network, categorical_kl_uniform,
                                          full_gaussian_kl, gaussian_kl, mixture_kl,
                                          mixture_moments, network_prior, nll,
                                          posterior_nodes, refine_posterior)
from vaemap_bids.fitting.options import method_options
from vaemap_bids.fitting.train import (beta_at, fit_network, resolve_batch_size, train_network)
from vaemap_bids.simulate.clusters import simulate_clusters
from vaemap_bids.physics import make_model

FAST = {"epochs": 25, "batch_size": 32, "lr": 3e-3, "patience": 4}
# The VAEs converge more slowly than ssl (sampled z, a decoder behind the encoder): more epochs.
VAE_FAST = dict(FAST, epochs=25, patience=8, warmup_epochs=2, ramp_epochs=4, n_posterior_samples=8,
                prior_em_iterations=3)
# the refinement and the prior's EM cost inference time; tests of other things keep them short
LIGHT = {"refine_steps": 2, "prior_em_iterations": 1}
GMM_FAST = dict(VAE_FAST)
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
    maps = model.split(res.params)
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
    assert len(fits["vaegmm"].history["sigma"]) == fits["vaegmm"].hyperparameters["epochs_run"]


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
    # beta: auto = 1 (the ELBO of the likelihood), reached linearly over the ramp
    np.testing.assert_allclose(hist["beta"][warm:warm + ramp + 2], [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_noise_level_is_learnt_or_given(msdki_data, fits):
    """Without sigma the network learns one noise level with the ELBO (SNR 50: sigma = 0.02 on
    the normalised signal, before the small extra spread of the b0 normalisation); a given sigma
    is used as it is and recorded."""
    model, _, y = msdki_data
    for method in ("ssl", "vaeunig", "vaegmm"):
        noise = fits[method].hyperparameters["noise"]
        assert noise["sigma_source"] == "learnt" and noise["model"] == "rician"
        assert 0.017 < noise["sigma"] < 0.024, (method, noise)
        assert "b0" in noise["sigma_init_source"]
    valid = np.ones(400, bool)
    res = fit_network(model, y[:400], valid, "vaeunig", device=torch.device("cpu"), seed=0,
                      options=dict(VAE_FAST, epochs=3, **LIGHT), progress=False,
                      sigma=np.full(400, 0.02))
    assert res.hyperparameters["noise"]["sigma_source"] == "given"
    assert res.hyperparameters["noise"]["sigma"] == pytest.approx(0.02)
    assert all(np.isnan(res.history["sigma"]))
    with pytest.raises(ValueError, match="sigma"):
        fit_network(model, y[:10], np.ones(10, bool), "ssl", device=torch.device("cpu"),
                    sigma=np.full(9, 0.02))
    with pytest.raises(ValueError, match="sigma"):
        fit_network(model, y[:10], np.ones(10, bool), "ssl", device=torch.device("cpu"),
                    sigma=-1.0)


def test_nll_is_the_noise_model_likelihood():
    """The reconstruction term is the NLL of physics.noise: Rician = scipy's rice.logpdf."""
    from scipy.stats import rice
    m = torch.tensor([0.01, 0.3, 1.0, 2.5], dtype=torch.float64)
    nu = torch.tensor([0.2, 0.3, 0.9, 2.0], dtype=torch.float64)
    sigma = 0.1
    ref = -rice.logpdf(m.numpy(), nu.numpy() / sigma, scale=sigma)
    np.testing.assert_allclose(nll(m, nu, sigma, "rician").numpy(), ref, rtol=1e-6)
    gauss = nll(m, nu, sigma, "gaussian").numpy()
    np.testing.assert_allclose(gauss, 0.5 * ((m - nu).numpy() / sigma) ** 2
                               + np.log(sigma) + 0.5 * np.log(2 * np.pi), rtol=1e-9)


def test_auto_batch_size():
    assert resolve_batch_size("auto", 9_000) == 256        # small data: enough steps per epoch
    assert resolve_batch_size("auto", 100_000) == 1562
    assert resolve_batch_size("auto", 810_000) == 8192     # a whole brain: large batches
    assert resolve_batch_size("auto", 100) == 100          # never more than the data
    assert resolve_batch_size(512, 10_000) == 512


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


def test_full_covariance_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 3, generator=g)
    chol = torch.tril(torch.randn(6, 3, 3, generator=g), -1) + torch.diag_embed(
        torch.rand(6, 3, generator=g) + 0.2)
    pm, plv = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    q = torch.distributions.MultivariateNormal(mu, scale_tril=chol)
    p = torch.distributions.MultivariateNormal(pm, covariance_matrix=torch.diag_embed(plv.exp()))
    torch.testing.assert_close(full_gaussian_kl(mu, chol, pm, plv),
                               torch.distributions.kl_divergence(q, p), rtol=1e-5, atol=1e-5)
    diag = torch.diag_embed(torch.rand(6, 3, generator=g) + 0.1)
    torch.testing.assert_close(full_gaussian_kl(mu, diag),
                               gaussian_kl(mu, 2 * torch.log(torch.diagonal(diag, 0, 1, 2))))


def test_exact_mixture_kl_equals_monte_carlo():
    """KL(q(y, z|S) || p(y, z)) enumerated over the K components equals the Monte-Carlo mean of
    log q(y, z) - log p(y, z) over draws y ~ q(y|S), z ~ q(z|S, y)."""
    g = torch.Generator().manual_seed(3)
    K, L = 3, 2
    logits = torch.randn(1, K, generator=g, dtype=torch.float64)
    mu = torch.randn(1, K, L, generator=g, dtype=torch.float64)
    chol = torch.tril(0.3 * torch.randn(1, K, L, L, generator=g, dtype=torch.float64), -1) \
        + torch.diag_embed(0.2 + torch.rand(1, K, L, generator=g, dtype=torch.float64))
    pm = torch.randn(K, L, generator=g, dtype=torch.float64)
    plv = 0.5 * torch.randn(K, L, generator=g, dtype=torch.float64)
    kl_y, kl_z = mixture_kl(logits.double(), mu, chol, pm, plv)
    exact = float(kl_y + kl_z)
    n = 400_000
    q_y = torch.softmax(logits[0], 0)
    y = torch.multinomial(q_y, n, replacement=True, generator=g)
    z = mu[0, y] + (chol[0, y] @ torch.randn(n, L, 1, generator=g, dtype=torch.float64)).squeeze(-1)
    log_q = torch.log(q_y[y]) + torch.distributions.MultivariateNormal(
        mu[0, y], scale_tril=chol[0, y]).log_prob(z)
    log_p = -np.log(K) + torch.distributions.Normal(pm[y], (0.5 * plv[y]).exp()).log_prob(z).sum(1)
    diff = (log_q - log_p)
    mc, se = float(diff.mean()), float(diff.std() / np.sqrt(n))
    assert abs(mc - exact) < 4 * se + 1e-4, (exact, mc, se)


def test_gmm_prior_is_learnable_and_used(msdki_data):
    model, _, y = msdki_data
    torch.manual_seed(0)
    net = VAEGMM(model, hidden_width=32, latent_dim=4, n_components=3)
    assert net.prior_mean.requires_grad and net.prior_logvar.requires_grad
    s = torch.as_tensor(y[:256])
    out = net(s, torch.Generator().manual_seed(0))
    assert out["mu"].shape == (256, 3, 4) and out["signal"].shape == (256, 3, model.n_measurements)
    net.loss(s, out, beta=0.1)["loss"].backward()
    for p in (net.prior_mean, net.prior_logvar, net.encoder_y.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the z KL of component k is against p(z|k): moving one prior mean changes only its term
    with torch.no_grad():
        kl_y, kl_z = mixture_kl(out["logits"], out["mu"], out["chol"], *net.prior())
        pm = net.prior_mean.clone()
        pm[1] += 1.0
        _, kl_z2 = mixture_kl(out["logits"], out["mu"], out["chol"], pm, net.prior()[1])
        q = torch.softmax(out["logits"], 1)
        per = full_gaussian_kl(out["mu"], out["chol"], net.prior()[0].expand_as(out["mu"]),
                               net.prior()[1].expand_as(out["mu"]))
        per2 = full_gaussian_kl(out["mu"], out["chol"], pm.expand_as(out["mu"]),
                                net.prior()[1].expand_as(out["mu"]))
        torch.testing.assert_close(kl_z2 - kl_z, (q * (per2 - per)).sum(1))
        torch.testing.assert_close(per2[:, [0, 2]], per[:, [0, 2]])


def test_posterior_moments_match_monte_carlo(msdki_data):
    """The map and std are the mean and sd of the squashed parameters under the mixture q:
    the Gauss-Hermite rule agrees with brute-force sampling, and directions stay unit."""
    model, _, y = msdki_data
    torch.manual_seed(0)
    net = VAEGMM(model, hidden_width=32, latent_dim=3, n_components=3)
    with torch.no_grad():
        net.decoder.weight.mul_(5.0)          # a posterior wide enough for the squash to bend
        s = torch.as_tensor(y[:20])
        logits, mu, chol = net.components(s)
        w = torch.softmax(logits, 1)
        nodes, nw = posterior_nodes(3, 300, None, "cpu")
        assert nodes.shape[0] >= 300
        mean, std = mixture_moments(net, w, mu, chol, nodes, nw)
        g = torch.Generator().manual_seed(0)
        n = 20_000
        k = torch.multinomial(w, n, replacement=True, generator=g)          # (20, n)
        rows = torch.arange(20)[:, None]
        z = mu[rows, k] + (chol[rows, k] @ torch.randn(20, n, 3, 1, generator=g)).squeeze(-1)
        x = net.decode(z)[0]
    se = x.std(1) / np.sqrt(n)
    assert torch.all((mean - x.mean(1)).abs() <= 4 * se + 1e-4)
    assert torch.all((std - x.std(1)).abs() <= 0.03 * x.std(1) + 1e-4)
    assert float(std.min()) > 0


def test_refinement_without_prior_is_maximum_likelihood(msdki_data):
    """With a flat prior the refinement is a per-voxel Rician ML fit: it reaches the noise level
    of the data at least as well as lsq and never raises the energy."""
    model, truth, y = msdki_data
    torch.manual_seed(0)
    net = VAEUniG(model, hidden_width=16, latent_dim=model.n_raw + 1)
    s = torch.as_tensor(y[:200])
    _, mu, _ = net.components(s)
    log_pi, pm, prec = network_prior(net)
    flat = (log_pi, pm, 1e-8 * prec)
    z, chol, _ = refine_posterior(net, s, mu, torch.tensor(0.02), flat, n_steps=30)
    with torch.no_grad():
        params = net.decode(z[:, 0])[0].numpy()
    lsq = fit(model, y[:200], "lsq", device="cpu", progress=False)
    err = np.sqrt(((params - truth[:200]) ** 2).mean(0))
    err_lsq = np.sqrt(((lsq.params - truth[:200]) ** 2).mean(0))
    assert err[0] < 1.1 * err_lsq[0], (err, err_lsq)
    assert torch.isfinite(chol).all()


def test_reparameterisation_noise_is_standard_normal(msdki_data):
    model, _, y = msdki_data
    torch.manual_seed(0)
    net = VAEUniG(model, hidden_width=16, latent_dim=4)
    s = torch.as_tensor(y[:1]).repeat(20000, 1)
    with torch.no_grad():
        out = net(s, torch.Generator().manual_seed(1))
    eps = torch.linalg.solve_triangular(out["chol"], (out["z"] - out["mu"]).unsqueeze(-1),
                                        upper=False).squeeze(-1)
    assert abs(float(eps.mean())) < 0.03
    assert abs(float(eps.std()) - 1.0) < 0.03


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
    opts = dict(OPTIONS[method], epochs=3, **(LIGHT if method != "ssl" else {}))
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
              options=dict(GMM_FAST, epochs=2, **LIGHT), progress=False)
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
    res = fit(model, y, "vaegmm", device="cpu", seed=0, options=dict(GMM_FAST, epochs=2, **LIGHT),
              progress=False)
    np.testing.assert_allclose(np.linalg.norm(model.split(res.params)["dir"], axis=1), 1.0, atol=1e-5)
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
    ("vaegmm", {"noise_model": "poisson"}, "noise_model"),
    ("vaegmm", {"n_coils": 0}, "n_coils"),
    ("vaeunig", {"posterior_covariance": "band"}, "posterior_covariance"),
    ("vaeunig", {"refine_steps": -1}, "refine_steps"),
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


# ---- calibration and the in-memory predictor ---------------------------------------------------
def test_coverage_on_a_small_simulation(hcp_acq):
    """The paper's three clusters at SNR 20 (1,200 voxels, seed 0): with the refinement (MAP and
    Laplace posterior under the prior re-estimated on the voxels) the 95 % intervals mean +- 1.96
    std of vaeunig contain the truth in 0.85-0.99 of the WM-like and GM-like voxels, for D and K.
    (Measured with the full defaults on 3,000 voxels: 0.90-0.95; 1,200 voxels and a short
    training leave a wider tolerance.)"""
    sim = simulate_clusters(hcp_acq, 1200, 20.0, 0)
    opts = dict(VAE_FAST, epochs=12, refine_steps=5, prior_em_iterations=5)
    res = fit(sim.model, sim.noisy, "vaeunig", device="cpu", seed=0, options=opts, progress=False)
    inside = np.abs(res.params - sim.params) <= 1.96 * res.std
    for c in (0, 1):
        cov = inside[sim.labels == c].mean(0)
        assert np.all((cov >= 0.85) & (cov <= 0.99)), (sim.cluster_names[c], cov)


def test_predict_runs_the_trained_network_on_new_voxels(msdki_data, fits):
    model, truth, y = msdki_data
    for method in ("ssl", "vaegmm"):
        res = fits[method]
        assert callable(res.predict)
        params, std = res.predict(y[:100])
        np.testing.assert_allclose(params, res.params[:100], rtol=0, atol=1e-5)
        if method == "ssl":
            assert std is None
        else:
            np.testing.assert_allclose(std, res.std[:100], rtol=0, atol=1e-5)
    # new voxels (a NaN row among them) and a per-voxel sigma: no retraining, NaN stays NaN
    rng = np.random.default_rng(5)
    new = rician(model.forward_numpy(truth[:50]), 50.0, rng).astype(np.float32)
    new[3, 2] = np.nan
    params, std = fits["vaegmm"].predict(new, sigma=np.full(50, 0.02))
    assert params.shape == (50, model.n_params) and np.isnan(params[3]).all()
    ok = np.arange(50) != 3
    assert np.all(np.isfinite(params[ok])) and np.all(std[ok] > 0)
    assert np.median(np.abs(params[ok, 0] - truth[:50][ok, 0])) < 0.08
