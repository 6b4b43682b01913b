"""Estimators: ``fit(model, signals, method)`` runs any of lsq, ssl, vaeunig, vaegmm, svae.

``signals`` are b0-normalised (see :func:`vaemap_bids.physics.normalise_by_b0`), one row per
voxel, with the volumes of the model's full acquisition (or only the volumes the model uses).
Rows with a non-finite value are excluded, counted in the log, and NaN in the result.

``sigma`` is the noise standard deviation of those b0-normalised signals (sigma / S0 of each
voxel): a scalar, or one value per row of ``signals`` (subset to the fitted rows like the
signals). The magnitude likelihoods (``noise_model`` rician / ncchi, the default) need it; when
it is None, lsq estimates it from the signals (:mod:`vaemap_bids.fitting.sigma`) and a network
learns one noise level with its ELBO; what was done is recorded in
``FitResult.hyperparameters['noise']``.
"""
from __future__ import annotations

import logging

import numpy as np

from ..physics.base import SignalModel
from .base import (METHODS, NETWORK_METHODS, DeviceUnavailableError, FitResult, prepare_signals,
                   resolve_device, scatter_rows)

log = logging.getLogger("vaemap.fitting")

__all__ = ["fit", "FitResult", "METHODS", "NETWORK_METHODS", "DeviceUnavailableError",
           "resolve_device", "prepare_signals", "scatter_rows"]


def fit(model: SignalModel, signals: np.ndarray, method: str, *, device="auto", seed: int = 0,
        options: dict | None = None, progress: bool = True, sigma=None, voxel_coords=None,
        s0=None) -> FitResult:
    """Fit ``model`` to ``signals`` with ``method``; ``options`` override that method's defaults
    (see ``vaemap_bids/data/hyperparameters.yaml``); ``sigma``: see the module doc.
    ``voxel_coords`` ((N, 3) integer voxel indices of the rows) and ``s0`` ((N,) each row's mean
    b0 before normalisation) are read by the spatial method ``svae`` only, which needs the
    coordinates."""
    from .options import check_options
    from .sigma import check_sigma

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    check_options(method, model.name, options)   # a bad option fails before any work
    y, valid = prepare_signals(model, signals)
    n_bad = int((~valid).sum())
    if n_bad:
        log.warning("%s/%s: %d of %d voxels have non-finite signals and are excluded",
                    model.name, method, n_bad, valid.size)
    rows = None
    if sigma is not None:
        arr = np.asarray(sigma, dtype=np.float64)
        if arr.ndim == 0:
            rows = check_sigma(arr, y.shape[0])
        else:
            arr = arr.reshape(-1) if arr.ndim == 2 and arr.shape[1] == 1 else arr
            if arr.shape != (valid.size,):
                raise ValueError(f"sigma must be a scalar or one value per row of signals "
                                 f"({valid.size}), got shape {np.shape(sigma)}")
            rows = check_sigma(arr[valid], y.shape[0])
    dev = resolve_device(device)
    if method == "svae":
        from .spatial import fit_svae
        return fit_svae(model, y, valid, voxel_coords=voxel_coords, s0=s0, device=dev,
                        seed=seed, options=options, progress=progress)
    if method == "lsq":
        from .lsq import fit_lsq
        return fit_lsq(model, y, valid, device=dev, seed=seed, options=options, progress=progress,
                       sigma=rows)
    # without a sigma the network learns one noise level with its ELBO (fitting/train.py)
    from .train import fit_network
    res = fit_network(model, y, valid, method, device=dev, seed=seed, options=options,
                      progress=progress, sigma=rows)
    return res
