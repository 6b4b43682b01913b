"""The noise models' likelihoods against scipy, far into the tails."""
from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from scipy import special, stats

from vaemap_bids.physics.noise import (check_noise_model, log_bessel_i, mean_signal_bias_floor,
                                       negative_log_likelihood)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 7, 15])
def test_log_bessel_matches_scipy(order):
    x = np.concatenate([[1e-8, 1e-3], np.logspace(-2, 5, 400)])
    got = log_bessel_i(order, torch.tensor(x, dtype=torch.float64)).numpy()
    with np.errstate(divide="ignore"):
        want = np.log(special.ive(order, x)) + x
    finite = np.isfinite(want)
    assert finite.mean() > 0.8
    assert np.allclose(got[finite], want[finite], rtol=1e-9, atol=1e-9)
    # where scipy's ive underflows to 0 (tiny x, high order), ours stays finite and exact
    small = x[~finite]
    exact = [float(mpmath.log(mpmath.besseli(order, v))) for v in small]
    assert np.allclose(got[~finite], exact, rtol=1e-9)


def _rice_nll_reference(m: float, nu: float, s: float) -> float:
    """-log of the Rician density in 50-digit arithmetic (scipy's logpdf overflows far out)."""
    mpmath.mp.dps = 50
    m, nu, s = mpmath.mpf(m), mpmath.mpf(nu), mpmath.mpf(s)
    p = m / s ** 2 * mpmath.exp(-(m ** 2 + nu ** 2) / (2 * s ** 2)) * mpmath.besseli(0, m * nu / s ** 2)
    return float(-mpmath.log(p))


def test_rician_equals_scipy_rice_far_into_the_tail():
    rng = np.random.default_rng(0)
    sigma = np.array([0.01, 0.05, 0.2, 1.0])
    nu = np.concatenate([[0.0, 1e-4], rng.uniform(0, 2, 200), [50.0]])
    m = np.concatenate([[1e-6, 1e-3], rng.uniform(0, 3, 200), [10.0]])
    for s in sigma:
        # scipy's rice is in units of sigma: b = nu / s, x = m / s, logpdf(m) = logpdf(x) - log s
        with np.errstate(all="ignore"):
            want = -(stats.rice.logpdf(m / s, nu / s) - np.log(s))
        got = negative_log_likelihood(torch.tensor(m), torch.tensor(nu), s).numpy()
        ok = np.isfinite(want)
        assert np.allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6), s
        # far into the tail, where scipy gives inf, against 50-digit arithmetic
        tail = [_rice_nll_reference(a, b, s) for a, b in zip(m[~ok], nu[~ok])]
        assert np.allclose(got[~ok], tail, rtol=1e-6, atol=1e-6), s


def test_rician_in_float32_far_into_the_tail():
    # z = m nu / s^2 = 4e6: I0 overflows float32 long before; the scaled form does not
    m = torch.tensor([1.0, 1.0, 0.001], dtype=torch.float32)
    nu = torch.tensor([1.0, 0.98, 0.5], dtype=torch.float32)
    s = 5e-4
    got = negative_log_likelihood(m, nu, s).double().numpy()
    want = [_rice_nll_reference(a, b, s) for a, b in zip(m.double().numpy(), nu.double().numpy())]
    assert np.all(np.isfinite(got))
    assert np.allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("coils", [2, 4, 8])
def test_noncentral_chi_against_scipy_ncx2(coils):
    # (m / s)^2 is non-central chi-square with 2L dof and non-centrality (nu / s)^2
    rng = np.random.default_rng(coils)
    s = 0.1
    m = rng.uniform(1e-3, 2.0, 300)
    nu = rng.uniform(0.0, 1.5, 300)
    want = -(stats.ncx2.logpdf((m / s) ** 2, 2 * coils, (nu / s) ** 2) + np.log(2 * m / s ** 2))
    got = negative_log_likelihood(torch.tensor(m), torch.tensor(nu), s, n_coils=coils).numpy()
    ok = np.isfinite(want)
    assert np.allclose(got[ok], want[ok], rtol=1e-6, atol=1e-6)
    # at nu = 0 the density is the central chi one
    central = -(stats.chi.logpdf(m / s, 2 * coils) - np.log(s))
    zero = negative_log_likelihood(torch.tensor(m), torch.zeros(300, dtype=torch.float64), s,
                                   n_coils=coils).numpy()
    assert np.allclose(zero, central, rtol=1e-5, atol=1e-5)


