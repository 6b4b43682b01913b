"""From multi-echo phase to the local field: phase scaling, Laplacian unwrapping, the weighted
multi-echo field fit (ppm), the brain mask, and V-SHARP background-field removal."""
from __future__ import annotations

import logging

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .dipole import GAMMA, crop_array, pad_array, padded_shape

log = logging.getLogger("vaemap.qsm")


# ---- phase units ----------------------------------------------------------------------------

def phase_scale(phase: np.ndarray, tol: float = 1e-3) -> tuple[float, float, str]:
    """``(scale, offset, units)`` taking ``phase`` to radians as ``phase * scale + offset``.

    Data already within [-pi, pi] (to ``tol``) are radians (scale 1). Integer data are scanner
    units: their span is the smallest power of two holding the data range (4096 for 0..4095,
    8192 for Siemens' -4096..4095), starting at -span/2 when the data go negative, else at 0,
    and it is mapped linearly onto [-pi, pi). ValueError for non-finite data, or data that are
    neither (real numbers outside [-pi, pi])."""
    finite = np.isfinite(phase)
    if not finite.all():
        raise ValueError("the phase image has NaN or Inf values")
    lo, hi = float(phase.min()), float(phase.max())
    if lo >= -np.pi - tol and hi <= np.pi + tol:
        return 1.0, 0.0, "rad"
    if hi - lo <= 0:
        raise ValueError("the phase image is constant")
    # integer data: the span [lo, hi] covers one full cycle of 2 pi minus one step
    is_integer = np.allclose(phase[::7], np.round(phase[::7]))
    if not is_integer:
        raise ValueError(f"the phase image is neither in radians (within [-pi, pi]) nor in "
                         f"integer scanner units (values {lo:g}..{hi:g} are not integers)")
    # the scanner's span: the power of two holding the data (4096, 8192, ...), starting at
    # -span/2 when the data go negative (Siemens: -4096..4095), else at 0 (0..4095)
    span = float(2 ** int(np.ceil(np.log2(hi - lo + 1.0))))
    if lo < 0 and hi > span / 2 - 1:
        span *= 2
    lo = -span / 2 if lo < 0 else 0.0
    scale = 2.0 * np.pi / span
    return scale, -np.pi - lo * scale, "integer"


def to_radians(phase: np.ndarray) -> np.ndarray:
    """``phase`` (radians or scanner integer units) in radians, wrapped into [-pi, pi)."""
    scale, offset, _ = phase_scale(phase)
    return wrap(np.asarray(phase, dtype=float) * scale + offset)


def wrap(phi):
    return (np.asarray(phi) + np.pi) % (2.0 * np.pi) - np.pi


# ---- unwrapping -----------------------------------------------------------------------------

def _laplacian_eigen(shape, zooms) -> np.ndarray:
    """Eigenvalues of the 7-point discrete Laplacian (periodic) on ``shape``."""
    out = np.zeros(shape)
    for axis, (n, h) in enumerate(zip(shape, zooms)):
        k = np.fft.fftfreq(n)
        lam = (2.0 * np.cos(2.0 * np.pi * k) - 2.0) / h ** 2
        out = out + lam.reshape([-1 if i == axis else 1 for i in range(3)])
    return out


def _poisson_fft(rhs: np.ndarray, zooms) -> np.ndarray:
    eig = _laplacian_eigen(rhs.shape, zooms)
    eig[0, 0, 0] = 1.0
    out = sfft.fftn(rhs, workers=-1) / eig
    out[0, 0, 0] = 0.0
    return sfft.ifftn(out, workers=-1).real


