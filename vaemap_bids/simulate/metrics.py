"""Accuracy of estimates against a known truth: RMSE, bias and Pearson r.

Voxels whose estimate is not finite (excluded from a fit) are left out of every metric and
counted in ``n_missing``, so a method never looks better by dropping voxels silently.
"""
from __future__ import annotations

import numpy as np

POOLED = "pooled"


def _pair(estimate, truth) -> tuple[np.ndarray, np.ndarray]:
    estimate = np.asarray(estimate, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    if estimate.shape != truth.shape:
        raise ValueError(f"estimate has {estimate.size} values but truth has {truth.size}")
    if not np.all(np.isfinite(truth)):
        raise ValueError("truth contains NaN or infinite values")
    return estimate, truth


def rmse(estimate, truth) -> float:
    """Root-mean-square error over the finite estimates (NaN when there are none)."""
    e, t = _pair(estimate, truth)
    ok = np.isfinite(e)
    return float(np.sqrt(np.mean((e[ok] - t[ok]) ** 2))) if ok.any() else float("nan")


def bias(estimate, truth) -> float:
    """Mean of (estimate - truth) over the finite estimates."""
    e, t = _pair(estimate, truth)
    ok = np.isfinite(e)
    return float(np.mean(e[ok] - t[ok])) if ok.any() else float("nan")


def pearson_r(estimate, truth) -> float:
    """Pearson correlation over the finite estimates; NaN when either side is constant."""
    e, t = _pair(estimate, truth)
    ok = np.isfinite(e)
    e, t = e[ok], t[ok]
    if e.size < 2:
        return float("nan")
    de, dt = e - e.mean(), t - t.mean()
    denom = np.sqrt(np.sum(de * de) * np.sum(dt * dt))
    return float(np.sum(de * dt) / denom) if denom > 0 else float("nan")


def summarise(estimate, truth) -> dict:
    """RMSE, bias, Pearson r, the number of voxels used and of voxels missing."""
    e, t = _pair(estimate, truth)
    n_ok = int(np.isfinite(e).sum())
    return {"rmse": rmse(e, t), "bias": bias(e, t), "r": pearson_r(e, t), "n": n_ok,
            "n_missing": int(e.size - n_ok)}


def parameter_metrics(estimate, truth, labels, param_names, cluster_names) -> dict:
    """``{param: {cluster name or "pooled": summarise(...)}}`` for (N, P) arrays and (N,) labels.

    ``labels[i]`` indexes ``cluster_names``; a cluster with no voxel gets NaN metrics and n = 0.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    labels = np.asarray(labels)
    if estimate.ndim == 1:
        estimate, truth = estimate[:, None], truth[:, None]
    if estimate.shape != truth.shape or estimate.shape[1] != len(param_names):
        raise ValueError(f"estimate {estimate.shape} and truth {truth.shape} must both be "
                         f"(voxels, {len(param_names)})")
    if labels.shape != (estimate.shape[0],):
        raise ValueError(f"labels must have one entry per voxel ({estimate.shape[0]}), "
                         f"got shape {labels.shape}")
    out = {}
    for j, name in enumerate(param_names):
        per = {}
        for c, cname in enumerate(cluster_names):
            sel = labels == c
            per[cname] = summarise(estimate[sel, j], truth[sel, j])
        per[POOLED] = summarise(estimate[:, j], truth[:, j])
        out[name] = per
    return out


def mean_sd(values) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the finite ``values``."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}
