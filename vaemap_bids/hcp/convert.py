"""Convert one subject of an HCP tree (``<root>/<id>/T1w/Diffusion/``) into BIDS.

Written under BIDS_DIR::

    dataset_description.json, README                  (when absent; never overwritten)
    sub-<id>/dwi/sub-<id>_dwi.nii.gz                   data.nii.gz, byte for byte (hard link
    sub-<id>/dwi/sub-<id>_dwi.bval                     when possible, else a copy)
    sub-<id>/dwi/sub-<id>_dwi.bvec
    sub-<id>/dwi/sub-<id>_dwi.json                     HCP acquisition facts
    derivatives/hcp-mask/dataset_description.json
    derivatives/hcp-mask/sub-<id>/dwi/sub-<id>_desc-brain_mask.nii.gz (+ .json)

Space. HCP's preprocessed diffusion data are resampled into the subject's ``T1w`` space (the
ACPC-aligned structural space, 1.25 mm). Raw BIDS does not allow the ``space-`` entity on
``dwi`` files (schema: sub, ses, acq, rec, dir, run, part, chunk), so the series is named
``sub-<id>_dwi`` and its space is stated in the sidecar (``SpatialReference``) and the dataset
README. The mask shares that exact voxel grid (checked); it carries no ``space-`` entity either,
so its entities equal the series' (which is how vaemap's ``--derivatives`` lookup, like QSIPrep's,
pairs a mask with a series), and its sidecar names the series as its ``SpatialReference``.

Gradient directions. The HCP ``bvecs`` file is FSL's format: one unit vector per volume in the
image's voxel axes, the first axis flipped when the affine's determinant is positive. BIDS
defines ``.bvec`` the same way (bids-specification, ``.bvec``: "cosine values with respect to
the image axis orientations ... unless ... positive determinant, in which case the sign of the
first element ... must be inverted"). The image is copied unchanged, so the vectors stay valid
as they are: the converter reads the file (3 rows or T rows of 3), checks its counts against
the bvals and the image, checks unit norms, records the affine's handedness, and writes 3 rows.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__, naming
from ..atomic import TEMP_SUFFIX
from ..dataset.gradients import load_acquisition, read_bval, read_bvec
from ..dataset.image import read_image_info
from ..outputs.table import output
from .errors import (HCPDataError, HCPInputError, HCPSubjectNotFoundError, output_error)
from .fetch import HCP_BUCKET, HCP_RELEASE, diffusion_dir, ensure_writable_dir, \
    write_text_atomic

log = logging.getLogger("vaemap.hcp")

#: Folder of the mask derivative under BIDS_DIR (``--derivatives BIDS_DIR/derivatives/hcp-mask``).
MASK_DERIVATIVE = "hcp-mask"
BIDS_VERSION = "1.10.0"

HCP_ACKNOWLEDGEMENT = (
    "Data were provided by the Human Connectome Project, WU-Minn Consortium (Principal "
    "Investigators: David Van Essen and Kamil Ugurbil; 1U54MH091657) funded by the 16 NIH "
    "Institutes and Centers that support the NIH Blueprint for Neuroscience Research; and by the "
    "McDonnell Center for Systems Neuroscience at Washington University.")

SPATIAL_REFERENCE = ("T1w: the subject's ACPC-aligned structural space of the HCP minimal "
                     "preprocessing pipelines (HCP T1w/Diffusion, 1.25 mm)")


def pulse_timing() -> tuple[float, float]:
    """HCP (delta, Delta) in seconds, from the table that ships with the package."""
    from importlib.resources import files
    path = files("vaemap_bids") / "data" / "hcp_wu_minn" / "delta_Delta_hcp_wu_minn.txt"
    values = np.loadtxt(str(path), comments="#")
    return float(values[0]), float(values[1])


def hcp_dwi_metadata() -> dict:
    """What is known of the HCP WU-Minn 3T diffusion protocol (Sotiropoulos et al. 2013,
    NeuroImage 80:125): Siemens 3T Connectome Skyra, multiband 3, TR 5520 ms, TE 89.5 ms,
    delta/Delta 10.6/43.1 ms (the pulse timing ships with the package)."""
    small_delta, big_delta = pulse_timing()
    return {
        "Manufacturer": "Siemens",
        "MagneticFieldStrength": 3,
        "MultibandAccelerationFactor": 3,
        "RepetitionTime": 5.52,
        "EchoTime": 0.0895,
        "SmallDelta": small_delta,
        "BigDelta": big_delta,
    }


@dataclass(frozen=True)
class ConvertedSubject:
    """Paths of one converted subject (all under ``bids_dir``)."""

    subject: str
    bids_dir: Path
    dwi: Path
    bval: Path
    bvec: Path
    sidecar: Path
    mask: Path
    mask_derivatives_dir: Path     # pass to ``vaemap --derivatives``

    def as_dict(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}


def mask_derivatives_dir(bids_dir) -> Path:
    return Path(bids_dir) / "derivatives" / MASK_DERIVATIVE


def list_hcp_subjects(hcp_root) -> list[str]:
    """Subject IDs of an HCP tree that have a ``T1w/Diffusion`` folder."""
    root = Path(hcp_root)
    if not root.is_dir():
        raise HCPInputError(f"HCP folder not found: {root}")
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and p.name.isalnum() and diffusion_dir(root, p.name).is_dir())


def _source_files(hcp_root, subject: str) -> dict[str, Path]:
    root = Path(hcp_root)
    if not root.is_dir():
        raise HCPInputError(f"HCP folder not found: {root}")
    src = diffusion_dir(root, subject)
    if not (root / subject).is_dir():
        raise HCPSubjectNotFoundError(f"HCP subject {subject} not found in {root} (expected "
                                      f"{src})")
    if not src.is_dir():
        raise HCPSubjectNotFoundError(f"HCP subject {subject} has no T1w/Diffusion folder in "
                                      f"{root}: no preprocessed diffusion data")
    files = {name: src / name for name in ("data.nii.gz", "bvals", "bvecs",
                                            "nodif_brain_mask.nii.gz")}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise HCPInputError(f"{src}: missing {', '.join(missing)}")
    return files


def _check_mask(mask_path: Path, info) -> int:
    """The mask must be 3-D, binary, non-empty and on the DWI's grid; returns its voxel count."""
    try:
        img = nib.load(str(mask_path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise HCPDataError(f"{mask_path}: not a readable NIfTI image ({type(exc).__name__})") \
            from None
    if tuple(img.shape) != tuple(info.shape[:3]):
        raise HCPDataError(f"{mask_path}: shape {tuple(img.shape)} differs from the DWI grid "
                           f"{tuple(info.shape[:3])}")
    if not np.allclose(img.affine, info.affine, atol=1e-3):
        raise HCPDataError(f"{mask_path}: its affine differs from the DWI's; the mask is not on "
                           "the same voxel grid")
    values = np.unique(data)
    if not np.all(np.isin(values, (0, 1))):
        raise HCPDataError(f"{mask_path}: not a binary mask (values {values[:5].tolist()}...)")
    count = int(np.count_nonzero(data))
    if count == 0:
        raise HCPDataError(f"{mask_path}: the mask is empty")
    return count


def _handedness(path: Path, affine: np.ndarray) -> str:
    """'left-handed' (radiological storage, e.g. LAS as HCP ships) or 'right-handed'; warns when
    the qform and sform disagree (FSL and nibabel read the sform, other tools may not)."""
    det = float(np.linalg.det(affine[:3, :3]))
    img = nib.load(str(path))
    qform, qcode = img.header.get_qform(coded=True)
    sform, scode = img.header.get_sform(coded=True)
    if qform is not None and sform is not None and qcode and scode:
        if np.sign(np.linalg.det(qform[:3, :3])) != np.sign(np.linalg.det(sform[:3, :3])):
            log.warning("%s: qform and sform have opposite handedness; the sform (used by FSL "
                        "and by vaemap) defines the bvec frame", path)
    return "right-handed" if det > 0 else "left-handed"


def _place(src: Path, dst: Path, link: bool) -> str:
    """Put ``src`` at ``dst`` atomically: a hard link when allowed (no extra space), else a
    copy. An existing identical file (same inode, or same size and mtime) is kept."""
    if dst.exists():
        try:
            if os.path.samefile(src, dst):
                return "kept"
            s, d = src.stat(), dst.stat()
            if not link and s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns:
                return "kept"
        except OSError:
            pass
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        how = "copied"
        if link:
            try:
                os.link(src, tmp)
                how = "linked"
            except OSError:  # another file system, or links not allowed
                pass
        if how == "copied":
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise output_error(dst, exc) from None
    return how


def _format_row(values) -> str:
    return " ".join(format(float(v), ".10g") for v in values) + "\n"


def _shell_summary(acq) -> list[dict]:
    return [{"MeanBValue": round(row["bval_smm2"] / 5.0) * 5, "Volumes": row["n_volumes"],
             **({"Directions": row["n_directions"]} if row["n_directions"] else {})}
            for row in acq.shell_table()]


def _dataset_description() -> dict:
    return {
        "Name": f"HCP WU-Minn {HCP_RELEASE}: preprocessed diffusion MRI (T1w space), in BIDS",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "WU-Minn HCP Open Access Data Use Terms",
        "Authors": ["WU-Minn Human Connectome Project Consortium"],
        "Acknowledgements": HCP_ACKNOWLEDGEMENT,
        "GeneratedBy": [{"Name": "vaemap-fetch-hcp", "Version": __version__,
                         "Description": "HCP T1w/Diffusion -> BIDS (vaemap_bids.hcp)"}],
        "SourceDatasets": [{"URL": f"s3://{HCP_BUCKET}/{HCP_RELEASE}/"}],
    }


_README = f"""HCP WU-Minn {HCP_RELEASE} preprocessed diffusion MRI, converted to BIDS by vaemap.

Each sub-<id>/dwi/sub-<id>_dwi.nii.gz is HCP_1200/<id>/T1w/Diffusion/data.nii.gz, unchanged:
minimally preprocessed by the HCP pipelines and resampled into the subject's T1w (ACPC-aligned
structural) space at 1.25 mm. Raw BIDS has no space- entity for dwi files, so the space is
stated in each sidecar (SpatialReference). The .bvec files are HCP's bvecs (FSL convention,
which BIDS shares), the .bval files HCP's bvals. HCP's brain masks (nodif_brain_mask.nii.gz) are
in derivatives/{MASK_DERIVATIVE}/ (use `vaemap --derivatives <this dataset>/derivatives/{MASK_DERIVATIVE}`).

{HCP_ACKNOWLEDGEMENT}
Use of these data is governed by the WU-Minn HCP Open Access Data Use Terms.
"""


_MASK_README = f"""HCP brain masks: T1w/Diffusion/nodif_brain_mask.nii.gz of each subject of the HCP
{HCP_RELEASE} release, on the voxel grid of the subject's converted DWI series (../../sub-<id>/dwi).
Give this folder to `vaemap --derivatives` to use these masks instead of computing one.
"""


def _mask_description() -> dict:
    return {
        "Name": "HCP brain masks (nodif_brain_mask)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {"Name": "HCP minimal preprocessing pipelines",
             "Description": "T1w/Diffusion/nodif_brain_mask.nii.gz of the HCP release"},
            {"Name": "vaemap-fetch-hcp", "Version": __version__,
             "Description": "copied into BIDS derivatives"}],
        "SourceDatasets": [{"URL": f"s3://{HCP_BUCKET}/{HCP_RELEASE}/"}],
        "DatasetLinks": {"raw": "../.."},
    }


