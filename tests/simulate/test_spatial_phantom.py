"""The spatially structured phantom: exact and reproducible truth, partial volume, region map."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.physics import Acquisition, make_model
from vaemap_bids.simulate.phantom import TISSUE_LABELS, TISSUE_PARAMETERS
from vaemap_bids.simulate.spatial import REGION_LABELS, simulate_spatial, write_spatial_dataset

SHAPE = (16, 18, 14)


@pytest.mark.parametrize("model", ["msdki", "ballstick"])
@pytest.mark.parametrize("layout", ["brain", "slab"])
def test_truth_made_the_signal(model, layout):
    ph = simulate_spatial(model, SHAPE, layout=layout, seed=3, snr=np.inf)
    fm = make_model(model, ph.acquisition)
    params = ph.params()
    assert not fm.invalid_mask(params).any()
    expected = ph.s0[ph.mask, None] * fm.forward_numpy(params, ph.acquisition.bvals,
                                                       ph.acquisition.bvecs)
    np.testing.assert_allclose(ph.clean[ph.mask], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ph.signal, ph.clean)  # snr = inf: no noise
    assert np.all(ph.clean[~ph.mask] == 0)
    for label, value in ph.truth.items():
        assert np.all(value[~ph.mask] == 0), label
    if model == "msdki":
        b_max = ph.acquisition.bvals.max()
        assert np.all(b_max * ph.truth["msd"] * ph.truth["msk"] < 3.0)
    else:
        np.testing.assert_allclose(np.linalg.norm(ph.truth["dir"][ph.mask], axis=1), 1.0,
                                   atol=1e-12)


def test_reproducible_and_streams_separate():
    a = simulate_spatial("msdki", SHAPE, seed=5)
    b = simulate_spatial("msdki", SHAPE, seed=5)
    for name in ("signal", "clean", "s0", "probs", "labels", "region"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for label in a.truth:
        np.testing.assert_array_equal(a.truth[label], b.truth[label])
    c = simulate_spatial("msdki", SHAPE, seed=6)
    assert not np.array_equal(a.labels, c.labels)
    # the SNR only scales the same noise draw; the truth does not move
    d = simulate_spatial("msdki", SHAPE, seed=5, snr=40.0)
    np.testing.assert_array_equal(a.truth["msd"], d.truth["msd"])
    assert not np.array_equal(a.signal, d.signal)
    # the texture knob leaves the layout and the S0 field as they are
    e = simulate_spatial("msdki", SHAPE, seed=5, texture=0.0)
    np.testing.assert_array_equal(a.labels, e.labels)
    np.testing.assert_array_equal(a.s0, e.s0)


def test_noise_is_rician_with_sigma_one_over_snr():
    ph = simulate_spatial("msdki", SHAPE, seed=1, snr=10.0)
    bg = ph.signal[~ph.mask]  # pure noise: Rayleigh of scale sigma, E[m^2] = 2 sigma^2
    assert np.sqrt(np.mean(bg ** 2) / 2) == pytest.approx(0.1, rel=0.03)
    assert np.all(ph.signal >= 0)


def test_anatomy_partial_volume_and_regions():
    ph = simulate_spatial("msdki", (24, 26, 20), seed=2)
    counts = {t: int((ph.labels == v).sum()) for t, v in TISSUE_LABELS.items()}
    assert all(n > 200 for n in counts.values()), counts
    np.testing.assert_allclose(ph.probs.sum(axis=0)[ph.mask], 1.0, atol=1e-12)
    pv = ph.mask & (ph.probs.max(axis=0) < 0.99)
    assert 0 < pv.sum() < ph.mask.sum() / 2          # boundaries are sharp: PV voxels only there
    assert np.all(ph.region[pv] == REGION_LABELS["edge"])
    assert set(np.unique(ph.region[ph.mask])) == {1, 2}
    assert np.all(ph.region[~ph.mask] == 0)
    # interior voxels of one tissue have that tissue's parameter scale
    for tissue, value in TISSUE_PARAMETERS["msdki"].items():
        inner = (ph.labels == TISSUE_LABELS[tissue]) & (ph.region == REGION_LABELS["interior"])
        if inner.sum() > 20:
            assert np.median(ph.truth["msd"][inner]) == pytest.approx(value["msd"], rel=0.1)


def test_slab_is_piecewise_constant_with_one_boundary():
    ph = simulate_spatial("ballstick", SHAPE, layout="slab", seed=0, field=0.0, texture=0.0)
    wm, gm = ph.labels == TISSUE_LABELS["WM"], ph.labels == TISSUE_LABELS["GM"]
    pure = ph.probs.max(axis=0) > 0.999
    for tissue, sel in (("WM", wm & pure), ("GM", gm & pure)):
        np.testing.assert_allclose(ph.truth["stickfrac"][sel],
                                   TISSUE_PARAMETERS["ballstick"][tissue]["stickfrac"])
    # the edge is the boundary plane's two layers plus the box surface
    inside = ph.mask & ~(ph.region == REGION_LABELS["edge"])
    x = np.argwhere(ph.mask & (ph.region == REGION_LABELS["edge"]))
    split = SHAPE[0] // 2
    on_plane = (x[:, 0] == split - 1) | (x[:, 0] == split)
    on_surface = np.any((x == 1) | (x == np.array(SHAPE) - 2), axis=1)
    assert np.all(on_plane | on_surface)
    assert inside.sum() > 0


def test_controls_and_errors():
    flat = simulate_spatial("msdki", SHAPE, seed=0, field=0.0, texture=0.0)
    sel = (flat.labels == TISSUE_LABELS["WM"]) & (flat.probs.max(axis=0) > 0.999)
    assert np.ptp(flat.truth["msd"][sel]) < 1e-12
    rough = simulate_spatial("msdki", SHAPE, seed=0, field=0.0, texture=0.2)
    assert np.std(rough.truth["msd"][sel]) / 0.85 == pytest.approx(0.2, rel=0.25)
    mni = simulate_spatial("msdki", SHAPE, layout="mni", seed=0)   # the other anatomy
    assert all((mni.labels == v).sum() > 20 for v in TISSUE_LABELS.values())
    zooms = np.sqrt((mni.affine[:3, :3] ** 2).sum(axis=0))
    assert np.ptp(zooms) < 1e-9 and zooms[0] > 1.0   # one isotropic coarse voxel
    with pytest.raises(ValueError, match="layout"):
        simulate_spatial("msdki", SHAPE, layout="torus")
    with pytest.raises(ValueError, match="texture"):
        simulate_spatial("msdki", SHAPE, texture=-0.1)
    with pytest.raises(ValueError, match="model"):
        simulate_spatial("ivim", SHAPE)


def test_bids_dataset_round_trip(tmp_path):
    out = write_spatial_dataset(tmp_path / "bids", tmp_path / "truth", model="msdki",
                                shape=SHAPE, snr=30.0, seed=4, dtype="float32", s0_scale=100.0)
    series = out["series"][0]
    img = nib.load(series["dwi"])
    data = np.asarray(img.dataobj)
    bvals = np.loadtxt(series["bval"])
    bvecs = np.loadtxt(series["bvec"])
    acq = Acquisition.from_smm2(bvals, bvecs)
    mask = np.asarray(nib.load(series["mask"]).dataobj).astype(bool)
    truth = {p: np.asarray(nib.load(f).dataobj) for p, f in series["truth"].items()}
    region = np.asarray(nib.load(series["region"]).dataobj)
    s0 = np.asarray(nib.load(series["s0"]).dataobj)
    record = json.loads(out["truth_json"].read_text())
    # the written files are what the simulation made (float32 storage)
    ph = simulate_spatial("msdki", SHAPE, snr=30.0, seed=record["series"][0]["seed"])
    np.testing.assert_array_equal(mask, ph.mask)
    np.testing.assert_array_equal(region, ph.region)
    np.testing.assert_allclose(data, (ph.signal * 100.0).astype(np.float32))
    np.testing.assert_allclose(truth["msd"], ph.truth["msd"].astype(np.float32))
    np.testing.assert_allclose(s0, (ph.s0 * 100.0).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(acq.bvals, ph.acquisition.bvals, atol=1e-4)
    assert (tmp_path / "bids" / "dataset_description.json").exists()
    assert (tmp_path / "bids" / "participants.tsv").exists()
