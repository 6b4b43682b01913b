"""``PrepareSeries``: the brain mask and the b0-normalised signals of one DWI series, from one
pass over the image; it only moves files in and out of :mod:`vaemap_bids.dataset.signals`.
"""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..dataset.gradients import load_acquisition
from ..dataset.signals import prepare_series
from ..outputs.products import image_like


class _PrepareSeriesInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4-D DWI image")
    bval_file = File(exists=True, mandatory=True, desc="BIDS .bval")
    bvec_file = File(exists=True, mandatory=True, desc="BIDS .bvec")
    arrays_file = File(exists=True, mandatory=True,
                       desc="the plan's brain mask and volumes kept (.npz)")
    mask_source = traits.Str(mandatory=True, desc="where the mask came from")
    n_coils = traits.Int(1, usedefault=True, desc="receive channels of the magnitude (sigma)")


class _PrepareSeriesOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="the brain mask used (uint8, DWI grid and header)")
    signals_file = File(exists=True, desc="npz: signals (N, T) S/S0 of the mask's voxels (NaN "
                                          "rows excluded), s0 (N,), valid (N,), bvals (ms/um^2), "
                                          "bvecs (T, 3, .bvec frame), sigma (N,) sigma/S0 "
                                          "when the series has an estimate, noise (JSON)")
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
        prepared = prepare_series(self.inputs.dwi_file, acq, mask, keep, self.inputs.mask_source,
                                  n_coils=self.inputs.n_coils)
        info = prepared.info
        mask_file = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        nib.save(image_like(prepared.mask, info.header, np.uint8), mask_file)
        signals_file = os.path.join(runtime.cwd, "signals.npz")
        # uncompressed: written once, read by every fit node
        sigma = {} if prepared.sigma is None else {"sigma": prepared.normalised_sigma}
        np.savez(signals_file, signals=prepared.signals, s0=prepared.s0, valid=prepared.valid,
                 bvals=prepared.acquisition.bvals, bvecs=prepared.acquisition.bvecs,
                 noise=json.dumps(prepared.noise), **sigma)
        n = int(prepared.mask.sum())
        self._results.update(mask_file=mask_file, signals_file=signals_file, mask_info={
            "source": prepared.mask_source, "n_voxels": n,
            "n_valid": int(prepared.valid.sum()),
            "volume_ml": round(n * info.voxel_volume_ml, 3),
            "excluded": prepared.excluded, "noise": prepared.noise})
        return runtime
