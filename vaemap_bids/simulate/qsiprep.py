"""A phantom laid out as QSIPrep's output: the input of ``vaemap --input-type qsiprep`` in tests.

The signal, anatomy and truth are those of :func:`vaemap_bids.simulate.phantom.write_phantom_dataset`
(same arguments, same numbers); only the layout and the gradient files follow QSIPrep::

    dataset_description.json                DatasetType derivative, GeneratedBy [{Name: QSIPrep}]
    sub-<L>[/ses-<S>]/dwi/
        <entities>_space-<space>_desc-preproc_dwi.nii.gz
        <entities>_space-<space>_desc-preproc_dwi.json
        <entities>_space-<space>_desc-preproc_dwi.bval / .bvec   vectors in the voxel axes (i, j, k)
        <entities>_space-<space>_desc-preproc_dwi.b              MRtrix: x y z b, world RAS+
        <entities>_space-<space>_desc-preproc_dwi.b_table.txt    DSI Studio: b x y z, world LPS+
        <entities>_space-<space>_desc-brain_mask.nii.gz          the truth brain mask

``gradients`` picks which of the three tables are written (QSIPrep writes all three). The grid
defaults to QSIPrep's LPS+; ``oblique_deg`` tilts it (QSIPrep's own outputs are never oblique:
this tests the frame conversions). The truth stays in ``truth_dir`` under the phantom's names
(without ``space-``); it is not part of the QSIPrep folder. Nothing here ran QSIPrep.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import naming
from ..atomic import write_json_atomic, write_nifti_atomic, write_text_atomic
from ..dataset.gradients import read_bval, read_bvec
from .phantom import write_phantom_dataset

GRADIENT_FILES = ("bval", "b", "b_table")


def _unit_columns(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return a / np.linalg.norm(a, axis=0)


def write_qsiprep_dataset(qsiprep_dir, truth_dir, *, space: str = "ACPC",
                          gradients=GRADIENT_FILES, mask: bool = True, orientation: str = "LPS",
                          oblique_deg: float = 0.0, **phantom_args) -> dict:
    """Write a QSIPrep-shaped dataset of the phantom into ``qsiprep_dir`` (see the module
    docstring); ``phantom_args`` go to ``write_phantom_dataset`` (subjects, sessions, model,
    shape, snr, seed, ...). ``mask=False`` leaves the brain masks out (an incomplete QSIPrep
    folder). Returns ``{"qsiprep_dir", "truth_dir", "dataset_description", "series": [...]}``,
    each series ``{"entities" (with space), "dwi", "mask", "bval", "bvec", "b", "b_table",
    "bvals", "bvecs_fsl" (the table that made the signal, in FSL's .bvec frame), "truth",
    "truth_mask", "dseg"}``; absent files are None. The phantom's raw BIDS copy is removed."""
    qsiprep_dir, truth_dir = Path(qsiprep_dir).absolute(), Path(truth_dir).absolute()
    naming.check_label(space, "space")
    unknown = set(gradients) - set(GRADIENT_FILES)
    if unknown or not gradients:
        raise ValueError(f"gradients must be some of {GRADIENT_FILES}, got {tuple(gradients)}")
    qsiprep_dir.mkdir(parents=True, exist_ok=True)
    out = {"qsiprep_dir": qsiprep_dir, "truth_dir": truth_dir, "series": []}
    with tempfile.TemporaryDirectory(prefix=".vaemap-qsiprep-raw-", dir=qsiprep_dir.parent) as raw:
        phantom = write_phantom_dataset(Path(raw) / "bids", truth_dir, orientation=orientation,
                                        oblique_deg=oblique_deg, **phantom_args)
        for series in phantom["series"]:
            entities = {**series["entities"], "space": space}
            folder = qsiprep_dir / naming.subject_dir(entities) / "dwi"
            stem = folder / f"{naming.prefix(entities)}_desc-preproc_dwi"
            img = nib.load(series["dwi"])
            dwi = write_nifti_atomic(f"{stem}.nii.gz", nib.Nifti1Image(
                np.asanyarray(img.dataobj), img.affine, img.header))
            shutil.copyfile(series["json"], f"{stem}.json")
            bvals = read_bval(series["bval"])
            fsl = read_bvec(series["bvec"])            # the phantom writes FSL's frame
            voxel = fsl.copy()
            if np.linalg.det(img.affine[:3, :3]) > 0:  # undo FSL's x flip: QSIPrep's voxel axes
                voxel[:, 0] = -voxel[:, 0]
            world = voxel @ _unit_columns(img.affine).T  # w = R v for every row
            record = {"entities": entities, "dwi": dwi, "mask": None, "bval": None,
                      "bvec": None, "b": None, "b_table": None, "bvals": bvals,
                      "bvecs_fsl": fsl, "truth": series["truth"], "truth_mask": series["mask"],
                      "dseg": series["dseg"]}
            if "bval" in gradients:
                record["bval"] = write_text_atomic(f"{stem}.bval", " ".join(
                    f"{b:g}" for b in bvals) + "\n")
                record["bvec"] = write_text_atomic(f"{stem}.bvec", "\n".join(
                    " ".join(f"{v:.8f}" for v in row) for row in voxel.T) + "\n")
            if "b" in gradients:
                record["b"] = write_text_atomic(f"{stem}.b", "".join(
                    f"{x:.8f} {y:.8f} {z:.8f} {b:g}\n" for (x, y, z), b in zip(world, bvals)))
            if "b_table" in gradients:
                lps = world * np.array([-1.0, -1.0, 1.0])
                record["b_table"] = write_text_atomic(f"{stem}.b_table.txt", "".join(
                    f"{b:g} {x:.6f} {y:.6f} {z:.6f}\n" for (x, y, z), b in zip(lps, bvals)))
            if mask:
                truth = nib.load(series["mask"])
                m = nib.Nifti1Image(np.asanyarray(truth.dataobj).astype(np.uint8), img.affine)
                m.set_qform(img.affine, code=1)
                m.set_sform(img.affine, code=1)
                record["mask"] = write_nifti_atomic(
                    folder / f"{naming.prefix(entities)}_desc-brain_mask.nii.gz", m)
            out["series"].append(record)
    out["dataset_description"] = write_json_atomic(qsiprep_dir / "dataset_description.json", {
        "Name": "vaemap phantom in QSIPrep's output layout", "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "QSIPrep", "Version": "phantom",
                         "Description": ("not QSIPrep: vaemap_bids.simulate.qsiprep wrote a "
                                         "synthetic phantom in QSIPrep's layout")}]})
    return out


__all__ = ["GRADIENT_FILES", "write_qsiprep_dataset"]
