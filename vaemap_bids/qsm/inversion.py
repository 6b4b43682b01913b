"""Dipole inversion: truncated k-space division (TKD) and total-variation-regularised
inversion (ADMM), plus the reference of a chi map. Deep Image Prior is in :mod:`.dip`."""
from __future__ import annotations

import numpy as np
from scipy import fft as sfft

from .dipole import DipoleOperator


def reference(chi: np.ndarray, mask: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """``chi`` minus its mean over ``region`` (default: the whole ``mask``), 0 outside ``mask``.

    With ``D(0) = 0`` the mean of chi is not measured, so every map is given relative to a
    reference region; vaemap's default is the brain mask (the sidecars say which)."""
    m = mask.astype(bool)
    ref = m if region is None else (region.astype(bool) & m)
    return np.where(m, chi - float(chi[ref].mean()), 0.0)


def tkd(local_field: np.ndarray, mask: np.ndarray, affine, threshold: float = 0.19,
        pad: float = 0.5, d0: float = 0.0) -> np.ndarray:
    """Truncated k-space division (Shmueli et al. 2009; Wharton et al. 2010):
    ``chi = F^-1[F[f] / D]`` with ``1/D`` replaced by ``sign(D) / threshold`` where
    ``|D| < threshold`` (and 0 at k = 0). Returns chi (ppm), referenced to the mask mean."""
    op = DipoleOperator(local_field.shape, affine, pad=pad, d0=d0)
    d = op.kernel
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(np.abs(d) >= threshold, 1.0 / d, np.sign(d) / threshold)
    inv[0, 0, 0] = 0.0
    chi = op.ifft(inv * op.fft(np.where(mask, local_field, 0.0)))
    return reference(chi, mask)


def _gradient_k(shape, zooms) -> list[np.ndarray]:
    """Forward-difference operators in k-space (periodic), one per axis."""
    out = []
    for axis, (n, h) in enumerate(zip(shape, zooms)):
        k = np.fft.fftfreq(n)
        g = (np.exp(2j * np.pi * k) - 1.0) / h
        out.append(g.reshape([-1 if i == axis else 1 for i in range(3)]))
    return out


def tv_admm(local_field: np.ndarray, mask: np.ndarray, affine, lam: float = 3e-4,
            rho: float | None = None, mu: float = 1.0, weight: np.ndarray | None = None, max_iter: int = 200,
            tol: float = 1e-3, pad: float = 0.5, d0: float = 0.0, zooms=None,
            history: list | None = None, dtype: str = "float32") -> np.ndarray:
    """Total-variation-regularised dipole inversion by ADMM (after Bilgic et al. 2014 and the
    weighted linear FANSI of Milovic et al. 2018):

        min_chi  1/2 || W (M (D chi) - f) ||^2 + lam || grad chi ||_1

    with ``W`` the data weights inside the brain mask ``M`` (default: 1 in the mask, 0 outside).
    Splitting ``y = D chi`` and ``z = grad chi`` gives closed-form updates: chi in k-space
    (on the zero-padded grid), y voxelwise, z by soft thresholding (anisotropic TV). ``rho``
    (the penalty of ``z = grad chi``) defaults to ``100 lam`` and ``mu`` (that of ``y = D chi``) to 1,
    as FANSI's. Stops when the relative change of chi falls below ``tol``.
    ``dtype`` is the working precision. Returns chi (ppm), referenced to the mask mean."""
    op = DipoleOperator(local_field.shape, affine, pad=pad, d0=d0)
    shape, big = op.shape, op.padded
    if zooms is None:
        zooms = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    rho = 100.0 * lam if rho is None else float(rho)
    mu = float(mu)
    m = mask.astype(bool)
    w = np.where(m, 1.0, 0.0) if weight is None else np.where(m, weight, 0.0)
    w2 = w ** 2
    f = np.where(m, local_field, 0.0)
    d = op.kernel
    grads = _gradient_k(big, zooms)
    denom = mu * np.abs(d) ** 2 + rho * sum(np.abs(g) ** 2 for g in grads)
    denom[0, 0, 0] = max(denom[0, 0, 0], 1e-12)

    dt = np.float32 if dtype == "float32" else np.float64

    def to_k(x):
        return sfft.fftn(x.astype(dt, copy=False), workers=-1)

    def to_x(xk):
        return sfft.ifftn(xk, workers=-1).real

    def grad(x, axis):      # forward difference, periodic: the k-space operator g above
        return (np.roll(x, -1, axis) - x) / zooms[axis]

    def grad_t(v, axis):    # its adjoint
        return (np.roll(v, 1, axis) - v) / zooms[axis]

    d = d.astype(dt)
    denom = denom.astype(dt)
    chi = np.zeros(big, dt)
    y = np.zeros(big, dt)
    uy = np.zeros(big, dt)
    z = [np.zeros(big, dt) for _ in grads]
    uz = [np.zeros(big, dt) for _ in grads]
    fpad = np.zeros(big, dt)
    fpad[tuple(slice(0, n) for n in shape)] = f
    w2pad = np.zeros(big, dt)
    w2pad[tuple(slice(0, n) for n in shape)] = w2
    for it in range(int(max_iter)):
        tv_part = sum(grad_t(zz - uu, a) for a, (zz, uu) in enumerate(zip(z, uz)))
        chik = (mu * d * to_k(y - uy) + rho * to_k(tv_part)) / denom
        chi_new = to_x(chik)
        dchi = to_x(d * chik)
        # y update: (W^2 + mu) y = W^2 f + mu (D chi + uy), voxelwise
        y = (w2pad * fpad + mu * (dchi + uy)) / (w2pad + mu)
        uy += dchi - y
        for a in range(3):
            v = grad(chi_new, a) + uz[a]
            z[a] = np.sign(v) * np.maximum(np.abs(v) - lam / rho, 0.0)
            uz[a] = v - z[a]
        change = float(np.linalg.norm(chi_new - chi) / max(np.linalg.norm(chi_new), 1e-12))
        chi = chi_new
        if history is not None:
            history.append(change)
        if it > 2 and change < tol:
            break
    return reference(chi[tuple(slice(0, n) for n in shape)], m)


__all__ = ["reference", "tkd", "tv_admm"]
