"""Is a fit's std honest? A parametric check on the subject's own acquisition and noise.

A subject has no ground truth, so its std maps are checked the way a statistician checks a
posterior: draw voxels from the subject's own fitted maps, treat their parameters as truth,
simulate the acquisition with the subject's σ (Rician noise on magnitude data, S0 = 1 and the
noisy b0 mean as the normaliser, as the pipeline does), estimate them again with the SAME
estimator (the trained network, not retrained; least squares refitted) and count how often
``estimate ± z·std`` contains the truth. A calibrated method's coverage equals the nominal level
at every level.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.stats import norm

from ..physics.base import SignalModel

NOMINAL_LEVELS = (0.5, 0.68, 0.8, 0.9, 0.95, 0.99)

# (signals (N, T of the model's volumes, b0-normalised), sigma (N,)) -> (params, std)
Estimate = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray | None]]


def draw_check_voxels(params: np.ndarray, valid: np.ndarray, n_voxels: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Row indices of ``n_voxels`` fitted voxels with finite, in-bounds parameters (all of them
    when there are fewer), sorted so that the draw does not depend on the order of the rows."""
    usable = np.flatnonzero(valid & np.all(np.isfinite(params), axis=1))
    if usable.size <= n_voxels:
        return usable
    return np.sort(rng.choice(usable, size=n_voxels, replace=False))


def simulate_like_subject(model: SignalModel, truth: np.ndarray, sigma: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """b0-normalised noisy signals of the model's full acquisition for ``truth`` (N, P) with
    per-voxel noise ``sigma`` (σ/S0), renormalised by their own noisy b0 mean."""
    acq = model.full_acquisition
    clean = model.forward_numpy(truth, acq.bvals, acq.bvecs)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=np.float64).reshape(-1, 1), clean.shape)
    noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape),
                     sigma * rng.standard_normal(clean.shape))
    s0 = noisy[:, acq.b0_mask].mean(axis=1, keepdims=True)
    return (noisy / s0).astype(np.float32)


def coverage_table(estimate: np.ndarray, std: np.ndarray, truth: np.ndarray,
                   model: SignalModel, levels=NOMINAL_LEVELS) -> dict[str, dict[str, float]]:
    """``{param: {level: fraction of voxels whose interval contains the truth}}`` for every
    scalar parameter (directions have no scalar interval and are left out)."""
    table: dict[str, dict[str, float]] = {}
    est, sd, tru = model.split(estimate), model.split(std), model.split(truth)
    for spec in model.parameters:
        if spec.is_direction:
            continue
        e, s, t = (np.ravel(a[spec.label]) for a in (est, sd, tru))
        ok = np.isfinite(e) & np.isfinite(s) & np.isfinite(t)
        if not ok.any():
            continue
        err = np.abs(e[ok] - t[ok])
        table[spec.label] = {f"{lvl:g}": float(np.mean(err <= norm.ppf(0.5 + lvl / 2) * s[ok]))
                             for lvl in levels}
    return table


def simulated_coverage(model: SignalModel, params: np.ndarray, valid: np.ndarray,
                       sigma: np.ndarray | float, estimate: Estimate, *, n_voxels: int = 2000,
                       levels=NOMINAL_LEVELS, seed: int = 0) -> dict:
    """Coverage of ``estimate``'s intervals on voxels simulated from the subject's own fit.

    ``params``/``valid`` are the fit's rows, ``sigma`` the noise of the b0-normalised signals
    (scalar or per row). Returns ``{"n_voxels", "levels", "coverage": {param: {level: f}}}``, or
    an empty coverage when the estimator gives no std."""
    rng = np.random.default_rng(seed)
    rows = draw_check_voxels(params, valid, n_voxels, rng)
    sigma_rows = np.broadcast_to(np.asarray(sigma, dtype=np.float64), valid.shape)[rows]
    truth = params[rows].astype(np.float64)
    signals = simulate_like_subject(model, truth, sigma_rows, rng)
    est, std = estimate(signals, sigma_rows)
    coverage = {} if std is None else coverage_table(est, std, truth, model, levels)
    return {"n_voxels": int(rows.size), "levels": [float(v) for v in levels],
            "coverage": coverage}


def check_fit(model: SignalModel, result, sigma, *, options: dict | None = None,
              device="cpu", n_voxels: int = 2000, seed: int = 0) -> dict | None:
    """:func:`simulated_coverage` of a finished fit (a :class:`~vaemap_bids.fitting.FitResult`),
    or None when it has no std or no σ is known. A network is checked with its trained encoder
    (``result.predict``: amortised, no retraining); least squares by refitting."""
    if result.std is None or sigma is None:
        return None
    estimate = getattr(result, "predict", None)
    if estimate is None and result.method == "lsq":
        def estimate(signals, sigma_rows):
            from . import fit
            refit = fit(model, signals, "lsq", device=device, seed=seed, options=options,
                        progress=False, sigma=sigma_rows)
            return refit.params, refit.std
    if estimate is None:
        return None
    return simulated_coverage(model, result.params, result.valid, sigma, estimate,
                              n_voxels=n_voxels, seed=seed)
