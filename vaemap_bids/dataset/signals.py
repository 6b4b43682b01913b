"""From a DWI image to the brain's b0-normalised signal rows (``PrepareSeries``), and the fit
quality of estimates against them.

Plain functions on arrays and files; the Nipype interfaces only call them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import Acquisition, normalise_by_b0
from .image import ImageInfo, open_image
from .noise import normalised_sigma, pooled_repeat_sigma


@dataclass
class PreparedSeries:
    """The brain mask and its voxels' signals, one row each (C order of the mask)."""

    info: ImageInfo
    mask: np.ndarray           # 3-D bool: the brain mask used (given, or median_otsu)
    mask_source: str
    signals: np.ndarray        # (N, T) float32 S/S0; NaN rows where ``valid`` is False
    s0: np.ndarray             # (N,) float32 mean b0 (raw image units)
    valid: np.ndarray          # (N,) bool: finite, plausible input and a positive mean b0
    excluded: dict             # {"nonfinite": n, "implausible": n, "nonpositive_b0": n}
    acquisition: Acquisition   # the volumes kept (the signals' columns)
    sigma: float | None = None  # noise sigma in image units (None: no honest series estimate)
    noise: dict | None = None   # how sigma was estimated (dataset.noise.estimate_series_sigma)

    @property
    def normalised_sigma(self) -> np.ndarray | None:
        """sigma / S0 per row: the noise of the b0-normalised signals (NaN where S0 <= 0)."""
        return None if self.sigma is None else normalised_sigma(self.sigma, self.s0)

    @property
    def valid_volume(self) -> np.ndarray:
        """The validity mask on the grid: brain voxels whose rows are fitted."""
        out = np.zeros(self.mask.shape, dtype=bool)
        out[self.mask] = self.valid
        return out


#: A voxel whose signal exceeds its mean b0 by this factor in any volume, or whose values exceed
#: this magnitude, holds no diffusion signal (corrupt values such as 1e30): it is excluded.
MAX_SIGNAL_RATIO = 50.0
MAX_MAGNITUDE = 1e15


