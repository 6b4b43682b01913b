"""Thin Nipype interfaces of the QSM steps (the science is in :mod:`vaemap_bids.qsm`)."""
from __future__ import annotations

import json
import os

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..atomic import write_json_atomic, write_npz_atomic


def _load_echoes(files):
    import nibabel as nib
    imgs = [nib.load(f) for f in files]
    return np.stack([np.asanyarray(i.dataobj, dtype=np.float64) for i in imgs], -1), imgs[0]


class _MaskIn(BaseInterfaceInputSpec):
    magnitude_files = traits.List(File(exists=True), mandatory=True)
    given_mask = traits.Str("", usedefault=True, desc="a derivative brain mask, or ''")
    options = traits.Str("{}", usedefault=True)


class _MaskOut(TraitedSpec):
    mask_file = File(exists=True)
    mask_source = traits.Str()


class QsmMask(SimpleInterface):
    """The brain mask: the given one, else from the magnitude."""

    input_spec = _MaskIn
    output_spec = _MaskOut

    def _run_interface(self, runtime):
        import nibabel as nib
        from ..qsm.pipeline import brain_mask
        mag, ref = _load_echoes(self.inputs.magnitude_files)
        opts = json.loads(self.inputs.options)
        given = None
        if self.inputs.given_mask:
            given = np.asanyarray(nib.load(self.inputs.given_mask).dataobj)
            if given.shape[:3] != mag.shape[:3]:
                raise ValueError(f"{self.inputs.given_mask}: shape {given.shape} does not "
                                 f"match the MEGRE images' {mag.shape[:3]}")
        mask, source = brain_mask(mag, given, erode=int(opts["qsm"]["mask_erode"]))
        if given is not None:
            source = f"given: {self.inputs.given_mask}"
        out = os.path.abspath("mask.npz")
        write_npz_atomic(out, mask=mask, affine=ref.affine)
        self._results["mask_file"] = out
        self._results["mask_source"] = source
        return runtime


class _FieldIn(BaseInterfaceInputSpec):
    magnitude_files = traits.List(File(exists=True), mandatory=True)
    phase_files = traits.List(File(exists=True), mandatory=True)
    echo_times = traits.List(traits.Float, mandatory=True)
    b0_tesla = traits.Float(mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    options = traits.Str("{}", usedefault=True)


class _FieldOut(TraitedSpec):
    field_file = File(exists=True)


class QsmLocalField(SimpleInterface):
    """Phase to radians, unwrapping, the multi-echo field fit, background removal."""

    input_spec = _FieldIn
    output_spec = _FieldOut

    def _run_interface(self, runtime):
        from ..qsm.field import to_radians
        from ..qsm.pipeline import local_field
        mag, ref = _load_echoes(self.inputs.magnitude_files)
        raw, _ = _load_echoes(self.inputs.phase_files)
        phase = np.stack([to_radians(raw[..., e]) for e in range(raw.shape[-1])], -1)
        mask = np.load(self.inputs.mask_file)["mask"]
        res = local_field(mag, phase, self.inputs.echo_times, self.inputs.b0_tesla, ref.affine,
                          mask, json.loads(self.inputs.options))
        out = os.path.abspath("field.npz")
        write_npz_atomic(out, total=res["total"], sigma=res["sigma"], local=res["local"],
                         mask=res["mask"], brain=mask, affine=ref.affine,
                         seconds=res["seconds"])
        self._results["field_file"] = out
        return runtime


class _InvertIn(BaseInterfaceInputSpec):
    field_file = File(exists=True, mandatory=True)
    method = traits.Enum("tkd", "tv", "dip", mandatory=True)
    options = traits.Str("{}", usedefault=True)
    seed = traits.Int(0, usedefault=True)
    device = traits.Str("cpu", usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, nohash=True)
    num_threads = traits.Int(1, usedefault=True, nohash=True)


class _InvertOut(TraitedSpec):
    chi_file = File(exists=True)
    record_file = File(exists=True)


class QsmInvert(SimpleInterface):
    """One dipole inversion (DIP: a GPU node when there is a GPU, as the diffusion networks)."""

    input_spec = _InvertIn
    output_spec = _InvertOut

    def _run_interface(self, runtime):
        import torch
        from threadpoolctl import threadpool_limits

        from ..fitting.base import resolve_device
        from ..qsm.pipeline import invert
        data = np.load(self.inputs.field_file)
        threads = max(1, self.inputs.num_threads)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with threadpool_limits(threads):
                chi, record = invert(self.inputs.method, data["local"], data["mask"],
                                     data["affine"], data["sigma"],
                                     json.loads(self.inputs.options), seed=self.inputs.seed,
                                     device=str(resolve_device(self.inputs.device)))
        finally:
            torch.set_num_threads(before)
        record["threads"] = threads
        out = os.path.abspath(f"chi_{self.inputs.method}.npz")
        write_npz_atomic(out, chi=chi)
        rec = os.path.abspath(f"record_{self.inputs.method}.json")
        write_json_atomic(rec, record)
        self._results["chi_file"] = out
        self._results["record_file"] = rec
        return runtime


class _ProductsIn(BaseInterfaceInputSpec):
    field_file = File(exists=True, mandatory=True)
    mask_source = traits.Str("", usedefault=True)
    chi_files = traits.List(File(exists=True), mandatory=True)
    record_files = traits.List(File(exists=True), mandatory=True)
    entities = traits.Dict(mandatory=True)
    plan = traits.Dict(mandatory=True, desc="QsmPlan.to_dict()")
    sources = traits.List(traits.Str, usedefault=True)
    seed = traits.Int(0, usedefault=True)


class _ProductsOut(TraitedSpec):
    out_root = traits.Str()
    out_files = traits.List(File(exists=True))


class QsmProducts(SimpleInterface):
    """The derivatives of one MEGRE series: chi maps, fields, mask, sidecars and the record."""

    input_spec = _ProductsIn
    output_spec = _ProductsOut

    def _run_interface(self, runtime):
        from ..qsm.products import write_qsm_products
        root = os.path.abspath("out")
        files = write_qsm_products(root, self.inputs.field_file, self.inputs.chi_files,
                                   self.inputs.record_files, self.inputs.entities,
                                   self.inputs.plan, self.inputs.mask_source,
                                   self.inputs.sources, self.inputs.seed)
        self._results["out_root"] = root
        self._results["out_files"] = files
        return runtime
