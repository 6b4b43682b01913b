"""svae, the spatial VAE: neighbourhoods, truth recovery, a sharp boundary, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from vaemap_bids.fitting import fit
from vaemap_bids.fitting.options import check_options
from vaemap_bids.fitting.spatial import neighbour_index, neighbour_offsets
from vaemap_bids.physics import make_model, normalise_by_b0
from vaemap_bids.simulate.phantom import TISSUE_LABELS, TISSUE_PARAMETERS
from vaemap_bids.simulate.spatial import REGION_LABELS, simulate_spatial

#: Short schedules: the tests check behaviour, the benchmark measures the packaged defaults.
FAST = {"epochs": 30, "warmup_epochs": 6, "ramp_epochs": 8, "refine_steps": 100,
        "n_posterior_samples": 8}


def _fit(ph, method, seed=0, options=None):
    model = make_model(ph.model, ph.acquisition)
    y, s0, valid = normalise_by_b0(ph.signal[ph.mask], ph.acquisition)
    res = fit(model, y, method, device="cpu", seed=seed, progress=False,
              options=options if method != "lsq" else None, voxel_coords=ph.voxel_coords(),
              s0=s0)
    return res


def _rmse(est, truth, sel):
    return float(np.sqrt(np.mean((est[sel] - truth[sel]) ** 2)))


def test_neighbour_index_stays_inside_the_mask():
    mask = np.zeros((5, 5, 5), dtype=bool)
    mask[1:4, 1:4, 1:4] = True
    mask[2, 2, 2] = False                      # an excluded voxel is nobody's neighbour
    coords = np.argwhere(mask)
    nbr = neighbour_index(coords, 26)
    assert nbr.shape == (len(coords), 26) and len(neighbour_offsets(6)) == 6
    for i, c in enumerate(coords):
        for j in nbr[i][nbr[i] >= 0]:
            assert np.abs(coords[j] - c).max() == 1
        # every in-mask voxel at Chebyshev distance 1 is listed, nothing else
        expected = {tuple(x) for x in coords if np.abs(x - c).max() == 1}
        assert {tuple(coords[j]) for j in nbr[i] if j >= 0} == expected
    with pytest.raises(ValueError, match="twice"):
        neighbour_index(np.vstack([coords, coords[:1]]))
    with pytest.raises(ValueError, match="integer"):
        neighbour_index(coords.astype(float))


def test_options_are_checked_and_coordinates_needed():
    check_options("svae", "msdki", {"connectivity": 6})
    with pytest.raises(ValueError, match="connectivity"):
        check_options("svae", "msdki", {"connectivity": 8})
    with pytest.raises(ValueError, match="sigma"):
        check_options("svae", "msdki", {"sigma": -1.0})
    ph = simulate_spatial("msdki", (8, 8, 8), layout="slab", snr=50.0, seed=0)
    model = make_model("msdki", ph.acquisition)
    y, _, _ = normalise_by_b0(ph.signal[ph.mask], ph.acquisition)
    with pytest.raises(ValueError, match="voxel_coords"):
        fit(model, y, "svae", device="cpu", progress=False)


@pytest.fixture(scope="module")
def brain():
    """A small high-SNR structured phantom and its lsq and svae fits."""
    ph = simulate_spatial("msdki", (12, 14, 10), snr=50.0, seed=1)
    return ph, _fit(ph, "lsq"), _fit(ph, "svae", options=FAST)


def test_recovers_the_truth_at_high_snr(brain):
    ph, lsq, svae = brain
    truth = ph.params()
    labels = ph.labels[ph.mask]
    assert svae.method == "svae" and svae.std is not None
    assert svae.responsibilities.shape == (ph.mask.sum(), 3)
    assert np.allclose(svae.responsibilities.sum(axis=1), 1.0, atol=1e-5)
    for tissue in ("WM", "GM"):
        sel = labels == TISSUE_LABELS[tissue]
        err = _rmse(svae.params[:, 0], truth[:, 0], sel)
        assert err < 0.06, (tissue, err)
        assert err <= 1.05 * _rmse(lsq.params[:, 0], truth[:, 0], sel), tissue
        assert np.corrcoef(svae.params[sel, 0], truth[sel, 0])[0, 1] > 0.7
    # the learnt noise sd is the simulated one (1/SNR in the units of the signal given)
    assert svae.hyperparameters["sigma_used"] == pytest.approx(1 / 50.0, rel=0.15)


def test_keeps_a_sharp_boundary():
    """Piecewise-constant WM | GM slab: the edge error of svae against lsq's, and the two
    layers next to the boundary keep their own tissue's value."""
    ph = simulate_spatial("msdki", (12, 10, 8), layout="slab", snr=20.0, seed=2,
                          field=0.0, texture=0.0)
    lsq, svae = _fit(ph, "lsq"), _fit(ph, "svae", options=FAST)
    truth = ph.params()
    region = ph.region[ph.mask]
    coords = ph.voxel_coords()
    split = ph.mask.shape[0] // 2
    plane = np.isin(coords[:, 0], (split - 1, split)) & (region == REGION_LABELS["edge"])
    # the box surface is an edge too; the boundary plane's layers are what could be smeared
    err_svae = _rmse(svae.params[:, 0], truth[:, 0], plane)
    err_lsq = _rmse(lsq.params[:, 0], truth[:, 0], plane)
    assert err_svae <= err_lsq, (err_svae, err_lsq)
    wm, gm = TISSUE_PARAMETERS["msdki"]["WM"]["msd"], TISSUE_PARAMETERS["msdki"]["GM"]["msd"]
    below = coords[:, 0] == split - 1
    above = coords[:, 0] == split
    step = np.median(svae.params[above, 0]) - np.median(svae.params[below, 0])
    assert step == pytest.approx(gm - wm, abs=0.25 * (gm - wm))   # not blurred to half
    interior = region == REGION_LABELS["interior"]
    assert _rmse(svae.params[:, 0], truth[:, 0], interior) < _rmse(lsq.params[:, 0], truth[:, 0],
                                                                    interior)