def laplacian_unwrap(phase: np.ndarray, zooms=(1.0, 1.0, 1.0), mask: np.ndarray | None = None,
                     max_iter: int = 200, tol: float = 1e-6, pad: float = 0.25) -> np.ndarray:
    """Least-squares (Laplacian, Poisson) unwrapping of a 3-D wrapped phase (radians).

    The Laplacian of the unwrapped phase is taken from the wrapped voxel-to-voxel differences
    (exact where the true phase changes by less than pi between neighbours). Without a mask the
    Poisson equation is solved with FFTs on a zero-padded grid. With a ``mask`` (the brain: where
    the phase is reliable) only the differences between two voxels of the mask count: the
    weighted least-squares problem ``min sum_(i~j in mask) (phi_i - phi_j - wrap(psi_i -
    psi_j))^2`` is solved by conjugate gradients preconditioned with the FFT Poisson solver
    (Ghiglia & Romero 1994), which is exact for clean data inside the mask whatever the phase
    does outside it. The constant is then chosen so that the result agrees with the wrapped
    input modulo 2 pi; outside the mask the result is 0."""
    psi = np.asarray(phase, dtype=float)
    shape = psi.shape[:3]
    if mask is None:
        big = padded_shape(shape, pad)
        p = pad_array(psi, big)
        lap = np.zeros(big)
        for axis, h in enumerate(zooms):
            lap += (wrap(np.roll(p, -1, axis) - p) - wrap(p - np.roll(p, 1, axis))) / h ** 2
        return crop_array(_poisson_fft(lap, zooms), shape)
    m = mask.astype(bool)
    # edge weights: 1 where a voxel and its +1 neighbour along an axis are both in the mask
    weights, diffs = [], []
    for axis in range(3):
        nb = np.roll(m, -1, axis)
        w = (m & nb).astype(float)
        idx = [slice(None)] * 3
        idx[axis] = slice(-1, None)
        w[tuple(idx)] = 0.0          # no edge across the border
        weights.append(w / zooms[axis] ** 2)
        diffs.append(wrap(np.roll(psi, -1, axis) - psi))

    def div_w(grad_list):
        out = np.zeros(shape)
        for axis, g in enumerate(grad_list):
            wg = weights[axis] * g
            out += wg - np.roll(wg, 1, axis)
        return -out      # so that the operator below is positive semi-definite

    def op(x):
        return div_w([np.roll(x, -1, a) - x for a in range(3)])

    b = div_w(diffs)
    x = np.zeros(shape)
    r = b - op(x)

    def precond(v):
        return -_poisson_fft(v, zooms)

    z = precond(r)
    pdir = z.copy()
    rz = float((r * z).sum())
    b_norm = np.linalg.norm(b) or 1.0
    for _ in range(int(max_iter)):
        ap = op(pdir)
        denom = float((pdir * ap).sum())
        if denom <= 0:
            break
        alpha = rz / denom
        x += alpha * pdir
        r -= alpha * ap
        if np.linalg.norm(r) / b_norm < tol:
            break
        z = precond(r)
        rz_new = float((r * z).sum())
        pdir = z + (rz_new / rz) * pdir
        rz = rz_new
    if m.any():
        x += np.angle(np.exp(1j * (psi[m] - x[m])).sum())
    return np.where(m, x, 0.0)


