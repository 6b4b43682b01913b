"""With ``--denoise``, the fits' noise sigma comes from the series before denoising: the
denoised b0 repeats vary less than the noise that the Rician floor comes from."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.dataset.signals import raw_series_sigma
from vaemap_bids.interfaces.series import DenoiseSeries, PrepareSeries

SIGMA = 30.0


def _series(tmp_path, n_b0=6, n_dw=30, seed=0, shape=(18, 18, 12)):
    """A smooth ellipsoid (S0 800-1200) with Rician noise SIGMA, written as a BIDS series."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    mask = (grid ** 2).sum(0) < 0.6
    s0 = np.where(mask, 1000.0 + 200.0 * grid[0], 0.0)
    bvecs = rng.standard_normal((n_dw, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs = np.concatenate([np.zeros((n_b0, 3)), bvecs])
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_dw // 2, 1000.0),
                            np.full(n_dw - n_dw // 2, 2000.0)])
    adc = 0.8e-3 * (1 + 0.5 * bvecs[:, 0] ** 2)
    clean = s0[..., None] * np.exp(-bvals * adc)
    data = np.abs(clean + SIGMA * (rng.standard_normal(clean.shape)
                                   + 1j * rng.standard_normal(clean.shape)))
    paths = {k: tmp_path / f"dwi.{k}" for k in ("nii.gz", "bval", "bvec")}
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
             paths["nii.gz"])
    np.savetxt(paths["bval"], bvals[None], fmt="%g")
    np.savetxt(paths["bvec"], bvecs.T, fmt="%.6f")
    plan = tmp_path / "plan.npz"
    np.savez(plan, mask=mask, keep=np.ones(bvals.size, dtype=bool))
    return paths, plan


def _prepare(paths, plan, dwi, **extra):
    return PrepareSeries(dwi_file=str(dwi), bval_file=str(paths["bval"]),
                         bvec_file=str(paths["bvec"]), arrays_file=str(plan),
                         mask_source="test", **extra).run().outputs


@pytest.mark.parametrize("method", ["mppca", "patch2self"])
def test_denoised_series_keeps_the_raw_sigma(tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    paths, plan = _series(tmp_path)
    denoised = DenoiseSeries(dwi_file=str(paths["nii.gz"]), bval_file=str(paths["bval"]),
                             bvec_file=str(paths["bvec"]), arrays_file=str(plan),
                             method=method).run().outputs
    raw = _prepare(paths, plan, paths["nii.gz"]).mask_info["noise"]
    assert raw["method"] == "b0" and raw["value"] == pytest.approx(SIGMA, rel=0.1)
    # what the fits would take if the denoised b0s were measured: too little noise
    shrunk = _prepare(paths, plan, denoised.out_file).mask_info["noise"]
    assert shrunk["value"] is None or shrunk["value"] < 0.9 * raw["value"]
    kept = _prepare(paths, plan, denoised.out_file, raw_noise=denoised.raw_noise)
    noise = kept.mask_info["noise"]
    assert noise["before"] == "denoising" and noise["value"] == pytest.approx(raw["value"])
    with np.load(kept.signals_file) as arrays:
        s0 = arrays["s0"][arrays["valid"]]
        assert np.allclose(arrays["sigma"][arrays["valid"]], noise["value"] / s0, rtol=1e-5)


def test_single_b0_falls_back_on_the_mppca_map():
    rng = np.random.default_rng(1)
    b0 = 1000 + SIGMA * rng.standard_normal((500, 1))
    sigma, info = raw_series_sigma(b0, mppca_sigma=np.full(500, 29.0))
    assert (sigma, info["method"], info["before"]) == (29.0, "mppca", "denoising")
    sigma, info = raw_series_sigma(b0)            # patch2self: no map, no honest estimate
    assert sigma is None and info["method"] == "none" and "at least 2" in info["reason"]
