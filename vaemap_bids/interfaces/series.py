"""``PrepareSeries``: the brain mask and the b0-normalised signals of one DWI series, from one
pass over the image; it only moves files in and out of :mod:`vaemap_bids.dataset.signals`.

``DenoiseSeries`` (``--denoise``) runs before it: it reads the series, denoises the kept volumes
inside the plan's mask (:mod:`vaemap_bids.dataset.denoise`) and writes the result into its own
work folder, uncompressed, and PrepareSeries reads that instead of the input (still one pass).
``DenoisedProducts`` turns it into the ``desc-denoised_dwi`` derivative when asked for.
"""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..dataset.gradients import load_acquisition
from ..dataset.signals import prepare_series, raw_series_sigma
from ..outputs.products import image_like


class _PrepareSeriesInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4-D DWI image")
    bval_file = File(exists=True, mandatory=True, desc="BIDS .bval")
    bvec_file = File(exists=True, mandatory=True, desc="BIDS .bvec")
    arrays_file = File(exists=True, mandatory=True,
                       desc="the plan's brain mask and volumes kept (.npz)")
    mask_source = traits.Str(mandatory=True, desc="where the mask came from")
    n_coils = traits.Int(1, usedefault=True, desc="receive channels of the magnitude (sigma)")
    denoise_info = traits.Dict(value={"method": "none"}, usedefault=True,
                               desc="what DenoiseSeries did to dwi_file (method, counts)")
    raw_noise = traits.Dict(desc="the noise sigma estimated before denoising (DenoiseSeries): "
                                 "replaces the estimate from dwi_file's b0 repeats")


class _PrepareSeriesOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="the brain mask used (uint8, DWI grid and header)")
    signals_file = File(exists=True, desc="npz: signals (N, T) S/S0 of the mask's voxels (NaN "
                                          "rows excluded), s0 (N,), valid (N,), bvals (ms/um^2), "
                                          "bvecs (T, 3, .bvec frame), voxel_coords (N, 3): the "
                                          "voxel indices of the rows, denoise, sigma (N,) "
                                          "sigma/S0 when the series has an estimate, noise (JSON)")
    mask_info = traits.Dict(desc="mask source, voxel counts, excluded voxels, noise estimate")


class PrepareSeries(SimpleInterface):
    """The mask and the mask's signal rows, reading the image once (see
    :func:`vaemap_bids.dataset.signals.prepare_series`)."""

    input_spec = _PrepareSeriesInputSpec
    output_spec = _PrepareSeriesOutputSpec

    def _run_interface(self, runtime):
        acq = load_acquisition(self.inputs.bval_file, self.inputs.bvec_file)
        with np.load(self.inputs.arrays_file) as plan:
            mask, keep = plan["mask"], plan["keep"]
        raw_noise = self.inputs.raw_noise if isdefined(self.inputs.raw_noise) else None
        prepared = prepare_series(self.inputs.dwi_file, acq, mask, keep, self.inputs.mask_source,
                                  n_coils=self.inputs.n_coils, noise=raw_noise)
        info = prepared.info
        mask_file = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        nib.save(image_like(prepared.mask, info.header, np.uint8), mask_file)
        signals_file = os.path.join(runtime.cwd, "signals.npz")
        # uncompressed: written once, read by every fit node
        sigma = {} if prepared.sigma is None else {"sigma": prepared.normalised_sigma}
        np.savez(signals_file, signals=prepared.signals, s0=prepared.s0, valid=prepared.valid,
                 bvals=prepared.acquisition.bvals, bvecs=prepared.acquisition.bvecs,
                 noise=json.dumps(prepared.noise),
                 denoise=np.array(self.inputs.denoise_info.get("method", "none")),
                 voxel_coords=np.argwhere(prepared.mask).astype(np.int32), **sigma)
        n = int(prepared.mask.sum())
        self._results.update(mask_file=mask_file, signals_file=signals_file, mask_info={
            "source": prepared.mask_source, "n_voxels": n,
            "n_valid": int(prepared.valid.sum()),
            "volume_ml": round(n * info.voxel_volume_ml, 3),
            "excluded": prepared.excluded, "noise": prepared.noise,
            "denoise": dict(self.inputs.denoise_info)})
        return runtime


class _DenoiseInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4-D DWI image")
    bval_file = File(exists=True, mandatory=True, desc="BIDS .bval")
    bvec_file = File(exists=True, mandatory=True, desc="BIDS .bvec")
    arrays_file = File(exists=True, mandatory=True,
                       desc="the plan's brain mask and volumes kept (.npz)")
    method = traits.Enum("mppca", "patch2self", mandatory=True)
    n_coils = traits.Int(1, usedefault=True, desc="receive channels of the magnitude (sigma)")