def prepare_series(dwi, acq: Acquisition, mask: np.ndarray, keep: np.ndarray | None = None,
                   mask_source: str = "", n_coils: int = 1,
                   noise: dict | None = None) -> PreparedSeries:
    """The mask's voxels of the kept volumes (all by default), read in one pass over the image
    (one open) and divided by their mean b0.

    Voxels with a non-finite or implausible value (beyond MAX_MAGNITUDE, or MAX_SIGNAL_RATIO
    times their mean b0), or whose mean b0 is not positive, stay as NaN rows (row i is always
    the mask's i-th voxel), are counted, and are left out of every fit.

    The noise sigma comes from the same pass: the spread of the repeated b0 volumes of the valid
    voxels (:func:`vaemap_bids.dataset.noise.pooled_repeat_sigma`) when at least two are kept;
    with fewer there is no honest series estimate from the brain alone (``sigma`` None) and each
    fit estimates it from its own residuals (recorded in its sidecars).

    ``noise``, when given, is an estimate made before ``dwi`` was denoised (``{"value": sigma
    or None, "method": ...}``, :func:`raw_series_sigma`): a denoised series' b0 repeats vary
    less than the noise that the magnitude's Rician floor comes from, so it replaces the
    estimate of this pass."""
    mask = np.asarray(mask, dtype=bool)
    keep = np.ones(acq.n_volumes, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if keep.size != acq.n_volumes:
        raise ValueError(f"{dwi}: {keep.size} volume flags for {acq.n_volumes} volumes")
    kept = acq.subset(keep)
    with open_image(dwi) as (info, volumes):
        if info.n_volumes != acq.n_volumes:
            raise ValueError(f"{dwi}: {info.n_volumes} volumes but the gradient table has "
                             f"{acq.n_volumes}")
        if mask.shape != tuple(info.shape[:3]):
            raise ValueError(f"{dwi}: mask shape {mask.shape} does not match {info.shape[:3]}")
        column = np.cumsum(keep) - 1
        raw = np.empty((int(mask.sum()), int(keep.sum())), dtype=np.float32)
        for index, vol in volumes:
            if keep[index]:
                raw[:, column[index]] = vol[mask]
    finite = np.all(np.isfinite(raw), axis=1)
    huge = finite & np.any(np.abs(raw) > MAX_MAGNITUDE, axis=1)
    raw[huge] = np.nan
    normalised, s0, valid = normalise_by_b0(raw, kept)
    if noise is None:
        sigma, noise = series_sigma(raw[:, kept.b0_mask][valid], n_coils)  # (N, n_b0): small
    else:
        sigma, noise = noise.get("value"), dict(noise)
    del raw
    implausible = valid & np.any(np.abs(normalised) > MAX_SIGNAL_RATIO, axis=1)
    valid &= ~implausible
    normalised[~valid] = np.nan
    excluded = {"nonfinite": int((~finite).sum()),
                "implausible": int(huge.sum() + implausible.sum()),
                "nonpositive_b0": int((finite & ~huge & ~valid & ~implausible).sum())}
    if not valid.any():
        raise ValueError(f"{dwi}: no brain voxel has finite, plausible values and a positive "
                         "mean b0")
    return PreparedSeries(info, mask, mask_source, normalised, s0, valid, excluded, kept,
                          sigma, noise)


def series_sigma(b0_rows: np.ndarray, n_coils: int = 1) -> tuple[float | None, dict]:
    """sigma (image units) from the b0 repeats of the brain's voxels (rows, n_b0), and how."""
    n_b0 = int(b0_rows.shape[1])
    info = {"n_b0": n_b0, "n_coils": int(n_coils)}
    if n_b0 < 2:
        info.update(method="none", value=None, reason=(
            f"{n_b0} b0 volume: the b0 spread needs at least 2; each fit estimates sigma from "
            "its own residuals"))
        return None, info
    try:
        sigma, extra = pooled_repeat_sigma(b0_rows, n_coils)
    except ValueError as exc:           # b0 repeats that do not vary (copies, denoised data)
        info.update(method="none", value=None, reason=f"b0 spread unusable: {exc}")
        return None, info
    info.update(method="b0", value=sigma, **extra)
    return sigma, info


def raw_series_sigma(b0_volumes: np.ndarray, n_coils: int = 1,
                     mppca_sigma: np.ndarray | None = None) -> tuple[float | None, dict]:
    """sigma of a series before denoising: :func:`series_sigma` on the raw b0 repeats
    ``b0_volumes`` (voxels, n_b0) of the brain; with fewer than two b0 volumes, the median of
    MP-PCA's noise map over the same voxels (``mppca_sigma`` (voxels,), when the series was
    denoised by MP-PCA), else None. The record says ``"before": "denoising"``."""
    b0_volumes = np.asarray(b0_volumes, dtype=np.float64)
    usable = np.all(np.isfinite(b0_volumes), axis=1) & (b0_volumes.mean(axis=1) > 0)
    sigma, info = series_sigma(b0_volumes[usable], n_coils)
    if sigma is None and mppca_sigma is not None:
        values = np.asarray(mppca_sigma, dtype=np.float64)[usable]
        values = values[np.isfinite(values) & (values > 0)]
        if values.size:
            sigma = float(np.median(values))
            # MP-PCA's sigma is the sd of the magnitude's fluctuations: the Gaussian sigma at
            # the b0's SNR, which is where the Marchenko-Pastur fit takes most of its signal.
            info.update(method="mppca", value=sigma, n_voxels=int(values.size),
                        reason=info.get("reason", ""))
    info["before"] = "denoising"
    return sigma, info


def nrmse(measured: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per row: RMS(measured - predicted) / RMS(measured); NaN where the input row is not finite
    or the measured signal is zero."""
    measured = np.asarray(measured, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if measured.shape != predicted.shape:
        raise ValueError(f"measured {measured.shape} and predicted {predicted.shape} differ")
    rms_res = np.sqrt(np.mean((measured - predicted) ** 2, axis=1))
    rms_meas = np.sqrt(np.mean(measured ** 2, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(rms_meas > 0, rms_res / rms_meas, np.nan)
    return out.astype(np.float32)


def fit_quality(model, signals: np.ndarray, params: np.ndarray, valid: np.ndarray) -> dict:
    """Per voxel NRMSE of the fit, and which voxels are outside the model's domain or at a bound."""
    full = model.full_acquisition.n_volumes
    measured = signals[:, model.volumes] if signals.shape[1] == full else signals
    out_nrmse = np.full(len(params), np.nan, dtype=np.float32)
    invalid = np.zeros(len(params), dtype=bool)
    at_bound = np.zeros(len(params), dtype=bool)
    ok = valid & np.all(np.isfinite(params), axis=1)
    if ok.any():
        predicted = model.forward_numpy(params[ok])
        out_nrmse[ok] = nrmse(measured[ok], predicted)
        invalid[ok] = model.invalid_mask(params[ok])
        at_bound[ok] = model.at_bound_mask(params[ok])
    return {"nrmse": out_nrmse, "invalid": invalid, "at_bound": at_bound}
