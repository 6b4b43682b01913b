"""Read and check one DWI series: the NIfTI image, its ``.bval`` and its ``.bvec``.

Every check raises with a message that names the file and the problem: ``FileNotFoundError`` for a
missing file, ``ValueError`` for a file that exists but is wrong. The CLI turns them into one line
and an exit code (66 and 65).

Gradient convention. BIDS stores ``.bvec`` in FSL's convention: the vectors are in the image's
voxel axes, with the first axis flipped when the affine has a positive determinant (FSL's
"radiological" voxel frame). vaemap keeps that frame untouched: every scalar parameter is
invariant to a fixed reflection of the gradient frame, and the ball-stick direction map (``dir``)
comes out in the same frame as the ``.bvec`` file, like FSL's ``dyads``. Because the frame follows
the storage order, flipping an image's first axis (LAS <-> RAS storage) leaves a correct ``.bvec``
unchanged. :func:`bvec_frame_to_world` converts vectors of that frame to world (RAS+mm) axes.
"""
from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from ..physics import Acquisition
from ..physics.acquisition import B0_THRESHOLD

#: Bytes read per chunk when streaming through an image (keeps memory at one volume or less).
_CHUNK = 1 << 24


@dataclass(frozen=True)
class ImageInfo:
    """What the header of a DWI image says."""

    path: str
    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    affine: np.ndarray
    dtype: str

    @property
    def n_volumes(self) -> int:
        return int(self.shape[3])

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.zooms[:3])) / 1000.0


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


def read_image_info(path) -> ImageInfo:
    """Header facts of a 4-D DWI image; raises for a missing, unreadable or non-4-D file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken headers
        raise ValueError(f"{path}: not a readable NIfTI image ({_reason(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{path}: not a NIfTI image")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4 or shape[3] < 2:
        raise ValueError(f"{path}: a DWI series must be a 4-D image with one volume per "
                         f"gradient, got shape {shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{path}: the image affine is singular or not finite")
    return ImageInfo(str(path), shape, tuple(float(z) for z in img.header.get_zooms()[:3]),
                     affine, str(img.get_data_dtype()))


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass
class ImageScan:
    """One streaming pass over a DWI image: the mean b0 and the voxels with a non-finite value."""

    mean_b0: np.ndarray      # 3-D float32
    nonfinite: np.ndarray    # 3-D bool: any volume has NaN/Inf in that voxel


def iter_volumes(path, info: ImageInfo | None = None):
    """Yield ``(index, volume)`` of a 4-D NIfTI one volume at a time, decompressing once.

    Reading the whole stream is also the integrity check: a truncated or corrupt gzip raises
    ``ValueError`` naming the file (gzip verifies its CRC and length at the end)."""
    info = info or read_image_info(path)
    proxy = nib.load(str(path)).dataobj  # nibabel's ArrayProxy knows the real data offset
    dtype = proxy.dtype
    slope = float(np.asarray(proxy.slope).reshape(-1)[0])
    inter = float(np.asarray(proxy.inter).reshape(-1)[0])
    slope = 1.0 if not np.isfinite(slope) or slope == 0 else slope
    inter = 0.0 if not np.isfinite(inter) else inter
    order = getattr(proxy, "order", "F")
    vol_shape = info.shape[:3]
    vol_bytes = int(np.prod(vol_shape)) * dtype.itemsize
    try:
        with Opener(str(path), "rb") as fobj:
            fobj.seek(int(proxy.offset))
            for index in range(info.n_volumes):
                buf = _read_exact(fobj, vol_bytes)
                if len(buf) != vol_bytes:
                    raise ValueError(f"{path}: the image is truncated: volume {index} of "
                                     f"{info.n_volumes} is incomplete")
                vol = np.frombuffer(buf, dtype=dtype).reshape(vol_shape, order=order)
                vol = vol.astype(np.float32)
                if slope != 1.0 or inter != 0.0:
                    vol = vol * np.float32(slope) + np.float32(inter)
                yield index, vol
            # drain the rest so that gzip checks its CRC and length trailer
            while fobj.read(_CHUNK):
                pass
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise ValueError(f"{path}: corrupt or truncated image file ({_reason(exc)})") from None


def _read_exact(fobj, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:
        chunk = fobj.read(min(left, _CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def scan_image(path, acq: Acquisition, info: ImageInfo | None = None) -> ImageScan:
    """Stream through the image once: integrity, non-finite voxels and the mean b0.

    Raises ``ValueError`` when the file is corrupt or when every b0 volume is zero (nothing to
    normalise by)."""
    info = info or read_image_info(path)
    if acq.n_volumes != info.n_volumes:
        raise ValueError(f"{path}: {info.n_volumes} volumes but the gradient table has "
                         f"{acq.n_volumes}")
    b0 = acq.b0_mask
    sum_b0 = np.zeros(info.shape[:3], dtype=np.float64)
    n_b0 = np.zeros(info.shape[:3], dtype=np.int32)
    nonfinite = np.zeros(info.shape[:3], dtype=bool)
    for index, vol in iter_volumes(path, info):
        finite = np.isfinite(vol)
        nonfinite |= ~finite
        if b0[index]:
            sum_b0 += np.where(finite, vol, 0.0)
            n_b0 += finite
    # mean over the finite b0 values, so that a voxel with one bad value still looks like its
    # tissue to the masking (it is excluded from the fit, and counted, afterwards)
    mean_b0 = (sum_b0 / np.maximum(n_b0, 1)).astype(np.float32)
    if not np.any(mean_b0 > 0):
        raise ValueError(f"{path}: every b0 volume is zero (or non-finite): the signal cannot be "
                         "normalised")
    return ImageScan(mean_b0, nonfinite)


def bvec_frame_to_world(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Rotate (..., 3) vectors from the BIDS/FSL bvec frame of an image into world (RAS+) axes.

    The bvec frame is the voxel frame with the first axis flipped when ``det(affine) > 0``; the
    world direction is then ``R @ v`` with ``R`` the affine's rotation (voxel sizes removed)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    rot = lin / np.linalg.norm(lin, axis=0, keepdims=True)
    voxel = vectors.copy()
    if np.linalg.det(lin) > 0:
        voxel[..., 0] = -voxel[..., 0]
    return voxel @ rot.T
