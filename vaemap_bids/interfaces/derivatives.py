"""Nipype interfaces that write the derivatives of a series into OUTPUT_DIR.

Names come from :mod:`vaemap_bids.naming`; sidecars and atomic writes from
:mod:`vaemap_bids.dataset.derivatives`. The writers always run (like niworkflows'
DerivativesDataSink), so a rerun restores deleted outputs from the cached fits.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from .. import naming
from ..atomic import write_json_atomic, write_nifti_atomic, write_npz_atomic, write_text_atomic
from ..dataset import derivatives as dv
from ..dataset.signals import rows_to_volume
from ..physics import make_model
from .fitting import load_signals

#: Voxels kept in the ``_latent.npz`` subsample (a seeded random choice among fitted voxels).
LATENT_SUBSAMPLE = 20000


def _rel(output_dir: Path, path: Path) -> str:
    return str(Path(path).relative_to(output_dir))


def direction_to_ijk(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Vectors of the BIDS/FSL ``.bvec`` frame -> the image's voxel axes (i, j, k): the ``.bvec``
    frame flips the first axis when the affine has a positive determinant."""
    out = np.array(vectors, dtype=np.float32, copy=True)
    if np.linalg.det(np.asarray(affine)[:3, :3]) > 0:
        out[..., 0] = -out[..., 0]
    return out


class _WriteFitInputSpec(BaseInterfaceInputSpec):
    fit_file = File(exists=True, mandatory=True)
    record_file = File(exists=True, mandatory=True)
    signals_file = File(exists=True, mandatory=True, desc="for the acquisition the model used")
    mask_file = File(exists=True, mandatory=True, desc="grid and voxel order of the rows")
    entities = traits.Dict(mandatory=True)
    model = traits.Str(mandatory=True)
    method = traits.Str(mandatory=True)
    output_dir = traits.Str(mandatory=True)
    sources = traits.List(traits.Str, value=[], usedefault=True)
    seed = traits.Int(0, usedefault=True)


class _WriteFitOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str)
    fit_record = traits.Str(desc="path of <prefix>_model-<m>_desc-<method>_fit.json")