class _DenoiseOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="the denoised series (float32 NIfTI, the input's grid; "
                                      "volumes left out by the plan are copied as they were)")
    sigma_file = File(desc="MP-PCA's noise sd per voxel (mppca only)")
    denoise_info = traits.Dict(desc="method, volumes denoised, median sigma (mppca)")
    raw_noise = traits.Dict(desc="noise sigma of the series before denoising, and how "
                                 "(dataset.signals.raw_series_sigma)")


class DenoiseSeries(SimpleInterface):
    """:func:`vaemap_bids.dataset.denoise.denoise` on the kept volumes of a series."""

    input_spec = _DenoiseInputSpec
    output_spec = _DenoiseOutputSpec

    def _run_interface(self, runtime):
        from ..dataset.denoise import denoise
        from ..dataset.image import open_image

        acq = load_acquisition(self.inputs.bval_file, self.inputs.bvec_file)
        with np.load(self.inputs.arrays_file) as plan:
            mask, keep = plan["mask"].astype(bool), plan["keep"].astype(bool)
        with open_image(self.inputs.dwi_file) as (info, volumes):
            if info.n_volumes != acq.n_volumes:
                raise ValueError(f"{self.inputs.dwi_file}: {info.n_volumes} volumes but the "
                                 f"gradient table has {acq.n_volumes}")
            data = np.empty((*info.shape[:3], info.n_volumes), dtype=np.float32)
            for index, vol in volumes:
                data[..., index] = vol
        inside = mask & np.all(np.isfinite(data[..., keep]), axis=-1)
        raw_b0 = data[inside][:, keep & acq.b0_mask]     # (N, n_b0), before denoising
        denoised, extra = denoise(data[..., keep], acq.bvals[keep] * 1e3, inside,
                                  self.inputs.method)
        data[..., keep] = denoised
        out_file = os.path.join(runtime.cwd, "denoised_dwi.nii")   # uncompressed: read once
        img = nib.Nifti1Image(data, info.header.get_best_affine(), info.header)
        img.set_data_dtype(np.float32)
        img.header.set_slope_inter(1.0, 0.0)
        nib.save(img, out_file)
        record = {"method": self.inputs.method, "n_volumes_denoised": int(keep.sum()),
                  "n_voxels_denoised": int(inside.sum())}
        if "sigma" in extra:
            sigma_file = os.path.join(runtime.cwd, "mppca_sigma.nii.gz")
            nib.save(image_like(extra["sigma"], info.header, np.float32), sigma_file)
            self._results["sigma_file"] = sigma_file
            record["sigma_median"] = float(np.median(extra["sigma"][inside]))
        # The fits' noise model needs the noise of the magnitude data, which denoising hides
        # (its b0 repeats vary less): estimate it here, from the raw b0 volumes.
        _, raw_noise = raw_series_sigma(raw_b0, self.inputs.n_coils,
                                        extra["sigma"][inside] if "sigma" in extra else None)
        self._results.update(out_file=out_file, denoise_info=record, raw_noise=raw_noise)
        return runtime


class _DenoisedProductsInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="DenoiseSeries' out_file")
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    entities = traits.Dict(mandatory=True, desc="the series' entities")
    sources = traits.List(traits.Str, value=[], usedefault=True, desc="BIDS URIs of the inputs")
    denoise_info = traits.Dict(mandatory=True)


class _DenoisedProductsOutputSpec(TraitedSpec):
    out_root = traits.Str(desc="folder holding the products at their OUTPUT_DIR paths")
    out_files = traits.List(File(exists=True), desc="the products, in writing order")


class DenoisedProducts(SimpleInterface):
    """The ``desc-denoised_dwi`` derivative: the series (.nii.gz), its .bval/.bvec (copies of
    the input's) and a sidecar saying how it was made."""

    input_spec = _DenoisedProductsInputSpec
    output_spec = _DenoisedProductsOutputSpec

    def _run_interface(self, runtime):
        from ..atomic import copy_file_atomic, write_json_atomic, write_nifti_atomic
        from ..outputs.sidecars import denoise_block
        from ..outputs.table import output

        out = output("denoised", dict(self.inputs.entities))
        root = os.path.join(runtime.cwd, "derivatives")
        path = os.path.join(root, out.path)
        stem = path[: -len(".nii.gz")]
        img = nib.load(self.inputs.in_file)
        written = [str(write_nifti_atomic(path, nib.Nifti1Image(
            np.asarray(img.dataobj, dtype=np.float32), img.affine, img.header)))]
        written.append(str(copy_file_atomic(self.inputs.bval_file, stem + ".bval")))
        written.append(str(copy_file_atomic(self.inputs.bvec_file, stem + ".bvec")))
        info = dict(self.inputs.denoise_info)
        side = {"Description": "The DWI series after denoising, as the fits read it",
                "Denoising": {**denoise_block(info["method"]),
                              **{k: v for k, v in info.items() if k != "method"}},
                "Sources": list(self.inputs.sources)}
        written.append(str(write_json_atomic(stem + ".json", side)))
        self._results.update(out_root=root, out_files=written)
        return runtime
