"""Denoising a DWI series before the fits (``--denoise``): thin wrappers over dipy.

- ``mppca``: Marchenko-Pastur PCA (Veraart et al. 2016; :func:`dipy.denoise.localpca.mppca`)
  over local patches of radius ``patch_radius`` inside the brain mask. It also returns the noise
  standard deviation it estimated in every voxel (``return_sigma``), which a noise model can use.
- ``patch2self``: self-supervised regression of every volume from the others (Fadnavis et al.
  2020/2024; :func:`dipy.denoise.patch2self.patch2self`, QSIPrep's default denoiser), with
  ordinary least squares. Negative outputs are clipped to 0 (a magnitude is never negative) and
  the per-volume intensity shift is off (it adds a constant to every voxel of a volume, a bias
  that b0 normalisation would carry into the maps).

Voxels outside the mask keep their input values (a fit never reads them). Every function takes
a 4-D array ``(X, Y, Z, T)``, the b-values in s/mm^2 (as in the ``.bval`` file) and a 3-D mask,
and returns float32.
"""
from __future__ import annotations

import numpy as np

DENOISERS = ("none", "mppca", "patch2self")
#: Descriptions for sidecars, dataset_description.json and the report.
DESCRIPTIONS = {
    "none": "No denoising: the fits read the input series.",
    "mppca": "Marchenko-Pastur PCA denoising (Veraart et al. 2016, dipy.denoise.localpca.mppca, "
             "the smallest patch radius >= 2 with more voxels than volumes, inside the brain mask) "
             "before every fit.",
    "patch2self": "Patch2Self denoising (Fadnavis et al. 2020, dipy.denoise.patch2self, version "
                  "3, ordinary least squares, negative values clipped to 0) before every fit.",
}


def check_denoiser(method: str) -> str:
    if method not in DENOISERS:
        raise ValueError(f"unknown denoiser {method!r}; choose from {list(DENOISERS)}")
    return method


def _check(data, mask):
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"the series to denoise must be 4-D, got shape {data.shape}")
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != data.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} does not match the series {data.shape[:3]}")
    if not mask.any():
        raise ValueError("the mask holds no voxel to denoise")
    if not np.all(np.isfinite(data[mask])):
        raise ValueError("the series has non-finite values inside the mask")
    return data.astype(np.float32, copy=False), mask


def mppca_patch_radius(n_volumes: int) -> int:
    """The smallest patch radius >= 2 whose patch has more voxels than there are volumes (MP-PCA
    needs more samples than dimensions: radius 2 up to 124 volumes, 3 up to 342)."""
    radius = 2
    while (2 * radius + 1) ** 3 <= n_volumes:
        radius += 1
    return radius


def denoise_mppca(data, mask, *, patch_radius: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MP-PCA: ``(denoised, sigma)``, both float32; ``sigma`` (X, Y, Z) is the noise sd that
    MP-PCA estimated in each voxel (0 outside the mask). ``patch_radius`` defaults to
    :func:`mppca_patch_radius`."""
    from dipy.denoise.localpca import mppca

    data, mask = _check(data, mask)
    if patch_radius is None:
        patch_radius = mppca_patch_radius(data.shape[3])
    n = 2 * int(patch_radius) + 1
    if n ** 3 <= data.shape[3]:
        raise ValueError(f"MP-PCA needs patches with more voxels ({n}^3) than volumes "
                         f"({data.shape[3]}); raise patch_radius")
    denoised, sigma = mppca(data, mask=mask, patch_radius=int(patch_radius), return_sigma=True,
                            out_dtype=np.float32, suppress_warning=True)
    out = np.where(mask[..., None], denoised, data).astype(np.float32)
    return out, np.where(mask, sigma, 0.0).astype(np.float32)


def denoise_patch2self(data, bvals_smm2, mask) -> np.ndarray:
    """Patch2Self (OLS, version 3), float32."""
    from dipy.denoise.patch2self import patch2self

    data, mask = _check(data, mask)
    bvals = np.asarray(bvals_smm2, dtype=np.float64).reshape(-1)
    if bvals.size != data.shape[3]:
        raise ValueError(f"{bvals.size} b-values for {data.shape[3]} volumes")
    denoised = patch2self(data, bvals, model="ols", out_dtype=np.float32, verbose=False,
                          clip_negative_vals=True, shift_intensity=False, version=3)
    return np.where(mask[..., None], denoised, data).astype(np.float32)


def denoise(data, bvals_smm2, mask, method: str) -> tuple[np.ndarray, dict]:
    """Denoise with ``method`` (one of :data:`DENOISERS`): ``(series, extra)``; ``extra`` holds
    ``sigma`` (the MP-PCA noise map) for ``mppca``, nothing otherwise. ``none`` returns the
    input (float32)."""
    check_denoiser(method)
    if method == "none":
        data, _ = _check(data, mask)
        return data, {}
    if method == "mppca":
        out, sigma = denoise_mppca(data, mask)
        return out, {"sigma": sigma}
    return denoise_patch2self(data, bvals_smm2, mask), {}


__all__ = ["DENOISERS", "DESCRIPTIONS", "check_denoiser", "denoise", "denoise_mppca",
           "denoise_patch2self"]
