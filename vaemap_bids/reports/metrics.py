"""Numbers the reports show: plain functions of arrays, no files and no plotting.

Every function ignores non-finite values (voxels excluded from a fit are NaN in the maps).
"""
from __future__ import annotations

import numpy as np

from ..physics.acquisition import B0_THRESHOLD, SHELL_TOLERANCE
from ..physics.msdki import MSDKI_MAX_B

#: Scale that makes the median absolute deviation a consistent estimate of a normal's sigma.
MAD_TO_SIGMA = 1.4826
#: |robust z| above this flags a subject as an outlier in the group report.
OUTLIER_Z = 3.0


def finite(values) -> np.ndarray:
    """The finite entries of ``values`` as a flat float array."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def median_iqr(values) -> tuple[float, float]:
    """Median and inter-quartile range (75th - 25th percentile) of the finite values (NaN, NaN
    when there are none)."""
    v = finite(values)
    if v.size == 0:
        return float("nan"), float("nan")
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return float(q50), float(q75 - q25)


def robust_z(values) -> np.ndarray:
    """(x - median) / (1.4826 MAD) over the finite entries; NaN stays NaN.

    With MAD = 0 (at least half the values identical) the scale is undefined: values equal to the
    median get 0 and any other value +-inf, so a lone deviation is still flagged.
    """
    x = np.asarray(values, dtype=np.float64)
    z = np.full(x.shape, np.nan)
    ok = np.isfinite(x)
    if not ok.any():
        return z
    med = np.median(x[ok])
    mad = np.median(np.abs(x[ok] - med))
    if mad > 0:
        z[ok] = (x[ok] - med) / (MAD_TO_SIGMA * mad)
    else:
        diff = x[ok] - med
        z[ok] = np.where(diff > 0, np.inf, np.where(diff < 0, -np.inf, 0.0))
    return z


def outliers(values, threshold: float = OUTLIER_Z) -> np.ndarray:
    """Boolean mask of values whose |robust z| exceeds ``threshold``."""
    with np.errstate(invalid="ignore"):
        return np.abs(robust_z(values)) > threshold


def msdki_b_max(shells: list[dict], max_b_smm2: float = MSDKI_MAX_B * 1e3) -> float | None:
    """Largest b (s/mm^2) MS-DKI used, from the summary's shells ``[{"bval_smm2": ...}, ...]``:
    the largest non-zero shell at or below ``max_b_smm2`` (within the shell tolerance), or None."""
    tol = SHELL_TOLERANCE * 1e3
    used = [float(s["bval_smm2"]) for s in shells
            if B0_THRESHOLD * 1e3 <= float(s["bval_smm2"]) <= max_b_smm2 + tol]
    return max(used) if used else None


def msdki_outside_validity(msd, msk, b_max_smm2: float) -> int:
    """Voxels where MS-DKI is outside its physical domain, b D K >= 3 at the largest b used
    (D in um^2/ms, b in s/mm^2), counted over voxels where both maps are finite."""
    d = np.asarray(msd, dtype=np.float64).ravel()
    k = np.asarray(msk, dtype=np.float64).ravel()
    ok = np.isfinite(d) & np.isfinite(k)
    return int(np.count_nonzero(b_max_smm2 * 1e-3 * d[ok] * k[ok] >= 3.0))


def agreement(reference, estimate) -> dict:
    """Bland-Altman and correlation numbers of ``estimate`` against ``reference`` over voxels
    where both are finite: n, Pearson r, bias (mean of estimate - reference) and the 95 % limits
    of agreement (bias +- 1.96 SD of the differences)."""
    a = np.asarray(reference, dtype=np.float64).ravel()
    b = np.asarray(estimate, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"reference and estimate differ in size: {a.size} vs {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    out = {"n": n, "r": float("nan"), "bias": float("nan"), "loa_low": float("nan"),
           "loa_high": float("nan")}
    if n == 0:
        return out
    diff = b[ok] - a[ok]
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    out.update(bias=bias, loa_low=bias - 1.96 * sd, loa_high=bias + 1.96 * sd)
    if n > 1 and a[ok].std() > 0 and b[ok].std() > 0:
        out["r"] = float(np.corrcoef(a[ok], b[ok])[0, 1])
    return out


def angular_difference_deg(n1, n2) -> np.ndarray:
    """Angle in degrees between unit directions (rows of (N, 3) arrays), antipodally symmetric
    (n and -n are the same fibre, so the result is in [0, 90])."""
    a = np.asarray(n1, dtype=np.float64).reshape(-1, 3)
    b = np.asarray(n2, dtype=np.float64).reshape(-1, 3)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.abs(np.sum(a * b, axis=1)) / (na * nb)
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def pca_2d(x) -> tuple[np.ndarray, np.ndarray]:
    """Project rows of ``x`` (N, L) on their first two principal components.

    Returns ``(scores (N, 2), explained variance ratio (2,))``; with L = 1 the second column is 0.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs a (N >= 2, L) array, got shape {x.shape}")
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(2, vt.shape[0])
    scores = np.zeros((x.shape[0], 2))
    scores[:, :k] = centred @ vt[:k].T
    var = s ** 2
    ratio = np.zeros(2)
    if var.sum() > 0:
        ratio[:k] = var[:k] / var.sum()
    return scores, ratio


def per_label_median_iqr(values, labels) -> dict[int, tuple[int, float, float]]:
    """{label: (n finite voxels, median, IQR)} for every positive integer label present."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lab = np.asarray(labels).ravel()
    if v.shape != lab.shape:
        raise ValueError(f"values and labels differ in size: {v.size} vs {lab.size}")
    out = {}
    for label in np.unique(lab[np.isfinite(lab)] if lab.dtype.kind == "f" else lab):
        if label <= 0:
            continue
        sel = v[lab == label]
        med, iqr = median_iqr(sel)
        out[int(label)] = (int(np.isfinite(sel).sum()), med, iqr)
    return out
