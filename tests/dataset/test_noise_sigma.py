"""sigma of a series (vaemap_bids.dataset.noise): b0 repeats with the Koay-Basser correction,
dipy's piesno and estimate_sigma, and the auto choice. Synthetic volumes with a known sigma."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from vaemap_bids.dataset.noise import (estimate_series_sigma, koay_theta, koay_xi,
                                       normalised_sigma, pooled_repeat_sigma)

SIGMA = 30.0


def series(n_b0=6, n_dw=24, coils=1, background=True, seed=0, shape=(22, 22, 12)):
    """A head-like ellipsoid (S0 800-1200, smooth) in a background of pure noise (or zeros)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r2 = (grid ** 2).sum(0)
    mask = r2 < 0.6
    s0 = np.where(r2 < 0.75, 1000.0 + 200.0 * grid[0], 0.0)
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_dw, 1000.0)])
    clean = s0[..., None] * np.exp(-bvals * 0.8e-3)
    # root-sum-of-squares of `coils` channels, each with sigma in both quadratures
    share = clean / np.sqrt(coils)
    power = sum((share + SIGMA * rng.standard_normal(clean.shape)) ** 2
                + (SIGMA * rng.standard_normal(clean.shape)) ** 2 for _ in range(coils))
    data = np.sqrt(power)
    if not background:
        data = np.where((s0 > 0)[..., None], data, 0.0)
    return data, bvals, mask, s0


def test_koay_xi_is_the_magnitude_variance():
    theta = np.array([0.0, 0.5, 2.0, 10.0])
    assert np.allclose(koay_xi(theta, 1), stats.rice.var(theta), rtol=1e-10)
    assert koay_xi(0.0, 1) == pytest.approx(2 - np.pi / 2)
    # 4 channels at nu = 0: the variance of a chi with 8 degrees of freedom
    assert koay_xi(0.0, 4) == pytest.approx(stats.chi.var(8))
    # the fixed point recovers theta from the moments
    assert np.allclose(koay_theta(stats.rice.mean(theta[1:]), stats.rice.var(theta[1:])),
                       theta[1:], rtol=1e-6)


def test_pooled_repeats_corrected_at_low_snr():
    """Rician repeats at SNR 2: the raw spread reads sigma ~9 % low, the corrected one does not."""
    rng = np.random.default_rng(1)
    nu, s = 2.0, 1.0
    rep = np.abs(nu + s * rng.standard_normal((4000, 5)) + 1j * s * rng.standard_normal((4000, 5)))
    sigma, info = pooled_repeat_sigma(rep)
    assert sigma == pytest.approx(1.0, rel=0.03)
    raw, _ = pooled_repeat_sigma(rep, magnitude=False)
    assert raw < 0.95
    assert info["n_repeats"] == 5 and info["n_voxels"] == 4000
    with pytest.raises(ValueError, match="n >= 2"):
        pooled_repeat_sigma(rep[:, :1])


@pytest.mark.parametrize("n_b0,coils", [(6, 1), (2, 1), (6, 4)])
def test_b0_repeats(n_b0, coils):
    data, bvals, mask, _ = series(n_b0=n_b0, coils=coils, seed=n_b0 + coils)
    sigma, info = estimate_series_sigma(data, bvals, mask, n_coils=coils)
    assert info["method"] == "b0" and info["n_b0"] == n_b0 and info["value"] == sigma
    assert sigma == pytest.approx(SIGMA, rel=0.05)


def test_single_b0_uses_the_background_else_gives_up():
    data, bvals, mask, s0 = series(n_b0=1)
    sigma, info = estimate_series_sigma(data, bvals, mask)
    assert info["method"] == "piesno"
    assert sigma == pytest.approx(SIGMA, rel=0.1)
    # dipy's estimate_sigma applies the background correction everywhere and reads the sharp
    # edge of this head as noise: it runs, and reads high (about 3 sigma here), which is why
    # auto never picks it
    explicit, info = estimate_series_sigma(data, bvals, mask, method="estimate_sigma")
    assert info["method"] == "estimate_sigma" and explicit > 1.5 * SIGMA
    # zero-filled background, one b0: nothing honest to measure
    zeroed, bvals, mask, _ = series(n_b0=1, background=False)
    none, info = estimate_series_sigma(zeroed, bvals, mask)
    assert none is None and info["method"] == "none" and "b0" in info["reason"]
    with pytest.raises(ValueError, match="at least 2 b0"):
        estimate_series_sigma(data, bvals, mask, method="b0")
    # the per-voxel sigma / S0 of the normalised signal
    ratio = normalised_sigma(SIGMA, s0)
    assert np.isnan(ratio[s0 == 0]).all() and np.allclose(ratio[s0 > 0], SIGMA / s0[s0 > 0])


def test_bad_inputs():
    data, bvals, mask, _ = series(n_b0=2, n_dw=3, shape=(8, 8, 6))
    with pytest.raises(ValueError, match="unknown sigma method"):
        estimate_series_sigma(data, bvals, mask, method="mppca")
    with pytest.raises(ValueError, match="do not match"):
        estimate_series_sigma(data, bvals[:-1], mask)
    with pytest.raises(ValueError, match="n_coils"):
        estimate_series_sigma(data, bvals, mask, n_coils=0)
    with pytest.raises(ValueError, match="background"):
        estimate_series_sigma(data, bvals, mask, method="piesno")
