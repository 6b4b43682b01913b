"""Nipype interfaces that read a DWI series: the brain mask and the b0-normalised signals.

They only move files in and out of the functions in :mod:`vaemap_bids.dataset`.
"""
from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..dataset.gradients import load_acquisition, read_image_info, scan_image
from ..dataset.masking import NUMPASS, compute_brain_mask, load_mask, mask_image, median_radius
from ..dataset.signals import load_masked_signals


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True, desc="4-D DWI image")
    bval_file = File(exists=True, mandatory=True, desc="BIDS .bval")
    bvec_file = File(exists=True, mandatory=True, desc="BIDS .bvec")
    given_mask = File(exists=True, desc="a desc-brain_mask from --derivatives (else median_otsu)")


class _BrainMaskOutputSpec(TraitedSpec):
    mask_file = File(exists=True, desc="the mask used for fitting (uint8, DWI grid)")
    mask_info = traits.Dict(desc="source, voxel counts")


class BrainMask(SimpleInterface):
    """The given mask, or dipy's median_otsu on the mean b0; voxels with NaN/Inf are removed."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        info = read_image_info(self.inputs.dwi_file)
        acq = load_acquisition(self.inputs.bval_file, self.inputs.bvec_file, info.n_volumes)
        scan = scan_image(self.inputs.dwi_file, acq, info)
        if isdefined(self.inputs.given_mask):
            brain = load_mask(self.inputs.given_mask, info.shape, info.affine)
            source = f"given: {self.inputs.given_mask}"
        else:
            brain = compute_brain_mask(scan.mean_b0, info.zooms)
            source = (f"dipy median_otsu on the mean b0 (median radius "
                      f"{median_radius(info.zooms)} voxels, {NUMPASS} passes)")
        excluded = int((brain & scan.nonfinite).sum())
        mask = brain & ~scan.nonfinite
        if not mask.any():
            raise ValueError(f"{self.inputs.dwi_file}: every brain voxel has NaN/Inf values")
        ref = nib.load(self.inputs.dwi_file)
        out = os.path.join(runtime.cwd, "brain_mask.nii.gz")
        nib.save(mask_image(mask, info.affine, ref.header), out)
        self._results["mask_file"] = out
        self._results["mask_info"] = {
            "source": source,
            "n_voxels": int(mask.sum()),
            "volume_ml": round(float(mask.sum()) * info.voxel_volume_ml, 3),
            "excluded_nonfinite": excluded,
        }
        return runtime


class _LoadSignalsInputSpec(BaseInterfaceInputSpec):
    dwi_file = File(exists=True, mandatory=True)
    bval_file = File(exists=True, mandatory=True)
    bvec_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)


class _LoadSignalsOutputSpec(TraitedSpec):
    signals_file = File(exists=True, desc="npz: signals (N, T) S/S0 of the mask's voxels, "
                                          "bvals (ms/um^2), bvecs (T, 3, .bvec frame)")
    signal_info = traits.Dict(desc="voxel counts")


class LoadSignals(SimpleInterface):
    """The mask's voxels divided by their mean b0, one row each (NaN rows are excluded voxels)."""

    input_spec = _LoadSignalsInputSpec
    output_spec = _LoadSignalsOutputSpec

    def _run_interface(self, runtime):
        info = read_image_info(self.inputs.dwi_file)
        acq = load_acquisition(self.inputs.bval_file, self.inputs.bvec_file, info.n_volumes)
        mask = np.asanyarray(nib.load(self.inputs.mask_file).dataobj) > 0
        loaded = load_masked_signals(self.inputs.dwi_file, acq, mask, info)
        out = os.path.join(runtime.cwd, "signals.npz")
        # uncompressed: written once, read by every fit node
        np.savez(out, signals=loaded.signals, bvals=acq.bvals, bvecs=acq.bvecs)
        self._results["signals_file"] = out
        self._results["signal_info"] = {
            "n_voxels": int(mask.sum()),
            "n_valid": int(loaded.valid.sum()),
            "n_nonfinite": loaded.n_nonfinite,
            "excluded_nonpositive_b0": loaded.n_nonpositive_b0,
        }
        with open(os.path.join(runtime.cwd, "signal_info.json"), "w") as fobj:
            json.dump(self._results["signal_info"], fobj)
        return runtime
