"""Forward models against independent references; bounds, gradients, acquisitions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vaemap_bids.physics import Acquisition, available_models, make_model, normalise_by_b0


def test_registry_lists_both_models():
    assert {"msdki", "ballstick"} <= set(available_models())
    with pytest.raises(ValueError, match="unknown signal model"):
        make_model("nosuchmodel", Acquisition([0, 1], [[0, 0, 0], [1, 0, 0]]))


def test_hcp_shells(hcp_acq):
    table = hcp_acq.shell_table()
    assert [r["bval_smm2"] for r in table] == [0, 1000, 2000, 3000]
    assert [r["n_volumes"] for r in table] == [18, 90, 90, 90]
    assert [r["n_directions"] for r in table] == [0, 90, 90, 90]


def test_shells_group_jittered_bvals():
    rng = np.random.default_rng(0)
    bvals = np.r_[[5, 0, 0], 995 + 10 * rng.random(30), 2990 + 20 * rng.random(30)]
    dirs = rng.normal(size=(63, 3))
    acq = Acquisition.from_smm2(bvals, dirs / np.linalg.norm(dirs, axis=1, keepdims=True))
    assert acq.nonzero_shells.size == 2
    assert acq.b0_mask.sum() == 3


def test_msdki_forward_evaluates_distinct_bvals_once_exactly():
    # interleaved, jittered and repeated b-values: the torch forward (each distinct b once, then
    # copied to its volumes) equals the closed form at every volume's own b
    rng = np.random.default_rng(3)
    bvals = np.r_[0, 1000, 5, 2000, 1000, 0, 995 + 10 * rng.random(12), 2000, 1990 + 20 * rng.random(9)]
    dirs = rng.normal(size=(bvals.size, 3))
    acq = Acquisition.from_smm2(bvals, dirs / np.linalg.norm(dirs, axis=1, keepdims=True))
    model = make_model("msdki", acq)
    params = np.stack([rng.uniform(0.2, 3.0, 50), rng.uniform(0.0, 0.5, 50)], axis=1)
    got = model.forward(torch.as_tensor(params, dtype=torch.float64)).numpy()
    b = acq.bvals[None, :]
    want = np.exp(-b * params[:, :1] + (b * params[:, :1]) ** 2 * params[:, 1:] / 6.0)
    assert got.shape == (50, bvals.size)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got, model.forward_numpy(params), rtol=1e-12)


def test_msdki_matches_dipy(hcp_acq, rng):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.msdki import msdki_prediction

    model = make_model("msdki", hcp_acq)
    d = rng.uniform(0.2, 3.0, 200)
    k = rng.uniform(0, 1, 200) * np.minimum(3.0, 3.0 / (2.0 * d))
    params = np.stack([d, k], axis=1)
    acq = model.acquisition
    gtab = gradient_table(acq.bvals * 1e3, bvecs=acq.bvecs, b0_threshold=50)
    # dipy works in mm^2/s with b in s/mm^2.
    expected = msdki_prediction(np.stack([d * 1e-3, k], axis=1), gtab)
    ours_np = model.forward_numpy(params)
    ours_t = model.forward(torch.as_tensor(params, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours_np, expected, rtol=1e-10)
    np.testing.assert_allclose(ours_t, expected, rtol=1e-10)


def test_msdki_uses_shells_up_to_2500(hcp_acq):
    model = make_model("msdki", hcp_acq)
    assert model.n_measurements == 18 + 90 + 90
    assert model.acquisition.bvals.max() == pytest.approx(2.0)


def test_msdki_needs_two_shells():
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(31, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    acq = Acquisition.from_smm2(np.r_[0, np.full(30, 1000)], dirs)
    with pytest.raises(ValueError, match="at least two non-zero shells"):
        make_model("msdki", acq)


def _ballstick_closed_form(f, dpar, diso, n, bvals, bvecs):
    """Written out per volume, independently of the vectorised implementation."""
    out = np.empty((len(f), len(bvals)))
    for v in range(len(f)):
        nv = n[v] / np.linalg.norm(n[v])
        for i, (b, g) in enumerate(zip(bvals, bvecs)):
            c = float(np.dot(g, nv))
            out[v, i] = f[v] * np.exp(-b * dpar[v] * c * c) + (1 - f[v]) * np.exp(-b * diso[v])
    return out


def test_ballstick_matches_closed_form(hcp_acq, rng):
    model = make_model("ballstick", hcp_acq)
    n = 20
    f, dpar, diso = rng.uniform(0, 1, n), rng.uniform(0.5, 3, n), rng.uniform(0.2, 3, n)
    dirs = rng.normal(size=(n, 3)) * rng.uniform(0.5, 2, (n, 1))  # unnormalised on purpose
    params = np.column_stack([f, dpar, diso, dirs])
    expected = _ballstick_closed_form(f, dpar, diso, dirs, hcp_acq.bvals, hcp_acq.bvecs)
    np.testing.assert_allclose(model.forward_numpy(params), expected, rtol=1e-10)
    got = model.forward(torch.as_tensor(params, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # antipodal symmetry
    flipped = params.copy()
    flipped[:, 3:] *= -1
    np.testing.assert_allclose(model.forward_numpy(flipped), expected, rtol=1e-10)


def test_ballstick_matches_dmipy(hcp_acq, rng):
    pytest.importorskip("dmipy")
    from dmipy.core.acquisition_scheme import acquisition_scheme_from_bvalues
    from dmipy.core.modeling_framework import MultiCompartmentModel
    from dmipy.signal_models import cylinder_models, gaussian_models

    scheme = acquisition_scheme_from_bvalues(hcp_acq.bvals * 1e9, hcp_acq.bvecs)
    mcm = MultiCompartmentModel(models=[gaussian_models.G1Ball(), cylinder_models.C1Stick()])
    n = 10
    f, dpar, diso = rng.uniform(0.1, 0.9, n), rng.uniform(0.5, 3, n), rng.uniform(0.2, 3, n)
    theta, phi = rng.uniform(0, np.pi, n), rng.uniform(-np.pi, np.pi, n)
    dirs = np.column_stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
    pars = mcm.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=diso * 1e-9, C1Stick_1_lambda_par=dpar * 1e-9,
        C1Stick_1_mu=np.column_stack([theta, phi]), partial_volume_0=1 - f, partial_volume_1=f)
    expected = mcm.simulate_signal(scheme, pars)
    ours = make_model("ballstick", hcp_acq).forward_numpy(np.column_stack([f, dpar, diso, dirs]))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["msdki", "ballstick"])
def test_squash_respects_bounds_and_gradients(hcp_acq, name):
    model = make_model(name, hcp_acq)
    raw = (torch.randn(500, model.n_raw, dtype=torch.float64) * 30).requires_grad_()
    params = model.squash(raw)
    lo, hi = model.bounds()
    p = params.detach().numpy()
    assert np.all(p >= lo) and np.all(p <= hi)
    assert not model.invalid_mask(p).any()
    loss = model.forward(params).sum()
    loss.backward()
    assert torch.isfinite(raw.grad).all()
    # unsquash inverts squash away from saturation
    raw2 = torch.randn(50, model.n_raw, dtype=torch.float64)
    p2 = model.squash(raw2).numpy()
    np.testing.assert_allclose(model.squash(torch.as_tensor(model.unsquash(p2))).numpy(), p2,
                               rtol=1e-6, atol=1e-8)


def test_msdki_fits_stay_physical(hcp_acq):
    model = make_model("msdki", hcp_acq)
    raw = torch.randn(2000, 2, dtype=torch.float64) * 5
    p = model.squash(raw).numpy()
    assert np.all(model.acquisition.bvals.max() * p[:, 0] * p[:, 1] < 3.0)
    sig = model.forward_numpy(p)
    assert np.all(np.diff(sig[:, np.argsort(model.acquisition.bvals)], axis=1) <= 1e-12)


def test_acquisition_rejects_bad_tables():
    with pytest.raises(ValueError, match="3 b-values but 2"):
        Acquisition([0, 1, 2], [[0, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="zero gradient direction"):
        Acquisition([0, 1], [[0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="unit vectors"):
        Acquisition([0, 1], [[0, 0, 0], [2, 0, 0]])


def test_normalise_masks_bad_voxels(hcp_acq):
    data = np.ones((4, hcp_acq.n_volumes))
    data[1, 5] = np.nan
    data[2, hcp_acq.b0_mask] = 0
    out, s0, valid = normalise_by_b0(data * 7, hcp_acq)
    assert valid.tolist() == [True, False, False, True]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], 1.0)
    with pytest.raises(ValueError, match="volumes but the acquisition has"):
        normalise_by_b0(data[:, :10], hcp_acq)
