"""Stratified training subsamples (fitting/subsample.py)."""
import numpy as np
import pytest

from vaemap_bids.fitting.subsample import resolve_train_voxels, stratified_subsample
from vaemap_bids.simulate.acquisitions import hcp_acquisition
from vaemap_bids.simulate.clusters import simulate_clusters


def test_subsample_is_deterministic_sized_and_unique():
    sim = simulate_clusters(hcp_acquisition(), 6000, snr=20.0, seed=0)
    a = stratified_subsample(sim.noisy, 1000, seed=3)
    b = stratified_subsample(sim.noisy, 1000, seed=3)
    c = stratified_subsample(sim.noisy, 1000, seed=4)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 1000 and len(np.unique(a)) == 1000 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(stratified_subsample(sim.noisy, 7000), np.arange(6000))


def test_subsample_keeps_a_rare_tissue_in_proportion():
    """200 CSF-like voxels among 9,800 WM-like ones: a 5 % sample must hold 10 +- 2 of them on
    every seed (simple random sampling gives 10 +- 6 at 95 %)."""
    rng = np.random.default_rng(0)
    b = np.repeat([0.0, 1.0, 2.0], 20)
    wm = np.exp(-b * rng.uniform(0.6, 0.9, (9800, 1))) + rng.normal(0, 0.05, (9800, b.size))
    csf = np.exp(-b * rng.uniform(2.5, 3.0, (200, 1))) + rng.normal(0, 0.05, (200, b.size))
    signals = np.vstack([wm, csf]).astype(np.float32)
    for seed in range(10):
        idx = stratified_subsample(signals, 500, seed=seed)
        assert 8 <= np.sum(idx >= 9800) <= 12, seed


@pytest.mark.parametrize("value,expected", [(None, 50), ("all", 50), (10, 10), (500, 50)])
def test_train_voxels_values(value, expected):
    assert resolve_train_voxels(value, 50) == expected


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True])
def test_bad_train_voxels_are_refused(value):
    with pytest.raises(ValueError, match="train_voxels"):
        resolve_train_voxels(value, 50)


def test_subsampled_training_infers_every_voxel_and_is_deterministic():
    from vaemap_bids.fitting import fit

    sim = simulate_clusters(hcp_acquisition(), 1500, snr=30.0, seed=2)
    opts = {"epochs": 3, "batch_size": 64, "warmup_epochs": 1, "ramp_epochs": 1,
            "n_posterior_samples": 4, "refine_steps": 1, "prior_em_iterations": 1,
            "train_voxels": 400}
    a = fit(sim.model, sim.noisy, "vaegmm", device="cpu", seed=1, options=opts, progress=False)
    b = fit(sim.model, sim.noisy, "vaegmm", device="cpu", seed=1, options=opts, progress=False)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.std, b.std)
    assert np.isfinite(a.params).all() and a.responsibilities.shape == (1500, 3)
    assert a.hyperparameters["n_train_voxels"] == 400
    assert a.hyperparameters["n_train"] + a.hyperparameters["n_validation"] == 400
    with pytest.raises(ValueError, match="train_voxels"):
        fit(sim.model, sim.noisy, "ssl", device="cpu", options={"train_voxels": 5})
