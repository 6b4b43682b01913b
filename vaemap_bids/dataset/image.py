"""Reading a 4-D DWI image: its header, and one streaming pass over its volumes per open.

A participant run reads each image twice: the planning pass (:func:`scan_image`: integrity,
non-finite voxels, the mean b0 and per-volume statistics, before any graph is built) and the
pass that extracts the brain's signals (:func:`iter_volumes` in ``PrepareSeries``). Each pass
opens the file once: the header is parsed from the same stream that then yields the volumes.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from ..physics import Acquisition

#: Bytes read per chunk when streaming (keeps memory at one volume or less).
_CHUNK = 1 << 24
#: Low-resolution copies of each volume keep at most about this many voxels (outlier checks).
_THUMB_VOXELS = 1 << 16


@dataclass(frozen=True)
class ImageInfo:
    """What the header of a DWI image says."""

    path: str
    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    affine: np.ndarray
    dtype: str
    header: nib.Nifti1Header | None = None

    @property
    def n_volumes(self) -> int:
        return int(self.shape[3])

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.zooms[:3])) / 1000.0


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _header_class(first4: bytes):
    """NIfTI-1 or NIfTI-2 from ``sizeof_hdr`` (either byte order)."""
    for fmt in ("<i", ">i"):
        size = struct.unpack(fmt, first4)[0]
        if size == 348:
            return nib.Nifti1Header
        if size == 540:
            return nib.Nifti2Header
    return None


def _info_from_header(path: Path, header) -> ImageInfo:
    shape = tuple(int(s) for s in header.get_data_shape())
    if len(shape) != 4 or shape[3] < 2:
        raise ValueError(f"{path}: a DWI series must be a 4-D image with one volume per "
                         f"gradient, got shape {shape}")
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{path}: the image affine is singular or not finite")
    return ImageInfo(str(path), shape, tuple(float(z) for z in header.get_zooms()[:3]), affine,
                     str(header.get_data_dtype()), header)


@contextmanager
def _open(path):
    """The open file (decompressing when gzipped) and its parsed header; one ``open`` call."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        fobj = Opener(str(path), "rb")
    except OSError as exc:
        raise ValueError(f"{path}: cannot open the image ({_reason(exc)})") from None
    with fobj:
        try:
            first = fobj.read(4)
            klass = _header_class(first) if len(first) == 4 else None
            if klass is None:
                raise ValueError("not a NIfTI-1 or NIfTI-2 image")
            fobj.seek(0)
            header = klass.from_fileobj(fobj, check=True)
        except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
            raise ValueError(f"{path}: corrupt or truncated image file ({_reason(exc)})") from None
        except Exception as exc:  # nibabel raises many types for broken headers
            raise ValueError(f"{path}: not a readable NIfTI image ({_reason(exc)})") from None
        yield fobj, header


def read_image_info(path) -> ImageInfo:
    """Header facts of a 4-D DWI image; raises for a missing, unreadable or non-4-D file."""
    with _open(path) as (_, header):
        return _info_from_header(Path(path), header)


def _volumes(fobj, path, info: ImageInfo):
    header = info.header
    dtype = header.get_data_dtype()
    slope, inter = header.get_slope_inter()
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    vol_shape = info.shape[:3]
    vol_bytes = int(np.prod(vol_shape)) * dtype.itemsize
    try:
        fobj.seek(int(header.get_data_offset()))
        for index in range(info.n_volumes):
            buf = _read_exact(fobj, vol_bytes)
            if len(buf) != vol_bytes:
                raise ValueError(f"{path}: the image is truncated: volume {index} of "
                                 f"{info.n_volumes} is incomplete")
            vol = np.frombuffer(buf, dtype=dtype).reshape(vol_shape, order="F")
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


@contextmanager
def open_image(path):
    """``with open_image(path) as (info, volumes)``: the header's :class:`ImageInfo` and an
    iterator of ``(index, volume)`` (float32, scaled), from one open of the file. Reading the
    whole stream is also the integrity check: a truncated or corrupt gzip raises ``ValueError``
    naming the file (gzip verifies its CRC and length at the end)."""
    with _open(path) as (fobj, header):
        info = _info_from_header(Path(path), header)
        yield info, _volumes(fobj, Path(path), info)


def iter_volumes(path):
    """Yield ``(index, volume)`` of a 4-D NIfTI one volume at a time (one open)."""
    with open_image(path) as (_, volumes):
        yield from volumes


@dataclass
class ImageScan:
    """What one streaming pass over a DWI image found (the planning pass)."""

    info: ImageInfo
    mean_b0: np.ndarray        # 3-D float32: mean over the finite b0 values
    nonfinite: np.ndarray      # 3-D bool: any volume has NaN/Inf in that voxel
    thumbnails: np.ndarray     # (t, x', y', z') float32 block means of each volume
    block: int                 # edge of the thumbnails' blocks in voxels


def _block_means(vol: np.ndarray, block: int) -> np.ndarray:
    if block == 1:
        return vol
    shape = tuple(-(-s // block) * block for s in vol.shape)
    padded = np.zeros(shape, dtype=np.float32)
    padded[tuple(slice(0, s) for s in vol.shape)] = vol
    x, y, z = (s // block for s in shape)
    return padded.reshape(x, block, y, block, z, block).mean(axis=(1, 3, 5))


def scan_image(path, acq: Acquisition) -> ImageScan:
    """The planning pass: one open and one stream through the image for its integrity, the
    voxels with non-finite values, the mean b0 and low-resolution copies of every volume.

    Raises ``ValueError`` when the file is corrupt, disagrees with the gradient table, or when
    every b0 volume is zero (nothing to normalise by)."""
    with open_image(path) as (info, volumes):
        if acq.n_volumes != info.n_volumes:
            raise ValueError(f"{path}: {info.n_volumes} volumes but the gradient table has "
                             f"{acq.n_volumes}")
        b0 = acq.b0_mask
        vol_shape = info.shape[:3]
        block = max(1, int(np.ceil((np.prod(vol_shape) / _THUMB_VOXELS) ** (1 / 3))))
        sum_b0 = np.zeros(vol_shape, dtype=np.float64)
        n_b0 = np.zeros(vol_shape, dtype=np.int32)
        nonfinite = np.zeros(vol_shape, dtype=bool)
        thumbs = []
        for index, vol in volumes:
            finite = np.isfinite(vol)
            nonfinite |= ~finite
            clean = np.where(finite, vol, np.float32(0))
            if b0[index]:
                sum_b0 += clean
                n_b0 += finite
            thumbs.append(_block_means(clean, block))
    # mean over the finite b0 values, so that a voxel with one bad value still looks like its
    # tissue to the masking (it is excluded from the fit, and counted, afterwards)
    mean_b0 = (sum_b0 / np.maximum(n_b0, 1)).astype(np.float32)
    if not np.any(mean_b0 > 0):
        raise ValueError(f"{path}: every b0 volume is zero (or non-finite): the signal cannot be "
                         "normalised")
    return ImageScan(info, mean_b0, nonfinite, np.stack(thumbs), block)
