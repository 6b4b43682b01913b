"""The noise level of b0-normalised signals as a fit receives or estimates it.

``fit(..., sigma=...)`` takes the noise standard deviation of the b0-normalised signals
(sigma / S0): a scalar, or one value per voxel row. The pipeline knows it (sigma of the series,
:func:`vaemap_bids.dataset.noise.estimate_series_sigma`, divided by each voxel's mean b0). When
a caller gives none, :func:`estimate_normalised_sigma` estimates one value from the signals
themselves, and says how:

- ``b0-repeats`` (the model's volumes hold >= 2 b0 volumes): the spread of the normalised b0
  repeats, pooled over the voxels (:func:`vaemap_bids.dataset.noise.pooled_repeat_sigma`: per
  voxel unbiased variance, Koay-Basser correction, median pool with the chi^2 median factor).
  Dividing by the mean of those same b0 volumes only rescales them by 1 / mean b0 ~ 1 / S0,
  so their spread around their own mean (ddof = 1) estimates (sigma / S0)^2 to first order.
- ``gaussian-residuals`` (fewer b0 volumes): the residuals of the least-squares fit, per voxel
  RSS / (T - P), pooled by the median with the chi^2_{T-P} median factor. Where most of a
  voxel's measurements sit on the noise floor the magnitude varies less than sigma (0.43 sigma^2
  for pure Rician noise), so such voxels read low; the median over a brain is set by tissue.

Both give one value for all voxels: right when sigma / S0 is about constant (as in the
simulation, where sigma = 1 / SNR), an approximation when S0 varies across the brain (then pass
the per-voxel sigma / S0).
"""
from __future__ import annotations

import numpy as np

from ..physics.base import SignalModel


class NoNoiseError(ValueError):
    """The signals hold no measurable noise (simulated noise-free data, copies): a magnitude
    likelihood has nothing to work with, and the fit falls back on Gaussian least squares."""


def check_sigma(sigma, n_rows: int):
    """``sigma`` as a positive finite float or a float64 array (n_rows,); raises ValueError."""
    arr = np.asarray(sigma, dtype=np.float64)
    if arr.ndim == 0:
        value = float(arr)
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"sigma must be a positive finite number, got {value!r}")
        return value
    arr = arr.reshape(-1) if arr.ndim == 2 and arr.shape[1] == 1 else arr
    if arr.shape != (n_rows,):
        raise ValueError(f"sigma must be a scalar or one value per voxel row ({n_rows}), "
                         f"got shape {np.shape(sigma)}")
    if not np.all(np.isfinite(arr) & (arr > 0)):
        raise ValueError("sigma must be positive and finite in every fitted voxel")
    return arr


def estimate_normalised_sigma(model: SignalModel, y: np.ndarray, noise_model: str = "rician",
                              n_coils: int = 1, **lsq_settings) -> tuple[float, dict]:
    """One sigma of the b0-normalised signals ``y`` (n, model.n_measurements) and a record
    ``{"sigma_source", "n_b0", ...}``; ``lsq_settings`` go to the least-squares fit of the
    ``gaussian-residuals`` route (device, max_iter, ...)."""
    from ..dataset.noise import pooled_repeat_sigma
    from scipy import stats

    y = np.asarray(y, dtype=np.float64)
    b0 = np.asarray(model.acquisition.b0_mask, dtype=bool)
    n_b0 = int(b0.sum())
    magnitude = noise_model != "gaussian"
    coils = int(n_coils) if magnitude else 1
    if n_b0 >= 2 and np.any(np.ptp(y[:, b0], axis=1) > 0):
        sigma, extra = pooled_repeat_sigma(y[:, b0], coils, magnitude=magnitude)
        return sigma, {"sigma_source": "b0-repeats", "n_b0": n_b0,
                       "n_voxels": extra["n_voxels"]}
    from .lsq import solve_lsq

    params = solve_lsq(model, y.astype(np.float32), **lsq_settings)
    import torch

    with torch.no_grad():
        pred = model.forward(torch.as_tensor(params, dtype=torch.float64)).numpy()
    dof = y.shape[1] - model.n_params
    if dof < 1:
        raise ValueError(f"cannot estimate sigma: {y.shape[1]} measurements for "
                         f"{model.n_params} parameters and {n_b0} b0 volume(s); pass sigma")
    rss = np.sum((y - pred) ** 2, axis=1) / dof
    rss = rss[np.isfinite(rss) & (rss > 0)]
    if rss.size == 0:
        raise NoNoiseError("the b0 repeats do not vary and the least-squares residuals are all "
                           "zero: no noise to estimate sigma from")
    sigma = float(np.sqrt(np.median(rss) / (stats.chi2.median(dof) / dof)))
    return sigma, {"sigma_source": "gaussian-residuals", "n_b0": n_b0, "dof": int(dof),
                   "n_voxels": int(rss.size)}
