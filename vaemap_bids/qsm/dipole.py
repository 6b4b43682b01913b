"""The dipole kernel, zero-padding and the QSM forward model.

Conventions (README, "QSM"):

* The local field is ``f = F^-1[D(k) F[chi]]`` (both in ppm; ``f`` is delta-B / B0), with the
  Lorentz-corrected kernel ``D(k) = 1/3 - (k . b)^2 / |k|^2``.
* ``D(0) = 0`` (default): a uniform susceptibility makes no local field, so the mean of chi is
  not measured; maps are referenced afterwards (to the mean inside the brain mask, see
  :func:`vaemap_bids.qsm.inversion.reference`). ``D(0) = 1/3`` is available as ``d0=1/3``.
* B0 is along the scanner's (world) z axis. ``b`` and ``k`` are taken to voxel coordinates with
  the image affine (RAS+ as nibabel gives it, for any orientation: oblique, LAS, LPS, sheared):
  world position ``x = R i + t``, so a voxel-grid frequency ``kappa`` (cycles / voxel) is the
  world frequency ``k = R^-T kappa``. :func:`b0_direction_voxel` gives the unit B0 direction in
  the voxel axes (a rotation of the head relative to B0), which is what the kernel uses.
* Fields are computed on a zero-padded grid (``pad`` x the size on every axis, rounded up to a
  fast FFT size) so that the periodic FFT convolution does not wrap the field around.
"""
from __future__ import annotations

import numpy as np
from scipy import fft as sfft

#: Proton gyromagnetic ratio, rad / s / T.
GAMMA = 2.6752218744e8


def _rotation_scale(affine) -> tuple[np.ndarray, np.ndarray]:
    """``(R, zooms)``: the 3x3 linear part of ``affine`` and the voxel sizes (column norms)."""
    a = np.asarray(affine, dtype=float)
    r = a[:3, :3]
    zooms = np.linalg.norm(r, axis=0)
    if np.any(zooms <= 0) or not np.isfinite(r).all() or abs(np.linalg.det(r)) < 1e-12:
        raise ValueError("the image affine is singular or not finite")
    return r, zooms


def b0_direction_voxel(affine, b0_world=(0.0, 0.0, 1.0)) -> np.ndarray:
    """The unit B0 direction in the voxel axes (orthonormalised columns of the affine).

    For an axial RAS/LAS/LPS image this is ``(0, 0, +-1)`` (the sign does not matter: the kernel
    is quadratic in it); for an oblique one it is tilted."""
    r, zooms = _rotation_scale(affine)
    b = np.asarray(b0_world, dtype=float)
    b = b / np.linalg.norm(b)
    # voxel axis i has world direction r[:, i] / zooms[i]; with shear, use the metric-exact
    # form: b_vox = R^-1 b scaled to unit length in the physical metric
    q, _ = np.linalg.qr(r)
    # sign-fix q so that its columns point along r's columns
    signs = np.sign(np.sum(q * r, axis=0))
    signs[signs == 0] = 1
    q = q * signs
    out = q.T @ b
    return out / np.linalg.norm(out)


def padded_shape(shape, pad: float = 0.5) -> tuple[int, ...]:
    """The zero-padded FFT grid: ``ceil(n (1 + pad))`` on every axis, rounded up to a fast size."""
    if pad < 0:
        raise ValueError("pad must be >= 0")
    return tuple(int(sfft.next_fast_len(int(np.ceil(n * (1.0 + pad))), real=True)) for n in shape)


def pad_array(x: np.ndarray, shape) -> np.ndarray:
    """``x`` in the corner of a zero array of ``shape`` (undone by :func:`crop_array`)."""
    out = np.zeros(tuple(shape) + x.shape[3:], dtype=x.dtype)
    out[tuple(slice(0, n) for n in x.shape[:3])] = x
    return out


def crop_array(x: np.ndarray, shape) -> np.ndarray:
    return x[tuple(slice(0, n) for n in shape[:3])]


