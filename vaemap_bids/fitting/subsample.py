"""Which voxels a network trains on when it does not train on all of them.

A network estimator is amortised: once trained, its encoder maps any voxel's signal to its
posterior in one pass. A whole brain (about 0.9 M voxels) holds far more voxels than the few
thousand parameters need, so training on a subsample and inferring every voxel gives the same
maps in a fraction of the time (``benchmarks/bench_training.py subsample`` measures it).

The subsample is stratified on the signals themselves, so rare tissue (CSF, lesions) is
represented in proportion: the voxels are binned by quantiles of the first two principal
components of their signals (nested: 16 bins of the first, then 16 of the second within each),
and every bin gives its share of the sample.
"""
from __future__ import annotations

import numpy as np

N_BINS = 16             # quantile bins per principal component (16 x 16 strata)
PCA_ROWS = 20_000       # rows that estimate the principal directions (plenty for T ~ 100-300)


def resolve_train_voxels(value, n_voxels: int) -> int:
    """The number of training voxels for ``value`` (an int, ``null``/``all``) of ``n_voxels``."""
    if value is None or (isinstance(value, str) and value.lower() == "all"):
        return n_voxels
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"train_voxels must be a positive integer or null (all voxels), "
                         f"got {value!r}")
    return min(int(value), n_voxels)


def _principal_scores(signals: np.ndarray, rng: np.random.Generator, n: int = 2) -> np.ndarray:
    rows = signals if len(signals) <= PCA_ROWS else signals[
        np.sort(rng.choice(len(signals), PCA_ROWS, replace=False))]
    mean = rows.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(rows - mean, full_matrices=False)
    return (signals - mean.astype(signals.dtype)) @ vt[:n].T.astype(signals.dtype)


def _quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index 0..n_bins-1 of each value by rank (ties broken by position: equal sizes)."""
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks * n_bins // max(len(values), 1)


def stratified_subsample(signals: np.ndarray, n_train: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of ``n_train`` of ``signals`` (N, T), stratified on their first two
    principal components; all rows when ``n_train >= N``. Deterministic for a seed."""
    n = len(signals)
    if n_train >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    scores = _principal_scores(np.asarray(signals, dtype=np.float32), rng)
    first = _quantile_bins(scores[:, 0], N_BINS)
    stratum = np.empty(n, dtype=np.int64)
    for b in range(N_BINS):
        rows = np.flatnonzero(first == b)
        stratum[rows] = b * N_BINS + _quantile_bins(scores[rows, 1], N_BINS)
    sizes = np.bincount(stratum, minlength=N_BINS * N_BINS)
    quota = sizes * (n_train / n)
    take = np.floor(quota).astype(np.int64)
    short = n_train - take.sum()             # largest remainders get the last few
    take[np.argsort(-(quota - take), kind="stable")[:short]] += 1
    order = np.argsort(stratum, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    chosen = [order[s:s + size][rng.choice(size, k, replace=False)]
              for s, size, k in zip(starts, sizes, take) if k]
    return np.sort(np.concatenate(chosen))
