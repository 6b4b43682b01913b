"""Read and check the gradient table of a DWI series: its ``.bval`` and ``.bvec``.

Every check raises with a message that names the file and the problem: ``FileNotFoundError`` for a
missing file, ``ValueError`` for a file that exists but is wrong. The CLI turns them into one line
and an exit code (66 and 65).

The gradient frame, once for the whole project. BIDS stores ``.bvec`` in FSL's convention: the
vectors are in the image's voxel axes, with the first axis flipped when the affine has a positive
determinant (FSL's "radiological" voxel frame). vaemap fits in that frame unchanged (every scalar
parameter is invariant to a fixed reflection of the gradient frame, and the ball-stick model sees
its direction in it); only the written ``dir`` map is converted, by :func:`bvec_to_voxel_axes`,
into the image's plain voxel axes (i, j, k), stated in its sidecar as ``OrientationEncoding``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..physics import Acquisition
from ..physics.acquisition import B0_THRESHOLD


def _read_numbers(path: Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read {what} file ({exc})") from None
    rows = [line.split() for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: {what} file is empty")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: {what} rows have different numbers of values "
                         f"({', '.join(str(len(r)) for r in rows)})")
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: {what} file has a value that is not a number") from None
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: {what} file has a non-finite value")
    return values


def read_bval(path) -> np.ndarray:
    """b-values (s/mm^2) of a BIDS ``.bval`` file: one row (or one column) of numbers."""
    values = _read_numbers(path, "bval")
    if values.ndim == 2 and 1 not in values.shape:
        raise ValueError(f"{path}: a bval file must be one row of numbers, found a "
                         f"{values.shape[0]} x {values.shape[1]} table")
    values = values.reshape(-1)
    if np.any(values < 0):
        raise ValueError(f"{path}: negative b-value {values.min():g}")
    return values


def read_bvec(path) -> np.ndarray:
    """Gradient directions of a BIDS ``.bvec`` file as a (T, 3) array (the file is 3 rows of T)."""
    values = _read_numbers(path, "bvec")
    if values.shape[0] == 3:
        return values.T
    if values.ndim == 2 and values.shape[1] == 3:  # some converters write T rows of 3
        return values
    raise ValueError(f"{path}: a bvec file must be 3 rows (x, y, z) of one value per volume, "
                     f"found {values.shape[0]} rows of {values.shape[1]}")


def load_acquisition(bval_path, bvec_path, n_volumes: int | None = None) -> Acquisition:
    """The acquisition of a series, checked: counts agree with each other and with the image,
    directions of diffusion-weighted volumes are unit vectors, shells are grouped with the
    tolerance of :class:`~vaemap_bids.physics.Acquisition`."""
    bvals = read_bval(bval_path)
    bvecs = read_bvec(bvec_path)
    if not np.any(bvals < B0_THRESHOLD * 1e3):
        raise ValueError(f"{bval_path}: no b0 volume (b < {B0_THRESHOLD * 1e3:.0f} s/mm^2) to "
                         "normalise the signal by")
    if bvals.size != bvecs.shape[0]:
        raise ValueError(f"{bvec_path}: {bvecs.shape[0]} gradient directions but {bval_path} "
                         f"has {bvals.size} b-values")
    if n_volumes is not None and bvals.size != n_volumes:
        raise ValueError(f"{bval_path}: {bvals.size} b-values but the image has {n_volumes} "
                         "volumes")
    try:
        acq = Acquisition.from_smm2(bvals, bvecs)
    except ValueError as exc:
        raise ValueError(f"{bvec_path}: {exc}") from None
    return acq


def bvec_to_voxel_axes(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Vectors (..., 3) of the ``.bvec`` frame -> the image's voxel axes (i, j, k): the ``.bvec``
    frame is the voxel frame with the first axis flipped when ``det(affine) > 0``."""
    out = np.array(vectors, dtype=np.float32, copy=True)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        out[..., 0] = -out[..., 0]
    return out