def _write_json_if_absent(path: Path, content: dict) -> None:
    if not path.is_file():
        write_text_atomic(path, json.dumps(content, indent=2) + "\n")


def convert_hcp_subject(hcp_root, subject: str, bids_dir, *, link: bool = True,
                        source: str | None = None) -> ConvertedSubject:
    """Convert ``<hcp_root>/<subject>/T1w/Diffusion`` into BIDS under ``bids_dir``.

    ``link``: hard-link the image and mask when source and BIDS_DIR share a file system (no
    second copy of ~1.3 GB), else copy. ``source``: provenance text for the sidecar (e.g. the S3
    URL); defaults to the local folder. Raises ValueError (bad subject label), HCPInputError,
    HCPSubjectNotFoundError, HCPDataError, HCPOutputError."""
    subject = naming.check_label(subject, "HCP subject ID")
    files = _source_files(hcp_root, subject)
    try:
        info = read_image_info(files["data.nii.gz"])
        acq = load_acquisition(files["bvals"], files["bvecs"], info.n_volumes)
        bvals = read_bval(files["bvals"])                      # s/mm^2, as HCP wrote them
        bvecs = read_bvec(files["bvecs"])                      # (T, 3) whatever the file layout
    except FileNotFoundError as exc:
        raise HCPInputError(str(exc)) from None
    except ValueError as exc:
        raise HCPDataError(str(exc)) from None
    layout = _bvec_layout(files["bvecs"])
    n_mask = _check_mask(files["nodif_brain_mask.nii.gz"], info)
    handedness = _handedness(files["data.nii.gz"], info.affine)
    # BIDS: each vector is unit norm or [0, 0, 0]; a b0's direction is meaningless, so a b0 vector
    # that is not unit is written as zeros. Diffusion-weighted vectors are kept as HCP wrote them.
    norms = np.linalg.norm(bvecs, axis=1)
    bvecs = np.where((acq.b0_mask & (np.abs(norms - 1) > 1e-3))[:, None], 0.0, bvecs)
    log.info("HCP subject %s: %s, %d volumes, shells %s; bvecs: %s, image axes %s (BIDS and FSL "
             "read the vectors in the same frame; image copied unchanged, vectors kept)",
             subject, "x".join(map(str, info.shape[:3])), info.n_volumes,
             ", ".join(f"{s['MeanBValue']}x{s['Volumes']}" for s in _shell_summary(acq)), layout,
             handedness)

    bids_dir = ensure_writable_dir(Path(bids_dir))
    entities = {"subject": subject}
    dwi_dir = ensure_writable_dir(bids_dir / naming.subject_dir(entities) / "dwi")
    stem = dwi_dir / f"{naming.prefix(entities)}_dwi"     # raw BIDS name (not a vaemap output)
    dwi = stem.with_name(stem.name + ".nii.gz")
    bval, bvec, sidecar = (stem.with_name(stem.name + ext) for ext in (".bval", ".bvec", ".json"))
    _write_json_if_absent(bids_dir / "dataset_description.json", _dataset_description())
    if not (bids_dir / "README").exists() and not (bids_dir / "README.md").exists():
        write_text_atomic(bids_dir / "README", _README)
    how = _place(files["data.nii.gz"], dwi, link)
    write_text_atomic(bval, _format_row(bvals))
    write_text_atomic(bvec, "".join(_format_row(bvecs[:, axis]) for axis in range(3)))
    metadata = {
        **hcp_dwi_metadata(),
        "SpatialReference": SPATIAL_REFERENCE,
        "DiffusionShells": _shell_summary(acq),
        "HCPSource": source or str(files["data.nii.gz"].parent),
        "HCPProcessing": ("HCP minimal preprocessing pipelines (Glasser et al. 2013): EPI "
                          "distortion (topup), eddy-current and motion (eddy) and gradient "
                          "non-linearity corrected, resampled into T1w space at 1.25 mm with "
                          "the bvecs rotated accordingly"),
    }
    write_text_atomic(sidecar, json.dumps(metadata, indent=2) + "\n")

    deriv = mask_derivatives_dir(bids_dir)
    mask_dir = ensure_writable_dir(deriv / naming.subject_dir(entities) / "dwi")
    _write_json_if_absent(deriv / "dataset_description.json", _mask_description())
    if not (deriv / "README").exists():
        write_text_atomic(deriv / "README", _MASK_README)
    mask = mask_dir / output("mask", entities).name
    _place(files["nodif_brain_mask.nii.gz"], mask, link)
    write_text_atomic(mask_dir / naming.sidecar(mask.name), json.dumps({
        "Type": "Brain",
        "Description": "HCP nodif_brain_mask.nii.gz (brain mask of the mean b0, HCP pipelines)",
        "SpatialReference": f"bids:raw:{dwi.relative_to(bids_dir).as_posix()}",
        "Sources": [f"bids:raw:{dwi.relative_to(bids_dir).as_posix()}"],
    }, indent=2) + "\n")
    log.info("HCP subject %s -> %s (image %s; mask %d voxels -> %s)", subject, dwi, how, n_mask,
             mask)
    return ConvertedSubject(subject, bids_dir, dwi, bval, bvec, sidecar, mask, deriv)


def _bvec_layout(path: Path) -> str:
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(rows) == 3:
        return f"3 rows of {len(rows[0])} (FSL layout)"
    return f"{len(rows)} rows of 3 (transposed to BIDS's 3 rows)"