class WriteFitDerivatives(SimpleInterface):
    """Maps, posterior-std maps, NRMSE map, vaegmm dseg/probseg, latent subsample, fit record."""

    input_spec = _WriteFitInputSpec
    output_spec = _WriteFitOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        out_dir = Path(self.inputs.output_dir)
        ents, model_name, method = self.inputs.entities, self.inputs.model, self.inputs.method
        _, acq = load_signals(self.inputs.signals_file)
        model = make_model(model_name, acq)
        info = model.describe()
        record = json.loads(Path(self.inputs.record_file).read_text())
        hyper = record.get("hyperparameters", {})
        mask_img = nib.load(self.inputs.mask_file)
        mask = np.asanyarray(mask_img.dataobj) > 0
        dwi_dir = out_dir / naming.dwi_dir(ents)
        log_dir = out_dir / naming.log_dir(ents)
        common = {"sources": list(self.inputs.sources), "seed": record.get("seed", self.inputs.seed),
                  "device": record.get("device", "cpu")}
        written: list[Path] = []

        def save(name: str, data: np.ndarray, sidecar: dict, dtype=np.float32):
            path = dwi_dir / name
            write_nifti_atomic(path, dv.image_like(data, mask_img, dtype))
            write_json_atomic(dwi_dir / naming.sidecar(name), sidecar)
            written.extend([path, dwi_dir / naming.sidecar(name)])
            return path

        with np.load(self.inputs.fit_file) as fit:
            arrays = {k: fit[k] for k in fit.files}
        maps = model.split(arrays["params"])
        std_maps = model.split(arrays["std"]) if "std" in arrays else {}
        record_maps, record_std = {}, {}
        for spec in model.parameters:
            rows = maps[spec.label]
            reference = None
            if spec.is_direction:
                rows = direction_to_ijk(rows, mask_img.affine)
                reference = "ijk"
            path = save(naming.map_name(ents, model_name, method, spec.label),
                        rows_to_volume(rows.astype(np.float32), mask),
                        dv.map_sidecar(info, method, hyper, spec.label,
                                       direction_reference=reference, **common))
            record_maps[spec.label] = _rel(out_dir, path)
            if spec.label in std_maps and not spec.is_direction:
                path = save(naming.map_name(ents, model_name, method, spec.label, naming.STD_STAT),
                            rows_to_volume(std_maps[spec.label].astype(np.float32), mask),
                            dv.map_sidecar(info, method, hyper, spec.label, stat=naming.STD_STAT,
                                           **common))
                record_std[spec.label] = _rel(out_dir, path)
        nrmse_path = save(naming.nrmse_name(ents, model_name, method),
                          rows_to_volume(arrays["nrmse"], mask),
                          dv.nrmse_sidecar(info, method, hyper,
                                           n_measurements=record.get("n_measurements", 0), **common))
        extra = {"nrmse": _rel(out_dir, nrmse_path)}
        if "responsibilities" in arrays:
            resp = arrays["responsibilities"].astype(np.float32)
            k = resp.shape[1]
            fitted = np.all(np.isfinite(resp), axis=1)
            labels = np.zeros(len(resp), dtype=np.int16)
            labels[fitted] = np.argmax(resp[fitted], axis=1) + 1
            dseg = save(naming.dseg_name(ents, model_name, method), rows_to_volume(labels, mask, 0),
                        dv.dseg_sidecar(info, method, hyper, k, probabilistic=False, **common),
                        dtype=np.int16)
            tsv = dwi_dir / naming.dseg_table_name(ents, model_name, method)
            write_text_atomic(tsv, dv.dseg_tsv(k))
            written.append(tsv)
            probseg = save(naming.probseg_name(ents, model_name, method),
                           rows_to_volume(np.nan_to_num(resp, nan=0.0), mask, 0.0),
                           dv.dseg_sidecar(info, method, hyper, k, probabilistic=True, **common))
            extra.update({"dseg": _rel(out_dir, dseg), "dseg_tsv": _rel(out_dir, tsv),
                          "probseg": _rel(out_dir, probseg)})
        if "latent_mean" in arrays:
            latent = log_dir / naming.latent_name(ents, model_name, method)
            write_npz_atomic(latent, **latent_subsample(arrays, mask, common["seed"]))
            written.append(latent)
            extra["latent"] = _rel(out_dir, latent)
        fit_record = {k: record[k] for k in (
            "model", "method", "hyperparameters", "history", "timings", "device", "seed",
            "n_voxels", "n_invalid", "n_at_bound", "nrmse_median", "nrmse_mean")}
        fit_record.update({"maps": record_maps, "std_maps": record_std, **extra,
                           "n_excluded": record.get("n_excluded", 0),
                           "n_measurements": record.get("n_measurements")})
        record_path = log_dir / naming.fit_record_name(ents, model_name, method)
        write_json_atomic(record_path, fit_record)  # last: its presence means "complete"
        written.append(record_path)
        self._results["out_files"] = [str(p) for p in written]
        self._results["fit_record"] = str(record_path)
        return runtime


def latent_subsample(arrays: dict, mask: np.ndarray, seed: int,
                     limit: int = LATENT_SUBSAMPLE) -> dict:
    """A seeded subsample (<= ``limit``) of fitted voxels: ``latent_mean`` (n, L),
    ``responsibilities`` (n, K) for vaegmm, ``index`` (n,) = flat C-order voxel index in the 3-D
    grid, and ``shape`` of that grid."""
    latent = arrays["latent_mean"]
    fitted = np.flatnonzero(np.all(np.isfinite(latent), axis=1))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(fitted, size=min(limit, fitted.size), replace=False))
    out = {"latent_mean": latent[rows].astype(np.float32),
           "index": np.flatnonzero(mask.ravel())[rows].astype(np.int64),
           "shape": np.array(mask.shape, dtype=np.int64)}
    if "responsibilities" in arrays:
        out["responsibilities"] = arrays["responsibilities"][rows].astype(np.float32)
    return out