def test_deterministic():
    ph = simulate_spatial("ballstick", (8, 9, 8), snr=30.0, seed=3)
    quick = {**FAST, "epochs": 12, "refine_steps": 15, "n_posterior_samples": 4}
    a, b = _fit(ph, "svae", seed=4, options=quick), _fit(ph, "svae", seed=4, options=quick)
    np.testing.assert_array_equal(a.params, b.params)
    np.testing.assert_array_equal(a.std, b.std)
    np.testing.assert_array_equal(a.responsibilities, b.responsibilities)
    dirs = a.params[:, 3:6]
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, atol=1e-5)


def test_fit_node_passes_the_rows_voxels(tmp_path):
    """FitModel reads voxel_coords and s0 from the signals file for svae (fit() without them
    raises)."""
    import json

    from vaemap_bids.interfaces.fitting import FitModel

    ph = simulate_spatial("msdki", (8, 9, 8), snr=30.0, seed=5)
    y, s0, valid = normalise_by_b0(ph.signal[ph.mask], ph.acquisition)
    signals = tmp_path / "signals.npz"
    np.savez(signals, signals=y, s0=s0, valid=valid, bvals=ph.acquisition.bvals,
             bvecs=ph.acquisition.bvecs, denoise=np.array("none"),
             voxel_coords=ph.voxel_coords().astype(np.int32))
    opts = {**FAST, "epochs": 8, "refine_steps": 10, "n_posterior_samples": 2}
    node = FitModel(signals_file=str(signals), model="msdki", method="svae",
                    options=json.dumps(opts), device="cpu")
    res = node.run(cwd=str(tmp_path))
    with np.load(res.outputs.fit_file) as fit_out:
        assert fit_out["params"].shape == (ph.mask.sum(), 2)
        assert fit_out["responsibilities"].shape[1] == 3 and "std" in fit_out.files
    record = json.loads(open(res.outputs.record_file).read())
    assert record["method"] == "svae" and record["hyperparameters"]["n_neighbours"] == 26
