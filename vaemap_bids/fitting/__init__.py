"""Estimators: ``fit(model, signals, method)`` runs any of lsq, ssl, vaeunig, vaegmm.

``signals`` are b0-normalised (see :func:`vaemap_bids.physics.normalise_by_b0`), one row per
voxel, with the volumes of the model's full acquisition (or only the volumes the model uses).
Rows with a non-finite value are excluded, counted in the log, and NaN in the result.
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
        options: dict | None = None, progress: bool = True, voxel_coords=None,
        s0=None) -> FitResult:
    """Fit ``model`` to ``signals`` with ``method``; ``options`` override that method's defaults
    (see ``vaemap_bids/data/hyperparameters.yaml``). ``voxel_coords`` ((N, 3) integer voxel
    indices of the rows) and ``s0`` ((N,) each row's mean b0 before normalisation) are read by
    the spatial method ``svae`` only, which needs the coordinates."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    y, valid = prepare_signals(model, signals)
    n_bad = int((~valid).sum())
    if n_bad:
        log.warning("%s/%s: %d of %d voxels have non-finite signals and are excluded",
                    model.name, method, n_bad, valid.size)
    dev = resolve_device(device)
    if method == "svae":
        from .spatial import fit_svae
        return fit_svae(model, y, valid, voxel_coords=voxel_coords, s0=s0, device=dev,
                        seed=seed, options=options, progress=progress)
    if method == "lsq":
        from .lsq import fit_lsq
        return fit_lsq(model, y, valid, device=dev, seed=seed, options=options, progress=progress)
    from .train import fit_network
    return fit_network(model, y, valid, method, device=dev, seed=seed, options=options,
                       progress=progress)