class _WriteMaskInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True)
    mask_info = traits.Dict(mandatory=True)
    entities = traits.Dict(mandatory=True)
    output_dir = traits.Str(mandatory=True)
    sources = traits.List(traits.Str, value=[], usedefault=True)


class _WriteMaskOutputSpec(TraitedSpec):
    out_file = traits.Str()


class WriteMask(SimpleInterface):
    """``<prefix>_desc-brain_mask.nii.gz`` and its sidecar."""

    input_spec = _WriteMaskInputSpec
    output_spec = _WriteMaskOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        out_dir = Path(self.inputs.output_dir)
        name = naming.mask_name(self.inputs.entities)
        path = out_dir / naming.dwi_dir(self.inputs.entities) / name
        img = nib.load(self.inputs.mask_file)
        write_nifti_atomic(path, dv.image_like(np.asanyarray(img.dataobj), img, np.uint8))
        write_json_atomic(path.parent / naming.sidecar(name),
                             dv.mask_sidecar(self.inputs.mask_info["source"],
                                             list(self.inputs.sources)))
        self._results["out_file"] = str(path)
        return runtime


class _WriteSummaryInputSpec(BaseInterfaceInputSpec):
    plan = traits.Dict(mandatory=True, desc="SeriesPlan.to_dict() of the series")
    methods = traits.List(traits.Str, mandatory=True)
    mask_info = traits.Dict(mandatory=True)
    signal_info = traits.Dict(mandatory=True)
    fit_records = traits.List(traits.Str, value=[], usedefault=True,
                              desc="written fit records (also orders this node after the fits)")
    output_dir = traits.Str(mandatory=True)
    device = traits.Str(mandatory=True)
    seed = traits.Int(mandatory=True)
    validator = traits.Str(mandatory=True)
    started = traits.Str(mandatory=True)


class _WriteSummaryOutputSpec(TraitedSpec):
    summary_file = traits.Str()


class WriteSummary(SimpleInterface):
    """``<prefix>_summary.json``: what ran on which inputs, for the reports."""

    input_spec = _WriteSummaryInputSpec
    output_spec = _WriteSummaryOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        plan = self.inputs.plan
        series = plan["series"]
        ents = series["entities"]
        models = {}
        for name, decision in plan["models"].items():
            ran = decision["status"] == "ran"
            models[name] = {"status": decision["status"], "reason": decision["reason"],
                            "methods": list(self.inputs.methods) if ran else [],
                            "n_measurements": decision["n_measurements"]}
        mask_info = dict(self.inputs.mask_info)
        summary = {
            "subject": ents["subject"],
            "session": ents.get("session"),
            "entities": ents,
            "prefix": naming.prefix(ents),
            "inputs": {"dwi": series["dwi"], "bval": series["bval"], "bvec": series["bvec"],
                       "mask_source": mask_info.pop("source")},
            "acquisition": {"n_volumes": plan["n_volumes"], "shells": plan["shells"]},
            "shape": list(plan["shape"]),
            "voxel_size_mm": list(plan["voxel_size_mm"]),
            "mask": {**mask_info, "excluded_nonpositive_b0":
                     self.inputs.signal_info.get("excluded_nonpositive_b0", 0)},
            "models": models,
            "device": self.inputs.device,
            "seed": self.inputs.seed,
            "versions": software_versions(),
            "validator": self.inputs.validator,
            "started": self.inputs.started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "fit_records": [_rel(Path(self.inputs.output_dir), Path(p))
                            for p in self.inputs.fit_records],
        }
        path = Path(self.inputs.output_dir) / naming.log_dir(ents) / naming.summary_name(ents)
        write_json_atomic(path, summary)
        self._results["summary_file"] = str(path)
        return runtime


def software_versions() -> dict:
    import dipy
    import nipype
    import torch

    from .. import __version__
    return {"vaemap": __version__, "torch": torch.__version__, "dipy": dipy.__version__,
            "nipype": nipype.__version__, "numpy": np.__version__}
