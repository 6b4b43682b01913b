"""Brain masks: a given derivative mask, or dipy's ``median_otsu`` on the mean b0."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

#: median_otsu's median filter spans about this many mm each side (dipy's tutorials use a radius
#: of 3 voxels at 2 mm; its defaults, 4 voxels and 4 passes, erode a 2 mm brain's cortex), so the
#: radius in voxels follows the voxel size: 3 at 1.25 mm, 2 at 2 mm, 1 at 3 mm or coarser.
MEDIAN_RADIUS_MM = 4.0
MAX_RADIUS = 4
NUMPASS = 2


def median_radius(voxel_size_mm) -> int:
    """median_otsu's filter radius in voxels for this voxel size."""
    size = float(np.mean(voxel_size_mm))
    return int(np.clip(round(MEDIAN_RADIUS_MM / max(size, 1e-3)), 1, MAX_RADIUS))


def compute_brain_mask(mean_b0: np.ndarray, voxel_size_mm=(2.0, 2.0, 2.0),
                       exclude: np.ndarray | None = None) -> np.ndarray:
    """Brain mask from the mean b0 with dipy's ``median_otsu`` (median filter + Otsu threshold).

    ``exclude`` (e.g. voxels with non-finite values) is removed from the result. Raises
    ``ValueError`` when the mask is empty."""
    from dipy.segment.mask import median_otsu

    mean_b0 = np.asarray(mean_b0, dtype=np.float32)
    if mean_b0.ndim != 3:
        raise ValueError(f"mean b0 must be 3-D, got shape {mean_b0.shape}")
    radius = median_radius(voxel_size_mm)
    _, mask = median_otsu(mean_b0, median_radius=radius, numpass=NUMPASS)
    mask = np.asarray(mask, dtype=bool) & (mean_b0 > 0)
    if exclude is not None:
        mask &= ~np.asarray(exclude, dtype=bool)
    if not mask.any():
        raise ValueError("median_otsu found no brain voxel in the mean b0 (is the image "
                         "constant?); give a brain mask with --derivatives")
    return mask


def load_mask(path, shape: tuple[int, ...], affine: np.ndarray, atol_mm: float = 1e-2) -> np.ndarray:
    """A given mask as a boolean array, checked against the DWI grid (shape and affine)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable NIfTI mask ({str(exc).splitlines()[0]})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(shape[:3]):
        raise ValueError(f"{path}: mask shape {tuple(data.shape)} does not match the DWI grid "
                         f"{tuple(shape[:3])}")
    if not np.allclose(img.affine, affine, atol=atol_mm):
        raise ValueError(f"{path}: mask affine does not match the DWI image's affine")
    mask = np.isfinite(data) & (data > 0)
    if not mask.any():
        raise ValueError(f"{path}: the mask is empty")
    return mask


def mask_image(mask: np.ndarray, affine: np.ndarray, header=None) -> nib.Nifti1Image:
    """The mask as a uint8 NIfTI on the DWI grid."""
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine)
    if header is not None:
        img.header.set_qform(header.get_qform(), int(header["qform_code"]))
        img.header.set_sform(header.get_sform(), int(header["sform_code"]))
        img.header.set_xyzt_units(*header.get_xyzt_units())
    img.set_data_dtype(np.uint8)
    return img


def brain_mask(mean_b0: np.ndarray, info, given_mask=None) -> tuple[np.ndarray, str]:
    """The given mask (checked against the grid of ``info``, a header's ImageInfo) or dipy's
    median_otsu on the mean b0, and a sentence saying which."""
    if given_mask:
        return load_mask(given_mask, info.shape, info.affine), f"given: {given_mask}"
    mask = compute_brain_mask(mean_b0, info.zooms)
    return mask, (f"dipy median_otsu on the mean b0 (median radius {median_radius(info.zooms)} "
                  f"voxels, {NUMPASS} passes)")
