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

Other gradient tables are converted into that one frame when they are read (QSIPrep input,
:mod:`vaemap_bids.dataset.qsiprep`); with ``R`` the image affine's 3x3 part with unit columns
(voxel axes in world coordinates) a vector ``v`` in the voxel axes is ``w = R v`` in the world:

- QSIPrep's ``.bvec``: the image's plain voxel axes (i, j, k), without FSL's x flip. QSIPrep
  writes LPS+ images, where voxel axes and LPS world axes coincide; its own ``.b`` is the
  ``.bvec`` with x and y negated and its ``.b_table.txt`` repeats the ``.bvec`` numbers, and
  QSIPrep's docs warn that MRtrix (which applies the FSL flip, since det > 0) misreads it.
  :func:`voxel_to_bvec_frame` applies the flip.
- MRtrix ``.b`` (rows ``x y z b``): the scanner (world, RAS+) frame: ``v = R^-1 w``, then the
  flip (:func:`world_to_bvec_frame`); an oblique image rotates every vector.
- QSIPrep's ``.b_table.txt`` (DSI Studio, rows ``b x y z``): the LPS+ world frame, i.e. RAS+ with
  x and y negated, then as ``.b``.
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


def voxel_to_bvec_frame(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Vectors (..., 3) in the image's plain voxel axes (i, j, k) -> the ``.bvec`` (FSL) frame:
    x flipped when ``det(affine) > 0`` (the flip is its own inverse)."""
    return bvec_to_voxel_axes(vectors, affine).astype(np.float64)


def world_to_bvec_frame(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Vectors (T, 3) in the world (scanner, RAS+) frame -> the ``.bvec`` frame of an image with
    ``affine`` (oblique allowed): into the voxel axes by the inverse of the affine's unit-column
    rotation (zooms removed), then FSL's x flip when ``det(affine) > 0``. Zero vectors (b0) stay 0."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    rot = a / np.linalg.norm(a, axis=0)
    vox = np.linalg.solve(rot, np.asarray(vectors, dtype=np.float64).T).T
    norms = np.linalg.norm(vox, axis=1, keepdims=True)
    given = np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1, keepdims=True)
    vox = np.where(norms > 1e-12, vox / np.maximum(norms, 1e-12) * given, 0.0)
    return voxel_to_bvec_frame(vox, affine)


#: LPS+ world coordinates -> RAS+ (and back): x and y change sign.
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def read_mrtrix_b(path) -> tuple[np.ndarray, np.ndarray]:
    """(b-values in s/mm^2, directions (T, 3) in the world RAS+ frame) of an MRtrix ``.b`` file
    (one row ``x y z b`` per volume)."""
    values = _read_numbers(path, "MRtrix gradient table (.b)")
    if values.ndim != 2 or values.shape[1] != 4:
        raise ValueError(f"{path}: an MRtrix .b file has one row 'x y z b' per volume, found "
                         f"rows of {values.shape[-1]} values")
    if np.any(values[:, 3] < 0):
        raise ValueError(f"{path}: negative b-value {values[:, 3].min():g}")
    return values[:, 3].copy(), values[:, :3].copy()


def read_dsistudio_btable(path) -> tuple[np.ndarray, np.ndarray]:
    """(b-values in s/mm^2, directions (T, 3) in the world RAS+ frame) of QSIPrep's DSI Studio
    ``.b_table.txt`` (one row ``b x y z`` per volume, vectors in LPS+ world coordinates)."""
    values = _read_numbers(path, "DSI Studio b-table (.b_table.txt)")
    if values.ndim != 2 or values.shape[1] != 4:
        raise ValueError(f"{path}: a b_table.txt has one row 'b x y z' per volume, found rows "
                         f"of {values.shape[-1]} values")
    if np.any(values[:, 0] < 0):
        raise ValueError(f"{path}: negative b-value {values[:, 0].min():g}")
    return values[:, 0].copy(), values[:, 1:] * LPS_TO_RAS


def fsl_gradient_text(bvals_smm2: np.ndarray, bvecs: np.ndarray) -> tuple[str, str]:
    """The text of a ``.bval`` (one row) and ``.bvec`` (3 rows) file."""
    bval = " ".join(f"{b:.6g}" for b in np.asarray(bvals_smm2, dtype=np.float64)) + "\n"
    bvec = "\n".join(" ".join(f"{v:.8f}" for v in row)
                     for row in np.asarray(bvecs, dtype=np.float64).T) + "\n"
    return bval, bvec
