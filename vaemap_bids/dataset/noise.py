"""The noise level sigma of a DWI series, in signal units, for the magnitude likelihoods.

Every fit needs sigma of the b0-normalised signal, i.e. ``sigma / S0`` per voxel: the pipeline
calls :func:`estimate_series_sigma` once per series and divides by each voxel's mean b0.

Which estimate is honest depends on the input:

- ``b0`` (the default whenever there are >= 2 b0 volumes): the spread of the repeated b0
  volumes inside the brain mask. In each voxel the sample variance of its n b0 repeats
  (ddof = 1, unbiased for the variance) is divided by the Koay-Basser factor xi(theta) of the
  voxel's own SNR, which turns the variance of a Rician / non-central chi magnitude into sigma^2
  (xi -> 1 at high SNR, 0.43 for pure Rician noise); the voxels are pooled by the median of
  these sigma^2, divided by the median of chi^2_{n-1} / (n - 1), so that the median is an
  unbiased pool for any n >= 2 and robust to the few voxels with motion or artefacts.
  Assumes sigma is the same in every voxel of the mask (no strong g-factor pattern) and that the
  b0 volumes differ only by noise: drift or motion between them inflates sigma, and
  interpolation (motion/eddy correction) or denoising shrinks it.
- ``piesno`` (dipy, Koay et al. 2009): needs the raw magnitude with its noisy background (not
  skull-stripped, not zero-filled, not denoised); finds the pure-noise voxels slice by slice.
- ``estimate_sigma`` (dipy): the local-difference estimator over the whole volume with Koay's
  correction for pure background (theta = 0) applied everywhere; it reads edges and structure
  as noise (on the tests' synthetic head with a sharp edge, about 3 sigma), so ``auto`` never
  picks it; only when asked for, on data dominated by a noisy background. Only the coil counts
  dipy tabulates (1, 4, 6, 8, 12, 16, 20, 24, 32, 64).
- ``auto``: ``b0`` with >= 2 b0 volumes; else ``piesno`` when the volume has a non-zero
  background outside the mask; else no honest estimate: ``(None, info)``, and
  :func:`vaemap_bids.fitting.fit` falls back on the residuals of a Gaussian fit (recorded).
"""
from __future__ import annotations

import numpy as np

SIGMA_METHODS = ("auto", "b0", "piesno", "estimate_sigma")
#: b-values (s/mm^2) below this are b0 volumes (as in the rest of vaemap).
B0_THRESHOLD_SMM2 = 50.0
#: ``auto`` uses piesno only when at least this fraction of the voxels outside the mask are
#: non-zero (a background that was not zero-filled).
MIN_BACKGROUND_FRACTION = 0.5
#: at least this many voxels outside the mask for piesno / estimate_sigma
MIN_BACKGROUND_VOXELS = 1000


# ---- the Koay-Basser correction ---------------------------------------------------------------
def koay_xi(theta, n_coils: int = 1):
    """Var(m) / sigma^2 of a non-central chi magnitude of SNR ``theta = nu / sigma`` with
    ``n_coils`` channels (Koay & Basser 2006, eq. 18):
    ``2L + theta^2 - (beta_L 1F1(-1/2, L, -theta^2 / 2))^2``."""
    from scipy import special

    theta = np.asarray(theta, dtype=np.float64)
    L = int(n_coils)
    # beta_L = sqrt(pi/2) (2L-1)!! / (2^(L-1) (L-1)!), (2L-1)!! = (2L)! / (2^L L!)
    beta = np.sqrt(np.pi / 2) * np.exp(special.gammaln(2 * L + 1) - L * np.log(2)
                                       - special.gammaln(L + 1) - (L - 1) * np.log(2)
                                       - special.gammaln(L))
    xi = 2 * L + theta ** 2 - (beta * special.hyp1f1(-0.5, L, -theta ** 2 / 2)) ** 2
    return np.clip(xi, 1e-12, None)


