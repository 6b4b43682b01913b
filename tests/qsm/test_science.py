"""QSM science: the dipole kernel, the forward model, unwrapping, the field fit, background
removal, and the inversions on small phantoms (fast: small grids)."""
import numpy as np
import pytest

from vaemap_bids.qsm import field as F
from vaemap_bids.qsm import metrics as M
from vaemap_bids.qsm.dipole import (GAMMA, DipoleOperator, b0_direction_voxel, dipole_kernel,
                                    forward_field, sphere_field)
from vaemap_bids.qsm.inversion import reference, tkd, tv_admm


def _rot(axis, deg):
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    r = {0: [[1, 0, 0], [0, c, -s], [0, s, c]], 1: [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         2: [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    return np.array(r, float)


def _affine(r3=np.eye(3), zooms=(1.0, 1.0, 1.0)):
    aff = np.eye(4)
    aff[:3, :3] = r3 @ np.diag(zooms)
    return aff


def test_kernel_closed_form_at_known_k():
    shape = (8, 10, 12)
    zooms = (1.0, 2.0, 1.5)
    d = dipole_kernel(shape, _affine(zooms=zooms))
    assert d[0, 0, 0] == 0.0                          # the D(0) convention
    assert d[0, 0, 1] == pytest.approx(1 / 3 - 1)     # k along B0: -2/3
    assert d[1, 0, 0] == pytest.approx(1 / 3)         # k perpendicular to B0
    # k = (1/8, 1/20, 1/18) cycles/mm at index (1, 1, 1)
    k = np.array([1 / 8 / 1.0, 1 / 10 / 2.0, 1 / 12 / 1.5])
    assert d[1, 1, 1] == pytest.approx(1 / 3 - k[2] ** 2 / (k @ k))
    assert dipole_kernel(shape, _affine(), d0=1 / 3)[0, 0, 0] == pytest.approx(1 / 3)


def test_b0_in_voxel_axes_from_the_affine():
    # LAS / LPS flips do not change the kernel; a head rotated 90 deg about x has B0 along y
    flips = dipole_kernel((6, 6, 6), _affine(np.diag([-1.0, -1.0, 1.0])))
    np.testing.assert_allclose(flips, dipole_kernel((6, 6, 6), _affine()))
    assert np.allclose(np.abs(b0_direction_voxel(_affine(np.diag([-1.0, 1, 1])))), [0, 0, 1])
    rot = _affine(_rot(0, 90))
    assert np.allclose(np.abs(b0_direction_voxel(rot)), [0, 1, 0], atol=1e-12)
    assert dipole_kernel((6, 6, 6), rot)[0, 1, 0] == pytest.approx(-2 / 3)
    oblique = _affine(_rot(1, 20) @ _rot(0, 15), (1.0, 1.0, 2.0))
    b = b0_direction_voxel(oblique)
    assert np.linalg.norm(b) == pytest.approx(1.0) and abs(b[2]) < 0.99


@pytest.mark.parametrize("rotation", [np.eye(3), _rot(1, 25) @ _rot(0, 30)])
def test_sphere_forward_model_matches_the_analytic_field(rotation):
    n, radius = 48, 5.0
    aff = _affine(rotation)
    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    world = idx @ aff[:3, :3].T
    centre = aff[:3, :3] @ np.full(3, (n - 1) / 2)
    dist = np.linalg.norm(world - centre, axis=-1)
    # supersampled sphere: partial volume keeps the discretisation error small
    sub = np.zeros((n, n, n))
    offs = (np.arange(4) + 0.5) / 4 - 0.5
    for dx in offs:
        for dy in offs:
            for dz in offs:
                p = world + aff[:3, :3] @ np.array([dx, dy, dz])
                sub += np.linalg.norm(p - centre, axis=-1) <= radius
    chi = 0.2 * sub / 64
    fld = forward_field(chi, aff, pad=1.0)
    truth = sphere_field(world, centre, radius, 0.2)
    shell = (dist > 1.6 * radius) & (dist < 3 * radius)
    scale = np.abs(truth[shell]).mean()
    err = np.abs(fld - truth)[shell]
    assert err.mean() < 0.03 * scale and err.max() < 0.08 * np.abs(truth[shell]).max()
    # B0 in the voxel axes matters: the field of the un-rotated direction is far off
    wrong = sphere_field(world, centre, radius, 0.2, b0_world=rotation.T @ [0, 0, 1.0])
    if not np.allclose(rotation, np.eye(3)):
        assert np.abs(fld - wrong)[shell].mean() > 0.3 * scale
    inside = dist < 0.6 * radius
    # inside: 0 (Lorentz-corrected), up to the ringing of a voxelised edge (10 % of the
    # surface field 2 chi / 3)
    assert np.abs(fld[inside]).max() < 0.1 * 0.2 / 3 * 2


def _smooth_phase(shape, amp):
    u = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return amp * np.exp(-(u[0] ** 2 + 1.5 * u[1] ** 2 + u[2] ** 2) * 2.0) + 3.0 * u[0] * u[2]


def test_laplacian_unwrap_recovers_a_smooth_phase():
    shape = (32, 30, 28)
    true = _smooth_phase(shape, 18.0)
    u = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = (u[0] ** 2 + u[1] ** 2 + u[2] ** 2) < 0.8
    wrapped = F.wrap(true)
    assert np.abs(wrapped - true).max() > 6          # it does wrap
    out = F.laplacian_unwrap(wrapped, mask=mask)
    # exact up to a multiple of 2 pi (the constant is chosen to agree with the wrapped data)
    k = np.round(np.mean(out[mask] - true[mask]) / (2 * np.pi))
    np.testing.assert_allclose(out[mask] - 2 * np.pi * k, true[mask], atol=1e-4)
    assert not out[~mask].any()
    # the unmasked FFT solver: the corners (true jumps > pi outside the mask) add a smooth
    # (harmonic) error inside
    free = F.laplacian_unwrap(wrapped)
    diff = (free - true)[mask]
    assert np.std(diff) < 0.05


def test_phase_scaling_integer_and_radians():
    rad = F.wrap(np.linspace(-20, 20, 5000)).reshape(10, 10, 50)
    from vaemap_bids.qsm.phantom import phase_to_integer
    ints = phase_to_integer(rad)
    assert F.phase_scale(rad)[2] == "rad"
    scale, offset, units = F.phase_scale(ints)
    assert units == "integer" and scale == pytest.approx(2 * np.pi / 8192)
    back = F.to_radians(ints)
    assert np.abs(np.angle(np.exp(1j * (back - rad)))).max() < 2 * np.pi / 8192
    with pytest.raises(ValueError, match="NaN"):
        F.phase_scale(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="neither"):
        F.phase_scale(np.array([0.5, 10.7]))


def test_multi_echo_fit_recovers_the_field_in_ppm():
    shape = (24, 24, 20)
    u = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = (u[0] ** 2 + u[1] ** 2 + u[2] ** 2) < 0.8
    field_ppm = 0.5 * _smooth_phase(shape, 1.0)      # up to ~ 2 ppm: many wraps at late echoes
    te = np.array([0.004, 0.009, 0.014, 0.019])
    phi0 = 0.7 * u[1]
    omega = GAMMA * 3.0 * field_ppm * 1e-6
    rng = np.random.default_rng(1)
    sig = np.exp(1j * (phi0[..., None] + omega[..., None] * te))
    sig = sig + (rng.standard_normal(sig.shape) + 1j * rng.standard_normal(sig.shape)) * 0.01
    fld, sigma = F.multi_echo_field(np.abs(sig), np.angle(sig), te, 3.0, mask)
    err = (fld - field_ppm)[mask]
    # omega is only known modulo 2 pi / (TE2 - TE1): a uniform offset, harmonic, removed later
    step = 2 * np.pi / (te[1] - te[0]) / (GAMMA * 3.0) * 1e6
    err = err - step * np.round(np.median(err) / step)
    # the noise estimate is approximate (it ignores that every q_n shares the first echo)
    assert np.percentile(np.abs(err), 99) < 6 * np.median(sigma[mask])
    assert 0.5 < np.std(err) / np.median(sigma[mask]) < 2.5


@pytest.mark.parametrize("method", ["pdf", "vsharp"])
def test_background_removal_removes_an_external_source(method):
    n = 32
    aff = _affine(zooms=(2.0, 2.0, 2.0))
    u = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    mask = (u[0] ** 2 + u[1] ** 2 + u[2] ** 2) < 0.45
    outside = ((u[0] - 0.0) ** 2 + (u[1] - 0.85) ** 2 + (u[2] + 0.3) ** 2) < 0.02
    inside = ((u[0] - 0.2) ** 2 + u[1] ** 2 + u[2] ** 2) < 0.03
    bg = forward_field(np.where(outside, 9.4, 0.0), aff, pad=1.0)
    loc = forward_field(np.where(inside, 0.1, 0.0), aff, pad=1.0)
    assert np.abs(bg[mask]).std() > 20 * np.abs(loc[mask]).std() / 10
    if method == "pdf":
        out, final = F.pdf(bg + loc, mask, aff, max_iter=40)
    else:
        out, final = F.vsharp(bg + loc, mask, (2.0, 2.0, 2.0), radii_mm=(8, 6, 4))
    ref, _ = (F.pdf(loc, mask, aff, max_iter=40) if method == "pdf"
              else F.vsharp(loc, mask, (2.0, 2.0, 2.0), radii_mm=(8, 6, 4)))
    bg_left = out - ref       # what is left of the background
    assert np.std(bg_left[final]) < 0.05 * np.std(bg[final])
    assert np.corrcoef(out[final], loc[final])[0, 1] > 0.9


def _small_phantom(n=24):
    u = np.meshgrid(*[np.linspace(-1, 1, n)] * 3, indexing="ij")
    mask = (u[0] ** 2 + u[1] ** 2 + u[2] ** 2) < 0.7
    chi = np.zeros((n,) * 3)
    for c, r, v in (((0.3, 0.1, 0.0), 0.22, 0.15), ((-0.3, -0.1, 0.1), 0.2, -0.1),
                    ((0.0, 0.35, -0.3), 0.15, 0.2)):
        chi[sum((u[i] - c[i]) ** 2 for i in range(3)) < r ** 2] = v
    chi = np.where(mask, chi, 0.0)
    aff = _affine(zooms=(2.0, 2.0, 2.0))
    fld = np.where(mask, forward_field(chi, aff), 0.0)
    rng = np.random.default_rng(0)
    noisy = np.where(mask, fld + 0.002 * rng.standard_normal(fld.shape), 0.0)
    return chi, noisy, mask, aff


def test_tkd_and_tv_recover_a_small_phantom():
    chi, fld, mask, aff = _small_phantom()
    truth = reference(chi, mask)
    c_tkd = tkd(fld, mask, aff)
    c_tv = tv_admm(fld, mask, aff, lam=3e-4, max_iter=100)
    e_tkd, e_tv = M.nrmse(c_tkd, truth, mask), M.nrmse(c_tv, truth, mask)
    assert e_tkd < 0.6
    assert e_tv < 0.45 and e_tv < e_tkd
    assert 0.8 < M.slope(c_tv, truth, mask) < 1.1
    assert abs(c_tv[mask].mean()) < 1e-6 and not c_tv[~mask].any()


def test_dip_recovers_a_small_phantom_and_is_deterministic():
    import torch
    from vaemap_bids.qsm.dip import dip_invert
    torch.set_num_threads(1)
    chi, fld, mask, aff = _small_phantom(16)
    truth = reference(chi, mask)
    kw = dict(eval_every=10, patience=50, width=4, margin=0, lr=3e-3)
    c1, rec = dip_invert(fld, mask, aff, seed=3, max_iter=80, **kw)
    a, _ = dip_invert(fld, mask, aff, seed=3, max_iter=10, **kw)
    b, _ = dip_invert(fld, mask, aff, seed=3, max_iter=10, **kw)
    np.testing.assert_array_equal(a, b)
    assert rec["curve"]["train_loss"][-1] < 0.5 * rec["curve"]["train_loss"][0]
    assert M.nrmse(c1, truth, mask) < 0.8
    assert not c1[~mask].any()


def test_metrics_on_known_cases():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((12, 12, 12))
    m = np.ones(t.shape, bool)
    assert M.nrmse(t, t, m) == 0 and M.rmse(t + 1, t, m) == pytest.approx(1.0)
    assert M.slope(2 * t + 3, t, m) == pytest.approx(2.0)
    assert M.ssim(t, t, m) == pytest.approx(1.0)
    assert M.hfen(t, t, m) == 0 and M.hfen(2 * t, t, m) == pytest.approx(1.0)
