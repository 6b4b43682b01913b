"""The QSM derivatives of one MEGRE series, written under a root folder with their final
relative paths (the sink copies them into OUTPUT_DIR): names from :func:`naming.qsm_path`."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .. import __version__, naming
from ..atomic import write_json_atomic, write_nifti_atomic

METHOD_TEXT = {
    "tkd": "Truncated k-space division (Shmueli et al. 2009; Wharton et al. 2010).",
    "tv": "Total-variation-regularised dipole inversion by ADMM (weighted linear, after "
          "Bilgic et al. 2014 and Milovic et al. 2018).",
    "dip": "Deep Image Prior (Ulyanov et al. 2018): a seeded 3-D convolutional network trained "
           "on this subject so that the dipole model of its output matches the local field; "
           "early stopping as documented in the hyper-parameters.",
}
REFERENCE = "the mean over the brain mask (desc-brain_mask of the local field)"


def _nifti(path: Path, data, affine, dtype=np.float32) -> Path:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return write_nifti_atomic(path, img)


def write_qsm_products(root, field_file, chi_files, record_files, entities, plan,
                       mask_source="", sources=(), seed=0) -> list[str]:
    root = Path(root)
    data = np.load(field_file)
    affine, mask = data["affine"], data["mask"].astype(bool)
    common = {"B0": plan["b0_tesla"], "MagneticFieldStrength": plan["b0_tesla"],
              "EchoTime": plan["echo_times_s"], "PhaseUnits": plan["phase_units"],
              "Sources": list(sources), "ReferenceRegion": REFERENCE,
              "DipoleKernelD0": "0 (a uniform chi makes no field)",
              "B0Direction": "scanner z; in voxel axes from the affine"}
    files = []

    def put(kind, arr, method=None, dtype=np.float32, sidecar=None):
        rel = naming.qsm_path(entities, kind, method)
        files.append(str(_nifti(root / rel, arr, affine, dtype)))
        if sidecar is not None:
            files.append(str(write_json_atomic(root / naming.sidecar(rel), sidecar)))

    put("mask", mask, dtype=np.uint8, sidecar={
        "Type": "Brain", "Description": "brain mask of the QSM maps: the mask below, after "
        "background-field removal", "MaskSource": mask_source, "Sources": list(sources)})
    put("localfield", np.where(mask, data["local"], 0.0), sidecar={
        **common, "Units": "ppm", "Description": "local field (delta-B / B0) after unwrapping, "
        "the weighted multi-echo fit and background-field removal"})
    put("totalfield", np.where(data["brain"], data["total"], 0.0), sidecar={
        **common, "Units": "ppm", "Description": "total field (delta-B / B0) of the multi-echo "
        "fit, before background-field removal, in the brain mask before erosion"})
    records = {}
    for chi_file, rec_file in zip(chi_files, record_files):
        rec = json.loads(Path(rec_file).read_text())
        method = rec["method"]
        chi = np.where(mask, np.load(chi_file)["chi"], 0.0)
        put("chi", chi, method, sidecar={
            **common, "Units": "ppm", "Model": {
                "Description": "QSM: local field = F^-1[D(k) F[chi]], D(k) = 1/3 - (k.b)^2/|k|^2",
                "FitMethod": method, "FitMethodDescription": METHOD_TEXT[method],
                "Hyperparameters": rec.get("hyperparameters", {}),
                "FieldOptions": plan.get("options", {}).get("qsm", {})},
            "Seed": seed, "RunSeconds": rec.get("seconds"), "Device": rec.get("device", "cpu"),
            "SoftwareVersion": f"vaemap {__version__}"})
        records[method] = rec
    summary = {"prefix": naming.prefix(entities), "entities": entities, "plan": plan,
               "mask_source": mask_source, "n_voxels": int(mask.sum()),
               "field_seconds": float(data["seconds"]), "methods": records,
               "version": __version__}
    rel = naming.qsm_path(entities, "record")
    files.append(str(write_json_atomic(root / rel, summary)))
    return files


__all__ = ["write_qsm_products"]