def kspace_world(shape, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World frequencies (cycles / mm) of a grid of ``shape`` with ``affine``: three arrays
    broadcastable to ``shape`` (the full, not half, spectrum)."""
    r, _ = _rotation_scale(affine)
    kappa = np.meshgrid(*[np.fft.fftfreq(int(n)) for n in shape], indexing="ij", sparse=True)
    rinv_t = np.linalg.inv(r).T
    return tuple(sum(rinv_t[a, i] * kappa[i] for i in range(3)) for a in range(3))


def dipole_kernel(shape, affine, b0_world=(0.0, 0.0, 1.0), d0: float = 0.0) -> np.ndarray:
    """``D(k) = 1/3 - (k . b)^2 / |k|^2`` on an FFT grid of ``shape`` (float64), with ``D(0) = d0``.

    ``affine`` is the image's (only its linear part matters); the padded grid shares it."""
    b = np.asarray(b0_world, dtype=float)
    b = b / np.linalg.norm(b)
    kx, ky, kz = kspace_world(shape, affine)
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    k2 = kx ** 2 + ky ** 2 + kz ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        d = 1.0 / 3.0 - kb ** 2 / k2
    d = np.broadcast_to(d, tuple(int(n) for n in shape)).copy()
    d[0, 0, 0] = d0
    return d


class DipoleOperator:
    """The forward model on the zero-padded grid of an image: ``op.forward(chi)`` is the local
    field (ppm) of ``chi`` (ppm); ``op.kernel`` is D on the padded grid."""

    def __init__(self, shape, affine, pad: float = 0.5, d0: float = 0.0,
                 b0_world=(0.0, 0.0, 1.0)):
        self.shape = tuple(int(n) for n in shape[:3])
        self.padded = padded_shape(self.shape, pad)
        self.affine = np.asarray(affine, dtype=float)
        self.d0 = float(d0)
        self.kernel = dipole_kernel(self.padded, affine, b0_world, d0)
        self.b0_voxel = b0_direction_voxel(affine, b0_world)

    def fft(self, x: np.ndarray) -> np.ndarray:
        return sfft.fftn(pad_array(np.asarray(x, dtype=float), self.padded), workers=-1)

    def ifft(self, xk: np.ndarray) -> np.ndarray:
        return crop_array(sfft.ifftn(xk, workers=-1).real, self.shape)

    def forward(self, chi: np.ndarray) -> np.ndarray:
        """The local field (ppm) of ``chi`` (ppm)."""
        return self.ifft(self.kernel * self.fft(chi))


def forward_field(chi, affine, pad: float = 0.5, d0: float = 0.0) -> np.ndarray:
    """The field (ppm, delta-B / B0) of a susceptibility map ``chi`` (ppm)."""
    return DipoleOperator(np.shape(chi), affine, pad=pad, d0=d0).forward(chi)


def sphere_field(points_mm, center_mm, radius_mm, delta_chi, b0_world=(0.0, 0.0, 1.0)):
    """The analytic Lorentz-corrected field (ppm) of a uniform sphere of ``delta_chi`` (ppm):
    ``delta_chi / 3 (a / r)^3 (3 cos^2 theta - 1)`` outside, 0 inside (theta from B0)."""
    p = np.asarray(points_mm, dtype=float) - np.asarray(center_mm, dtype=float)
    b = np.asarray(b0_world, dtype=float)
    b = b / np.linalg.norm(b)
    r = np.linalg.norm(p, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos2 = (p @ b) ** 2 / r ** 2
        out = delta_chi / 3.0 * (radius_mm / r) ** 3 * (3.0 * cos2 - 1.0)
    return np.where(r > radius_mm, out, 0.0)


__all__ = ["GAMMA", "b0_direction_voxel", "padded_shape", "pad_array", "crop_array",
           "kspace_world", "dipole_kernel", "DipoleOperator", "forward_field", "sphere_field"]