def unwrap_echoes(phases: np.ndarray, zooms, method: str = "laplacian",
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Unwrap every echo of a 4-D phase (x, y, z, echo) in radians.

    ``laplacian`` (default): :func:`laplacian_unwrap` per echo (inside ``mask`` when given);
    ``skimage``: scikit-image's
    3-D quality-guided path-following unwrapper (Herraez et al. 2002) inside ``mask``."""
    out = np.empty(phases.shape, dtype=float)
    for e in range(phases.shape[3]):
        if method == "laplacian":
            out[..., e] = laplacian_unwrap(phases[..., e], zooms, mask)
        elif method == "skimage":
            from skimage.restoration import unwrap_phase
            data = np.ma.masked_array(phases[..., e], mask=None if mask is None else ~mask)
            out[..., e] = np.ma.filled(unwrap_phase(data, seed=0), 0.0)
        else:
            raise ValueError(f"unknown unwrapping method {method!r}; use laplacian or skimage")
    return out


# ---- multi-echo field fit -------------------------------------------------------------------

def multi_echo_field(magnitude: np.ndarray, phase: np.ndarray, echo_times_s, b0_tesla: float,
                     mask: np.ndarray | None = None, zooms=(1.0, 1.0, 1.0),
                     unwrap: str = "laplacian") -> tuple[np.ndarray, np.ndarray]:
    """The total field (ppm) and its noise standard deviation (ppm) from multi-echo data.

    1. A first estimate ``omega0`` from the echo-to-echo phase difference, which wraps far less
       than any echo and carries no receiver phase: the angle of the magnitude-weighted sum of
       ``S_{n+1} conj(S_n)`` (all consecutive pairs when the echoes are evenly spaced, else the
       first pair), unwrapped in 3-D (:func:`unwrap_echoes`) and divided by the echo spacing.
    2. The weighted multi-echo fit: the residual phase of each echo against the first,
       ``q_n = angle(S_n conj(S_1) exp(-i omega0 (TE_n - TE_1)))``, small and so free of wraps,
       is fitted by least squares through the origin in ``TE_n - TE_1`` with weights
       ``|S_n|^2 |S_1|^2 / (|S_n|^2 + |S_1|^2)`` (the inverse variance of the phase difference);
       ``omega = omega0 + delta omega``.

    With one echo, the phase itself is unwrapped and divided by TE (a receiver phase of 0 is
    assumed: warn the user). The noise is the weighted residual of the fit (median over the
    mask; three echoes or more), else the Rayleigh background of the first magnitude outside
    the mask. Fields are delta-B / B0 in ppm: ``omega / (gamma B0) 1e6``."""
    te = np.asarray(echo_times_s, dtype=float)
    mag = np.asarray(magnitude, dtype=float)
    ph = np.asarray(phase, dtype=float)
    m = np.ones(mag.shape[:3], bool) if mask is None else mask.astype(bool)
    scale = 1e6 / (GAMMA * float(b0_tesla))
    sig = mag * np.exp(1j * ph)
    n = te.size
    if n == 1:
        phi = unwrap_echoes(ph[..., :1], zooms, unwrap, m)[..., 0]
        omega = phi / te[0]
        mag0 = mag[..., 0]
        outside = mag0[~m] if (~m).any() else mag0.ravel()
        s = float(np.mean(outside) / np.sqrt(np.pi / 2.0))
        sigma = s / np.maximum(mag0, 1e-12) / te[0] * scale
        return omega * scale, sigma
    dte = np.diff(te)
    even = np.allclose(dte, dte[0], rtol=1e-2)
    pairs = range(n - 1) if even else range(1)
    prod = sum(sig[..., k + 1] * np.conj(sig[..., k]) for k in pairs)
    dphi = unwrap_echoes(np.angle(prod)[..., None], zooms, unwrap, m)[..., 0]
    omega0 = dphi / dte[0]
    tau = te[1:] - te[0]
    q = np.angle(sig[..., 1:] * np.conj(sig[..., :1]) * np.exp(-1j * omega0[..., None] * tau))
    m1 = mag[..., :1] ** 2
    mn = mag[..., 1:] ** 2
    w = m1 * mn / (m1 + mn + 1e-30)
    sw = (w * tau ** 2).sum(-1) + 1e-30
    domega = (w * tau * q).sum(-1) / sw
    omega = omega0 + domega
    if n >= 3:
        resid = q - domega[..., None] * tau
        s2 = (w * resid ** 2).sum(-1) / (n - 2)
        s2 = float(np.median(s2[m])) if m.any() else float(np.median(s2))
    else:
        mag0 = mag[..., 0]
        outside = mag0[~m] if (~m).any() else mag0.ravel()
        s2 = float(np.mean(outside) / np.sqrt(np.pi / 2.0)) ** 2
    sigma = np.sqrt(s2 / sw) * scale
    return omega * scale, sigma


# ---- brain mask -----------------------------------------------------------------------------

def magnitude_mask(magnitude: np.ndarray, erode: int = 1) -> np.ndarray:
    """A brain mask from the root-sum-of-squares magnitude over echoes: Otsu threshold, the
    largest connected component, holes filled, eroded by ``erode`` voxels."""
    from skimage.filters import threshold_otsu
    mag = np.asarray(magnitude, dtype=float)
    rss = np.sqrt((mag ** 2).sum(-1)) if mag.ndim == 4 else mag
    finite = np.isfinite(rss)
    if not finite.any() or np.ptp(rss[finite]) <= 0:
        raise ValueError("the magnitude image is constant: no brain mask can be computed")
    thr = threshold_otsu(rss[finite])
    mask = rss > thr
    labels, n = ndimage.label(mask)
    if n == 0:
        raise ValueError("the magnitude image has no voxel above its Otsu threshold")
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    mask = labels == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_fill_holes(mask)
    if erode > 0:
        mask = ndimage.binary_erosion(mask, iterations=int(erode))
    return mask


# ---- background-field removal ---------------------------------------------------------------

def _sphere_kernel_k(shape, zooms, radius_mm: float) -> np.ndarray:
    """The FFT of a normalised sphere (spherical mean value kernel) of ``radius_mm``."""
    rad = [int(np.ceil(radius_mm / z)) for z in zooms]
    grids = np.meshgrid(*[np.arange(-r, r + 1) * z for r, z in zip(rad, zooms)], indexing="ij")
    ball = (sum(g ** 2 for g in grids) <= radius_mm ** 2).astype(float)
    ball /= ball.sum()
    kern = np.zeros(shape)
    idx = np.meshgrid(*[np.arange(-r, r + 1) % n for r, n in zip(rad, shape)], indexing="ij")
    kern[tuple(idx)] = ball
    return sfft.fftn(kern, workers=-1).real


def _erode_sphere(mask: np.ndarray, zooms, radius_mm: float) -> np.ndarray:
    rad = [int(np.ceil(radius_mm / z)) for z in zooms]
    grids = np.meshgrid(*[np.arange(-r, r + 1) * z for r, z in zip(rad, zooms)], indexing="ij")
    ball = sum(g ** 2 for g in grids) <= radius_mm ** 2
    return ndimage.binary_erosion(mask, structure=ball)


def vsharp(field: np.ndarray, mask: np.ndarray, zooms, radii_mm=(8, 6, 4, 2, 1),
           threshold: float = 0.05, pad: float = 0.25,
           deconvolve: str = "largest") -> tuple[np.ndarray, np.ndarray]:
    """V-SHARP (Wu et al. 2012; Li et al. 2011): the local field and its (eroded) mask.

    The background field is harmonic inside the brain, so a spherical mean filter leaves it
    unchanged: ``(delta - S_r) * field`` keeps only the local part. Each voxel uses the largest
    radius whose sphere fits in the mask; the result is deconvolved by ``1 - S_r`` of the largest
    radius (``deconvolve="largest"``, as STI Suite's V-SHARP; or ``"smallest"``), truncated where
    it is below ``threshold``, and kept in the mask eroded by the smallest radius."""
    radii = sorted((float(r) for r in radii_mm), reverse=True)
    shape = field.shape
    big = padded_shape(shape, pad)
    m = mask.astype(bool)
    fk = sfft.fftn(pad_array(np.where(m, field, 0.0), big), workers=-1)
    mk = sfft.fftn(pad_array(m.astype(float), big), workers=-1)
    hp = np.zeros(shape)
    done = np.zeros(shape, bool)
    for r in radii:
        sk = _sphere_kernel_k(big, zooms, r)
        eroded = _erode_sphere(m, zooms, r) & ~done
        filt = crop_array(sfft.ifftn((1.0 - sk) * fk, workers=-1).real, shape)
        hp[eroded] = filt[eroded]
        done |= eroded
    del mk
    final = done & _erode_sphere(m, zooms, radii[-1])
    sk = _sphere_kernel_k(big, zooms, radii[0] if deconvolve == "largest" else radii[-1])
    inv = 1.0 - sk
    keep = np.abs(inv) > threshold
    hk = sfft.fftn(pad_array(np.where(final, hp, 0.0), big), workers=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lk = np.where(keep, hk / inv, 0.0)
    local = crop_array(sfft.ifftn(lk, workers=-1).real, shape)
    local = np.where(final, local, 0.0)
    return local, final


def pdf(field: np.ndarray, mask: np.ndarray, affine, weight: np.ndarray | None = None,
        max_iter: int = 100, tol: float = 1e-4, pad: float = 0.5,
        d0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Projection onto dipole fields (Liu et al. 2011): the background field is the field of
    the susceptibility outside the brain mask (on the zero-padded grid) that best explains the
    measured field inside it, ``min_x || W M (D (1 - M) x - f) ||^2``, solved by conjugate
    gradients on the normal equations; the local field is what is left. Returns ``(local,
    mask)`` (the mask is not eroded)."""
    from .dipole import DipoleOperator
    op = DipoleOperator(field.shape, affine, pad=pad, d0=d0)
    big, shape = op.padded, op.shape
    m = pad_array(mask.astype(float), big)
    out = 1.0 - m
    w2 = pad_array(np.where(mask, 1.0 if weight is None else weight, 0.0) ** 2, big)
    f = pad_array(np.where(mask, field, 0.0), big)
    d = op.kernel

    def a(x):
        return sfft.ifftn(d * sfft.fftn(out * x, workers=-1), workers=-1).real

    def at(y):  # D is real and symmetric: A^T = (1 - M) D
        return out * sfft.ifftn(d * sfft.fftn(y, workers=-1), workers=-1).real

    def normal(x):
        return at(w2 * a(x))

    b = at(w2 * f)
    x = np.zeros(big)
    r = b.copy()
    pdir = r.copy()
    rr = float((r * r).sum())
    b_norm = np.sqrt(rr) or 1.0
    for _ in range(int(max_iter)):
        ap = normal(pdir)
        alpha = rr / float((pdir * ap).sum())
        x += alpha * pdir
        r -= alpha * ap
        rr_new = float((r * r).sum())
        if np.sqrt(rr_new) / b_norm < tol:
            break
        pdir = r + (rr_new / rr) * pdir
        rr = rr_new
    background = crop_array(a(x), shape)
    local = np.where(mask, field - background, 0.0)
    return local, mask.astype(bool)


__all__ = ["phase_scale", "to_radians", "wrap", "laplacian_unwrap", "unwrap_echoes",
           "multi_echo_field", "magnitude_mask", "vsharp", "pdf"]
