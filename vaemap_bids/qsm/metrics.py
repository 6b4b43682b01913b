"""Accuracy of a chi map against the truth, inside a mask (QSM Challenge 2.0 style metrics).

Both maps are compared as given (reference them the same way first, e.g. with
:func:`vaemap_bids.qsm.inversion.reference`)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def rmse(est, truth, mask) -> float:
    m = mask.astype(bool)
    return float(np.sqrt(np.mean((est[m] - truth[m]) ** 2)))


def nrmse(est, truth, mask) -> float:
    """``||est - truth|| / ||truth||`` inside the mask (the challenge's "RMSE", as a fraction)."""
    m = mask.astype(bool)
    return float(np.linalg.norm(est[m] - truth[m]) / np.linalg.norm(truth[m]))


def hfen(est, truth, mask, sigma_vox: float = 1.5) -> float:
    """High-frequency error norm: the NRMSE of the Laplacian-of-Gaussian filtered maps
    (sigma 1.5 voxels, Ravishankar & Bresler 2011), inside the mask."""
    m = mask.astype(bool)
    le = ndimage.gaussian_laplace(np.where(m, est, 0.0).astype(float), sigma_vox)
    lt = ndimage.gaussian_laplace(np.where(m, truth, 0.0).astype(float), sigma_vox)
    return float(np.linalg.norm(le[m] - lt[m]) / np.linalg.norm(lt[m]))


def ssim(est, truth, mask, data_range: float | None = None) -> float:
    """Structural similarity (scikit-image, 3-D, Gaussian window), averaged over the mask."""
    from skimage.metrics import structural_similarity
    m = mask.astype(bool)
    a = np.where(m, est, 0.0).astype(float)
    b = np.where(m, truth, 0.0).astype(float)
    if data_range is None:
        data_range = float(b[m].max() - b[m].min())
    _, smap = structural_similarity(a, b, data_range=data_range, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, full=True)
    return float(smap[m].mean())


def slope(est, truth, mask) -> float:
    """The least-squares slope of ``est`` against ``truth`` inside the mask (with intercept)."""
    m = mask.astype(bool)
    t, e = truth[m], est[m]
    tc = t - t.mean()
    return float((tc * (e - e.mean())).sum() / (tc ** 2).sum())


def region_errors(est, truth, labels: dict) -> dict:
    """``{name: mean(est) - mean(truth)}`` over each region's boolean mask."""
    return {name: float(est[r].mean() - truth[r].mean()) for name, r in labels.items() if r.any()}


def all_metrics(est, truth, mask) -> dict:
    return {"rmse": rmse(est, truth, mask), "nrmse": nrmse(est, truth, mask),
            "hfen": hfen(est, truth, mask), "ssim": ssim(est, truth, mask),
            "slope": slope(est, truth, mask)}


__all__ = ["rmse", "nrmse", "hfen", "ssim", "slope", "region_errors", "all_metrics"]
