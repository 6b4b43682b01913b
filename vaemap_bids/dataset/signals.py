"""From a DWI image to the brain's b0-normalised signal rows (``PrepareSeries``), and the fit
quality of estimates against them.

Plain functions on arrays and files; the Nipype interfaces only call them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import Acquisition, normalise_by_b0
from .image import ImageInfo, open_image
from .masking import NUMPASS, compute_brain_mask, load_mask, median_radius


@dataclass
class PreparedSeries:
    """The brain mask and its voxels' signals, one row each (C order of the mask)."""

    info: ImageInfo
    mask: np.ndarray           # 3-D bool: the brain mask used (given, or median_otsu)
    mask_source: str
    signals: np.ndarray        # (N, T) float32 S/S0; NaN rows where ``valid`` is False
    s0: np.ndarray             # (N,) float32 mean b0 (raw image units)
    valid: np.ndarray          # (N,) bool: finite input and a positive mean b0
    excluded: dict             # {"nonfinite": n, "nonpositive_b0": n} voxels of the mask

    @property
    def valid_volume(self) -> np.ndarray:
        """The validity mask on the grid: brain voxels whose rows are fitted."""
        out = np.zeros(self.mask.shape, dtype=bool)
        out[self.mask] = self.valid
        return out


def brain_mask(mean_b0: np.ndarray, info: ImageInfo, given_mask=None) -> tuple[np.ndarray, str]:
    """The given mask (checked against the grid) or dipy's median_otsu on the mean b0."""
    if given_mask:
        return load_mask(given_mask, info.shape, info.affine), f"given: {given_mask}"
    mask = compute_brain_mask(mean_b0, info.zooms)
    return mask, (f"dipy median_otsu on the mean b0 (median radius {median_radius(info.zooms)} "
                  f"voxels, {NUMPASS} passes)")


def prepare_series(dwi, acq: Acquisition, mean_b0: np.ndarray, given_mask=None) -> PreparedSeries:
    """Mask the series (given mask, else median_otsu on the planning pass's mean b0) and read
    the mask's voxels in one pass over the image (one open), divided by their mean b0.

    Voxels with a non-finite value, or whose mean b0 is not positive, stay as NaN rows (row i is
    always the mask's i-th voxel), are counted, and are left out of every fit."""
    with open_image(dwi) as (info, volumes):
        if info.n_volumes != acq.n_volumes:
            raise ValueError(f"{dwi}: {info.n_volumes} volumes but the gradient table has "
                             f"{acq.n_volumes}")
        mask, source = brain_mask(mean_b0, info, given_mask)
        raw = np.empty((int(mask.sum()), info.n_volumes), dtype=np.float32)
        for index, vol in volumes:
            raw[:, index] = vol[mask]
    finite = np.all(np.isfinite(raw), axis=1)
    normalised, s0, valid = normalise_by_b0(raw, acq)
    del raw
    normalised[~valid] = np.nan
    excluded = {"nonfinite": int((~finite).sum()), "nonpositive_b0": int((finite & ~valid).sum())}
    if not valid.any():
        raise ValueError(f"{dwi}: no brain voxel has finite values and a positive mean b0")
    return PreparedSeries(info, mask, source, normalised, s0, valid, excluded)


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