def koay_theta(mean, var, n_coils: int = 1, iterations: int = 60):
    """SNR theta of each sample from its magnitude mean and variance: the root of Koay and
    Basser's ``theta^2 = xi(theta) (1 + mean^2 / var) - 2L``, by bisection (their fixed-point
    iteration crawls near the floor); 0 where the mean is at or below the noise floor."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.maximum(np.asarray(var, dtype=np.float64), 1e-300)
    L = int(n_coils)
    r2 = mean ** 2 / var
    floor = r2 <= (2 * L) / koay_xi(0.0, L) - 1  # at the floor: pure noise, theta = 0
    lo = np.zeros_like(r2)
    hi = np.sqrt(r2) + 2.0 * np.sqrt(L)           # h(hi) < 0: xi <= 2L + theta^2 - ...
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = koay_xi(mid, L) * (1 + r2) - 2 * L - mid ** 2 > 0
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    return np.where(floor, 0.0, 0.5 * (lo + hi))


def pooled_repeat_sigma(repeats: np.ndarray, n_coils: int = 1, magnitude: bool = True
                        ) -> tuple[float, dict]:
    """sigma from repeated measurements of the same signal: ``repeats`` (voxels, n), n >= 2.

    Per voxel: sample variance (ddof = 1), divided by the Koay-Basser xi of its SNR (when
    ``magnitude``); pooled by the median, divided by the median of chi^2_{n-1} / (n - 1).
    Returns ``(sigma, info)`` with the number of repeats and voxels used."""
    from scipy import stats

    repeats = np.asarray(repeats, dtype=np.float64)
    if repeats.ndim != 2 or repeats.shape[1] < 2:
        raise ValueError(f"repeats must be (voxels, n >= 2), got shape {repeats.shape}")
    repeats = repeats[np.all(np.isfinite(repeats), axis=1)]
    if repeats.shape[0] == 0:
        raise ValueError("no voxel with finite repeats to estimate sigma from")
    n = repeats.shape[1]
    mean = repeats.mean(1)
    var = repeats.var(1, ddof=1)
    keep = var > 0
    if not keep.any():
        raise ValueError("the repeats do not vary: no noise to measure (denoised or copied?)")
    mean, var = mean[keep], var[keep]
    xi = koay_xi(koay_theta(mean, var, n_coils), n_coils) if magnitude else np.ones_like(var)
    median_factor = stats.chi2.median(n - 1) / (n - 1)
    sigma2 = np.median(var / xi) / median_factor
    return float(np.sqrt(sigma2)), {"n_repeats": int(n), "n_voxels": int(var.size),
                                    "median_xi": float(np.median(xi))}


# ---- the series estimate ----------------------------------------------------------------------
def estimate_series_sigma(data: np.ndarray, bvals_smm2: np.ndarray, mask: np.ndarray, *,
                          method: str = "auto", n_coils: int = 1,
                          b0_threshold: float = B0_THRESHOLD_SMM2) -> tuple[float | None, dict]:
    """sigma of a DWI series ``data`` (X, Y, Z, T magnitude, signal units) with b-values
    ``bvals_smm2`` (T,) in s/mm^2 and a brain ``mask`` (X, Y, Z).

    Returns ``(sigma, info)``: sigma in signal units (None when ``auto`` finds no honest
    estimate) and ``info`` = ``{"method", "n_b0", "value", "n_coils", ...}`` (JSON-ready).
    ``method`` is one of :data:`SIGMA_METHODS` (see the module doc for when each is honest)."""
    from ..physics.noise import check_noise_model

    if method not in SIGMA_METHODS:
        raise ValueError(f"unknown sigma method {method!r}; choose from {list(SIGMA_METHODS)}")
    check_noise_model("ncchi", n_coils)
    data = np.asarray(data)
    bvals = np.asarray(bvals_smm2, dtype=np.float64).reshape(-1)
    mask = np.asarray(mask, dtype=bool)
    if data.ndim != 4 or data.shape[3] != bvals.size or data.shape[:3] != mask.shape:
        raise ValueError(f"data {data.shape}, bvals ({bvals.size},) and mask {mask.shape} "
                         "do not match (need X, Y, Z, T / T / X, Y, Z)")
    if not mask.any():
        raise ValueError("the mask is empty")
    b0 = bvals < b0_threshold
    n_b0 = int(b0.sum())
    info = {"n_b0": n_b0, "n_coils": int(n_coils)}
    outside = ~mask
    n_out = int(outside.sum())
    background = (np.count_nonzero(data[outside][:, 0]) if n_out else 0)
    has_background = (n_out >= MIN_BACKGROUND_VOXELS
                      and background >= MIN_BACKGROUND_FRACTION * n_out)
    if method == "auto":
        if n_b0 >= 2:
            method = "b0"
        elif has_background:
            method = "piesno"
        else:
            info.update(method="none", value=None, reason=(
                f"{n_b0} b0 volume(s) (the b0 spread needs >= 2) and no noisy background "
                "outside the mask (piesno needs one): sigma left to the fit (residuals of a "
                "Gaussian fit)"))
            return None, info
    if method == "b0":
        if n_b0 < 2:
            raise ValueError(f"sigma method b0 needs at least 2 b0 volumes, the series has {n_b0}")
        sigma, extra = pooled_repeat_sigma(data[mask][:, b0], n_coils)
        info.update(method="b0", value=sigma, n_voxels=extra["n_voxels"],
                    median_xi=extra["median_xi"])
        return sigma, info
    if n_out < MIN_BACKGROUND_VOXELS:
        raise ValueError(f"sigma method {method} needs a background: only {n_out} voxels lie "
                         "outside the mask")
    if method == "piesno":
        from dipy.denoise.noise_estimate import piesno

        sig, noise_mask = piesno(np.asarray(data, dtype=np.float64), N=int(n_coils),
                                 return_mask=True)
        sig = np.atleast_1d(np.asarray(sig, dtype=np.float64))
        per_slice = noise_mask.reshape(-1, noise_mask.shape[-1]).sum(0)
        good = np.isfinite(sig) & (sig > 0) & (per_slice > 0)
        if not good.any():
            raise ValueError("piesno found no pure-noise background voxels")
        sigma = float(np.median(sig[good]))
        info.update(method="piesno", value=sigma, n_slices=int(good.sum()),
                    n_noise_voxels=int(noise_mask.sum()))
        return sigma, info
    from dipy.denoise.noise_estimate import estimate_sigma

    sig = np.asarray(estimate_sigma(np.asarray(data, dtype=np.float64), N=int(n_coils)),
                     dtype=np.float64)
    sigma = float(np.median(sig[np.isfinite(sig) & (sig > 0)]))
    info.update(method="estimate_sigma", value=sigma, n_volumes=int(sig.size))
    return sigma, info


def normalised_sigma(sigma: float, s0: np.ndarray) -> np.ndarray:
    """``sigma / S0`` per voxel (the noise of the b0-normalised signal); NaN where S0 <= 0."""
    s0 = np.asarray(s0, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s0 > 0, float(sigma) / s0, np.nan)