def test_gaussian_and_per_voxel_sigma_broadcast():
    m = torch.tensor([[0.5, 0.2], [0.9, 0.1]], dtype=torch.float64)
    nu = torch.tensor([[0.4, 0.25], [1.0, 0.0]], dtype=torch.float64)
    s = torch.tensor([[0.1], [0.3]], dtype=torch.float64)
    got = negative_log_likelihood(m, nu, s, "gaussian").numpy()
    want = -stats.norm.logpdf(m.numpy(), nu.numpy(), s.numpy())
    assert np.allclose(got, want)
    rice = negative_log_likelihood(m, nu, s).numpy()
    assert rice.shape == (2, 2)
    assert np.allclose(rice[1], -(stats.rice.logpdf(m[1].numpy() / 0.3, nu[1].numpy() / 0.3)
                                  - np.log(0.3)), rtol=1e-6, atol=1e-6)


def test_gradients_are_finite_at_the_floor_and_at_high_snr():
    nu = torch.tensor([0.0, 1e-5, 0.01, 0.5, 1.0], dtype=torch.float32, requires_grad=True)
    m = torch.tensor([0.02, 0.02, 0.03, 0.5, 1.0], dtype=torch.float32)
    for coils in (1, 4):
        nu.grad = None
        negative_log_likelihood(m, nu, 0.01, n_coils=coils).sum().backward()
        assert torch.all(torch.isfinite(nu.grad))


def test_noise_floor_and_bad_options():
    assert mean_signal_bias_floor(1.0) == pytest.approx(np.sqrt(np.pi / 2))
    assert mean_signal_bias_floor(2.0, 4) == pytest.approx(stats.chi.mean(8) * 2.0)
    with pytest.raises(ValueError, match="unknown noise model"):
        check_noise_model("poisson")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_coils"):
            check_noise_model("rician", bad)


# ---- score and Fisher information (the lsq solver's step and its Cramer-Rao std) -------------
@pytest.mark.parametrize("model,coils", [("rician", 1), ("ncchi", 3), ("gaussian", 1)])
def test_score_is_the_derivative_of_the_nll(model, coils):
    from vaemap_bids.physics.noise import nll_and_score, score

    rng = np.random.default_rng(coils)
    m = torch.tensor(rng.uniform(1e-3, 2.0, 400))
    nu = torch.tensor(rng.uniform(1e-3, 1.5, 400), requires_grad=True)
    negative_log_likelihood(m, nu, 0.07, model, coils).sum().backward()
    got = score(m, nu.detach(), 0.07, model, coils)
    assert torch.allclose(got, nu.grad, rtol=1e-8, atol=1e-8)
    fused_nll, fused_score = nll_and_score(m, nu.detach(), 0.07, model, coils)
    assert torch.allclose(fused_nll, negative_log_likelihood(m, nu.detach(), 0.07, model, coils))
    assert torch.allclose(fused_score, got)
    # without the constants: the same up to a term that does not depend on nu
    lean = nll_and_score(m, nu.detach(), 0.07, model, coils, constants=False)[0]
    lean2 = nll_and_score(m, nu.detach() * 0.5, 0.07, model, coils, constants=False)[0]
    full2 = negative_log_likelihood(m, nu.detach() * 0.5, 0.07, model, coils)
    assert torch.allclose(fused_nll - lean, full2 - lean2)


@pytest.mark.parametrize("coils", [1, 4])
def test_fisher_information_against_adaptive_quadrature(coils):
    from scipy import integrate

    from vaemap_bids.physics.noise import fisher_information

    def exact(a):
        L = coils

        def density(x):
            return np.exp(L * np.log(x) - (L - 1) * np.log(a) - (x - a) ** 2 / 2
                          + np.log(special.ive(L - 1, x * a)))

        def weighted(x):
            return density(x) * (x * special.ive(L, x * a) / special.ive(L - 1, x * a) - a) ** 2

        lo = max(0.0, a - 20)
        return (integrate.quad(weighted, lo, a + 20, limit=200)[0]
                / integrate.quad(density, lo, a + 20, limit=200)[0])

    a = np.array([0.05, 0.5, 1.0, 1.37, 3.0, 10.0, 39.0, 60.0])
    sigma = 0.02
    got = fisher_information(torch.tensor(a * sigma), sigma, "ncchi", coils).numpy() * sigma ** 2
    want = np.array([exact(v) for v in a])
    assert np.allclose(got, want, rtol=2e-3)
    # the information lost to the floor: 0 at nu = 0, 1 / sigma^2 far above it, never more
    assert fisher_information(torch.tensor([0.0]), 1.0).item() == 0.0
    assert np.all(got <= 1.0)
    assert fisher_information(torch.tensor([3.0]), 0.5, "gaussian").item() == pytest.approx(4.0)


def test_noise_options_name_the_coil_rule():
    from vaemap_bids.physics.noise import check_noise_options, effective_coils

    check_noise_options("ncchi", 8)
    check_noise_options("gaussian", 1)
    with pytest.raises(ValueError, match="ncchi"):
        check_noise_options("rician", 4)
    with pytest.raises(ValueError, match="unknown noise model"):
        check_noise_options("chi2", 1)
    assert effective_coils("rician") == 1 and effective_coils("ncchi", 4) == 4
    assert effective_coils("gaussian", 1) == 0
