"""The simulated coverage check of the participant report (fitting/calibration.py)."""
import numpy as np
import pytest

from vaemap_bids.fitting.calibration import coverage_table, simulate_like_subject, simulated_coverage
from vaemap_bids.physics import make_model
from vaemap_bids.simulate.acquisitions import hcp_acquisition


@pytest.fixture(scope="module")
def model():
    return make_model("msdki", hcp_acquisition())


def _truth(n, rng):
    return np.column_stack([rng.uniform(0.5, 2.5, n), rng.uniform(0.2, 1.2, n)])


def test_simulated_signals_are_b0_normalised_and_noisy_at_sigma(model):
    rng = np.random.default_rng(0)
    truth = np.tile([1.0, 0.5], (4000, 1))
    sig = simulate_like_subject(model, truth, np.full(4000, 0.05), rng)
    b0 = model.full_acquisition.b0_mask
    np.testing.assert_allclose(sig[:, b0].mean(axis=1), 1.0, atol=1e-5)
    clean = model.forward_numpy(truth[:1], model.full_acquisition.bvals)[0]
    dw = ~b0 & (model.full_acquisition.bvals < 1.1)   # b = 1 ms/um^2: SNR high, spread ~ sigma
    spread = (sig[:, dw] - clean[dw]).std()
    assert 0.045 < spread < 0.06


def test_an_honest_estimator_covers_at_the_nominal_level_and_an_overconfident_one_does_not(model):
    """The estimator returns truth + N(0, s^2) noise with std s (honest) or s/2 (overconfident);
    with 3000 voxels a binomial 95 % interval at p = 0.95 is +-0.008, at p = 0.5 +-0.018."""
    rng = np.random.default_rng(1)
    params = _truth(5000, rng)
    valid = np.ones(5000, bool)
    s = np.array([0.05, 0.08])

    def honest(signals, sigma, scale=1.0):
        n = len(signals)
        # the check hands its truth only through the signals: recover it from the rows' order
        est = honest.truth + rng.standard_normal((n, 2)) * s
        return est, np.tile(s * scale, (n, 1))

    def run(scale):
        def estimate(signals, sigma):
            return honest(signals, sigma, scale)
        return simulated_coverage(model, params, valid, 0.05, estimate, n_voxels=3000, seed=3)

    # the rows the check draws, in its order: the same generator and draw as simulated_coverage
    from vaemap_bids.fitting.calibration import draw_check_voxels
    honest.truth = params[draw_check_voxels(params, valid, 3000, np.random.default_rng(3))]
    good = run(1.0)
    assert good["n_voxels"] == 3000 and set(good["coverage"]) == {"msd", "msk"}
    for param, cov in good["coverage"].items():
        assert abs(cov["0.95"] - 0.95) < 0.015, (param, cov)
        assert abs(cov["0.5"] - 0.5) < 0.03, (param, cov)
    bad = run(0.5)
    for param, cov in bad["coverage"].items():
        assert cov["0.95"] < 0.75, (param, cov)   # z = 0.98: 67 % expected


def test_no_std_gives_an_empty_table_and_directions_are_left_out():
    model = make_model("ballstick", hcp_acquisition())
    n = 50
    rng = np.random.default_rng(0)
    d = rng.standard_normal((n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    params = np.column_stack([rng.uniform(0.2, 0.6, n), rng.uniform(1, 2, n), rng.uniform(1, 2, n), d])
    res = simulated_coverage(model, params, np.ones(n, bool), 0.05, lambda s, g: (params, None),
                             n_voxels=20)
    assert res["coverage"] == {} and res["n_voxels"] == 20
    table = coverage_table(params, np.full_like(params, 0.1), params, model)
    assert "dir" not in table and all(v["0.95"] == 1.0 for v in table.values())
