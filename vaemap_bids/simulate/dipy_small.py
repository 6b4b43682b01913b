"""dipy's bundled real crop ``small_101D`` as a BIDS subject.

``small_101D`` ships inside dipy's wheel (``dipy/data/files``), so it needs no download: a
6 x 10 x 10 voxel crop (2.5 mm, LAS) of a real diffusion acquisition with 102 volumes, one b0
(b = 15 s/mm^2) and 101 directions whose b-values spread from 300 to 4100 s/mm^2 (a q-space
sampling, not a few shells). Nobody in this project made it, which is the point: it is real
noise, real tissue and a real scanner's gradient table.

The image data, b-values and gradient directions are copied unchanged. Only the NIfTI header's
spatial/temporal units are filled in (mm, s) when the source leaves them unset, which BIDS
asks for; the sidecar says so. Sequence parameters (echo time, phase encoding...) are not
recorded in the source and are therefore not invented here.

Brain mask: the crop lies entirely inside the brain (its smallest b0 is about 180, against a
brightest voxel of about 1000, and no voxel looks like background), so dipy's ``median_otsu``,
which separates a brain from the air around it, keeps only the brightest ~10 % of the crop.
``convert_small_101d(..., mask_dir=DIR)`` therefore also writes a derivative dataset with a
``desc-brain_mask`` covering every voxel with finite data and a positive b0, to be passed to
``vaemap --derivatives DIR`` (the way a QSIPrep mask is given).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import naming
from ..atomic import write_json_atomic, write_nifti_atomic, write_text_atomic
from ..outputs.table import output
from .phantom import update_participants, write_dataset_description

log = logging.getLogger("vaemap.dataset")

SOURCE_NAME = "small_101D"


def small_101d_files() -> tuple[Path, Path, Path]:
    """Paths of dipy's ``small_101D`` image, ``.bval`` and ``.bvec`` (inside the dipy wheel)."""
    from dipy.data import get_fnames

    paths = tuple(Path(p) for p in get_fnames(name=SOURCE_NAME))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"dipy's {SOURCE_NAME} files are missing: {', '.join(missing)}")
    return paths  # type: ignore[return-value]


def convert_small_101d(bids_dir, subject: str = "small101d", *, mask_dir=None) -> dict:
    """Write dipy's ``small_101D`` as ``sub-<subject>/dwi/sub-<subject>_dwi.*`` in ``bids_dir``.

    Adds ``dataset_description.json`` and ``README`` when the folder has none and a row to
    ``participants.tsv``. With ``mask_dir``, also writes the whole-crop brain mask there as a
    BIDS derivative (see the module's docstring). Every file is written atomically. Returns
    ``{"bids_dir", "entities", "dwi", "bval", "bvec", "json", "participants",
    "dataset_description"}`` and ``"mask"`` when ``mask_dir`` is given.
    """
    import dipy

    subject = naming.check_label(subject, "subject")
    bids_dir = Path(bids_dir).absolute()
    img_path, bval_path, bvec_path = small_101d_files()
    img = nib.load(img_path)
    data = np.asarray(img.dataobj)
    bvals = np.loadtxt(bval_path, ndmin=1)
    bvecs = np.loadtxt(bvec_path, ndmin=2)
    if data.ndim != 4 or bvals.size != data.shape[3] or bvecs.shape != (3, data.shape[3]):
        raise ValueError(f"unexpected {SOURCE_NAME} contents: image {data.shape}, "
                         f"{bvals.size} b-values, bvecs {bvecs.shape}")

    header = img.header.copy()
    units_set = header.get_xyzt_units() != ("mm", "sec")
    if units_set:
        header.set_xyzt_units("mm", "sec")
    out_img = nib.Nifti1Image(data, img.affine, header)
    out_img.set_qform(*img.get_qform(coded=True))
    out_img.set_sform(*img.get_sform(coded=True))

    entities = {"subject": subject}
    stem = bids_dir / naming.subject_dir(entities) / "dwi" / f"{naming.prefix(entities)}_dwi"
    bids_dir.mkdir(parents=True, exist_ok=True)
    desc = write_dataset_description(bids_dir, "vaemap demo data")
    if not (bids_dir / "README").exists():
        write_text_atomic(bids_dir / "README", (
            "Diffusion MRI for the vaemap demo. sub-small101d is real data: dipy's test file "
            "small_101D (a crop of a real acquisition, shipped inside the dipy package).\n"))
    dwi = write_nifti_atomic(str(stem) + ".nii.gz", out_img)
    # The gradient files are copied byte for byte: the scanner's own b-values and directions.
    bval = write_text_atomic(str(stem) + ".bval", bval_path.read_text())
    bvec = write_text_atomic(str(stem) + ".bvec", bvec_path.read_text())
    sidecar = {
        "SeriesDescription": f"dipy {SOURCE_NAME}: real diffusion MRI (crop)",
        "vaemapSource": {
            "Description": ("Real diffusion-weighted data from dipy's bundled test data "
                            f"({SOURCE_NAME}); not simulated and not made by vaemap."),
            "Package": f"dipy {dipy.__version__}",
            "Files": [f"dipy/data/files/{p.name}" for p in (img_path, bval_path, bvec_path)],
            "SHA256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                       for p in (img_path, bval_path, bvec_path)},
            "Changes": ("none; NIfTI xyzt_units set to mm/s (unset in the source)" if units_set
                        else "none"),
            "SequenceParameters": "not recorded in the source, so not given",
        },
    }
    json_path = write_json_atomic(str(stem) + ".json", sidecar)
    participants = update_participants(bids_dir, [{"participant_id": f"sub-{subject}"}])
    log.info("wrote dipy %s as sub-%s in %s", SOURCE_NAME, subject, bids_dir)
    out = {"bids_dir": bids_dir, "entities": entities, "dwi": dwi, "bval": bval, "bvec": bvec,
           "json": json_path, "participants": participants, "dataset_description": desc}
    if mask_dir is not None:
        b0 = bvals < 50
        finite = np.all(np.isfinite(data), axis=3)
        mean_b0 = np.where(finite, data[..., b0].astype(np.float64).mean(axis=3), 0.0)
        out["mask"] = _write_mask_derivative(Path(mask_dir).absolute(), entities,
                                             finite & (mean_b0 > 0), img.affine,
                                             Path(dwi).relative_to(bids_dir).as_posix())
    return out


def _write_mask_derivative(mask_dir: Path, entities: dict, mask: np.ndarray, affine, source) -> Path:
    if not (mask_dir / "dataset_description.json").exists():
        write_json_atomic(mask_dir / "dataset_description.json", {
            "Name": "Brain masks for dipy small_101D", "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "vaemap", "Description":
                             "vaemap_bids.simulate.dipy_small: every voxel of the crop with "
                             "finite data and a positive b0 (the crop lies inside the brain)"}]})
    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = write_nifti_atomic(mask_dir / output("mask", entities).path, img)
    write_json_atomic(naming.sidecar(str(path)), {
        "Type": "Brain", "Sources": [f"bids::{source}"],
        "Description": "whole crop: small_101D lies inside the brain, so median_otsu "
                       "(brain vs background) does not apply"})
    return path
