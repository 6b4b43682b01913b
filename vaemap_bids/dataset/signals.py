"""From a DWI image and a mask to b0-normalised signal rows, and back from rows to maps.

Plain functions on arrays and files; the Nipype interfaces only call them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import Acquisition, normalise_by_b0
from .gradients import ImageInfo, iter_volumes, read_image_info


@dataclass
class MaskedSignals:
    """b0-normalised signals of the mask's voxels, one row each (C order of the mask)."""

    signals: np.ndarray        # (N, T) float32; NaN rows where ``valid`` is False
    valid: np.ndarray          # (N,) bool: finite input and a positive mean b0
    s0: np.ndarray             # (N,) float32 mean b0
    n_nonfinite: int           # voxels excluded because a volume had NaN/Inf
    n_nonpositive_b0: int      # voxels excluded because their mean b0 is <= 0


def load_masked_signals(path, acq: Acquisition, mask: np.ndarray,
                        info: ImageInfo | None = None) -> MaskedSignals:
    """Read the mask's voxels of a 4-D image volume by volume and divide by their mean b0.

    Voxels with a non-finite value, or whose mean b0 is not positive, are kept as NaN rows (so
    row i is always the mask's i-th voxel) and counted; estimators exclude NaN rows."""
    info = info or read_image_info(path)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(info.shape[:3]):
        raise ValueError(f"{path}: mask shape {mask.shape} does not match image {info.shape[:3]}")
    raw = np.empty((int(mask.sum()), info.n_volumes), dtype=np.float32)
    for index, vol in iter_volumes(path, info):
        raw[:, index] = vol[mask]
    finite = np.all(np.isfinite(raw), axis=1)
    normalised, s0, valid = normalise_by_b0(raw, acq)
    normalised[~valid] = np.nan
    return MaskedSignals(normalised, valid, s0, int((~finite).sum()),
                         int((finite & ~valid).sum()))


def rows_to_volume(rows: np.ndarray, mask: np.ndarray, fill=np.nan) -> np.ndarray:
    """Put per-voxel rows (N,) or (N, k) back on the mask's grid: 3-D or 4-D, ``fill`` outside."""
    rows = np.asarray(rows)
    mask = np.asarray(mask, dtype=bool)
    if rows.shape[0] != int(mask.sum()):
        raise ValueError(f"{rows.shape[0]} rows for a mask of {int(mask.sum())} voxels")
    out = np.full(mask.shape + rows.shape[1:], fill, dtype=rows.dtype if rows.dtype.kind == "f"
                  else np.result_type(rows.dtype, np.asarray(fill).dtype))
    out[mask] = rows
    return out


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
