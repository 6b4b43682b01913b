"""The Bayes oracle of vaemap-sim: brute-force quadrature on a 2-parameter toy, grid refinement
changes nothing, and the posterior is calibrated (a property only the exact posterior has)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import special

from vaemap_bids.physics import Acquisition, make_model
from vaemap_bids.simulate.clusters import PAPER_CLUSTERS, simulate_clusters
from vaemap_bids.simulate.oracle import (OracleGrid, Prior, oracle_for_simulation,
                                         posterior_moments)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    """b0 x 3, b = 1 and 2 ms/um^2 x 4 directions each: T = 11 volumes."""
    rng = np.random.default_rng(0)
    bvals = np.repeat([0.0, 1.0, 2.0], [3, 4, 4])
    bvecs = rng.normal(size=(11, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[:3] = 0.0
    return make_model("msdki", Acquisition(bvals, bvecs))


def brute_force(model, y, sigma, nd=180, nk=160, nc=61, c_sd=6.0):
    """Posterior moments by plain midpoint sums over the whole physical (D, K) domain and a
    trapezoid over the normaliser c, every volume's Rician density written out in numpy."""
    acq = model.acquisition
    b_max = acq.bvals.max()
    hd, hk = 3.5 / nd, 3.0 / nk
    d = (np.arange(nd) + 0.5) * hd
    k = (np.arange(nk) + 0.5) * hk
    D, K = np.meshgrid(d, k, indexing="ij")
    inside = b_max * D * K < 3.0
    means, var, w = (np.asarray(PAPER_CLUSTERS[key]) for key in ("means", "variances", "weights"))
    prior = np.zeros_like(D)
    for (md, mk), v, wc in zip(means, var, w):
        dens = np.exp(-((D - md) ** 2 + (K - mk) ** 2) / (2 * v)) / (2 * np.pi * v) * inside
        prior += wc * dens / (dens.sum() * hd * hk)
    n_b0 = int(acq.b0_mask.sum())
    s_c = sigma / np.sqrt(n_b0)
    c = 1.0 + s_c * np.linspace(-c_sd, c_sd, nc)
    nu = np.exp(-acq.bvals[None, None, :] * D[..., None]
                + (acq.bvals[None, None, :] * D[..., None]) ** 2 * K[..., None] / 6)
    out = []
    for row in y:
        log_l = np.empty((nc,) + D.shape)
        for j, cj in enumerate(c):
            m = cj * row[None, None, :]
            z = m * nu / sigma ** 2
            log_rice = (np.log(m / sigma ** 2) - (m - nu) ** 2 / (2 * sigma ** 2)
                        + np.log(special.i0e(z)))
            log_l[j] = log_rice.sum(-1) + (row.size - 1) * np.log(cj)
        top = log_l.max()
        lik = np.trapezoid(np.exp(log_l - top), c, axis=0)
        post = lik * prior
        post /= post.sum()
        mean = np.array([(post * D).sum(), (post * K).sum()])
        sd = np.sqrt([(post * (D - mean[0]) ** 2).sum(), (post * (K - mean[1]) ** 2).sum()])
        out.append((mean, sd))
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])


def one_per_cluster(sim):
    return np.array([np.flatnonzero(sim.labels == c)[0] for c in range(3)])


def test_oracle_equals_brute_force_quadrature_on_a_toy(toy):
    """One voxel of each cluster at SNR 8 (broad, truncated posteriors): the oracle, started
    from the whole domain, against midpoint sums on a 180 x 160 grid (they agree to < 0.3 % of
    the sd, and closer as the brute-force grid is refined)."""
    sim = simulate_clusters(toy.acquisition, 40, snr=8.0, seed=3, model=toy)
    rows = one_per_cluster(sim)
    prior = Prior.of(sim.cluster_means, sim.cluster_variances, sim.cluster_weights, toy)
    mean, sd = posterior_moments(toy, sim.noisy[rows], sim.sigma, prior)
    want_mean, want_sd = brute_force(toy, sim.noisy[rows], sim.sigma)
    assert np.all(np.abs(mean - want_mean) < 0.01 * want_sd), (mean, want_mean, want_sd)
    assert np.allclose(sd, want_sd, rtol=0.005), (sd, want_sd)


@pytest.mark.parametrize("snr", [20.0, 100.0])
def test_refining_the_grid_changes_nothing(hcp_acq, snr):
    """HCP MS-DKI voxels, one per cluster: doubling every resolution and widening every range
    moves the posterior mean and sd by less than 0.2 % of the sd."""
    model = make_model("msdki", hcp_acq)
    sim = simulate_clusters(hcp_acq, 60, snr, seed=1, model=model)
    rows = one_per_cluster(sim)
    from vaemap_bids.fitting import fit
    from vaemap_bids.simulate.oracle import simulation_sigma

    start = fit(model, sim.noisy[rows], "lsq", device="cpu", progress=False,
                sigma=simulation_sigma(sim)[rows])
    prior = Prior.of(sim.cluster_means, sim.cluster_variances, sim.cluster_weights, model)
    args = (model, sim.noisy[rows], sim.sigma, prior)
    mean, sd = posterior_moments(*args, start=(start.params, start.std))
    fine_mean, fine_sd = posterior_moments(*args, start=(start.params, start.std),
                                           grid=OracleGrid().refined())
    assert np.all(np.abs(mean - fine_mean) < 2e-3 * fine_sd)
    assert np.allclose(sd, fine_sd, rtol=2e-3)


def test_oracle_is_calibrated_and_beats_lsq(toy):
    """For the exact posterior E[((truth - mean) / sd)^2] = 1 (an identity, whatever the
    posterior's shape) and the mean has the least squared error. 600 voxels drawn from the prior
    at SNR 40 (posteriors near Gaussian, so z^2 has light tails): the mean of z^2 has a sampling
    sd of about 6 %, the band [0.82, 1.2] is 3 sd; and the oracle's error is below Rician
    maximum likelihood's."""
    from vaemap_bids.fitting import fit
    from vaemap_bids.simulate.oracle import simulation_sigma

    z2, err2, ml2 = [], [], []
    for seed in (5, 6):
        sim = simulate_clusters(toy.acquisition, 300, snr=40.0, seed=seed, model=toy)
        mean, sd = oracle_for_simulation(sim)
        z2.append(((mean - sim.params) / sd) ** 2)
        err2.append((mean - sim.params) ** 2)
        ml = fit(toy, sim.noisy, "lsq", device="cpu", progress=False,
                 sigma=simulation_sigma(sim))
        ml2.append((ml.params - sim.params) ** 2)
    ratio = np.concatenate(z2).mean(0)
    assert np.all((ratio > 0.82) & (ratio < 1.2)), ratio
    assert np.all(np.concatenate(err2).mean(0) < np.concatenate(ml2).mean(0))
