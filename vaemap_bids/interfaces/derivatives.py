"""Nipype interfaces that put derivatives into OUTPUT_DIR.

Products nodes (``FitProducts``, ``SeriesSummary``; ``SeriesProducts`` in :mod:`.series`) call
the plain functions of :mod:`vaemap_bids.outputs` and write their files in the node's folder at
the paths of the derivatives table; ``DerivativesSink`` (always run, like niworkflows'
DerivativesDataSink) copies them into OUTPUT_DIR atomically, in order, so a rerun restores
deleted outputs from the cached products and the record written last marks completeness.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..atomic import copy_file_atomic
from ..outputs.products import Product, fit_products, write_products
from ..outputs.records import series_summary, summary_output
from .series import _ProductsOutputSpec


class _FitProductsInputSpec(BaseInterfaceInputSpec):
    fit_file = File(exists=True, mandatory=True)
    record_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True, desc="grid, header and voxel order of the rows")
    entities = traits.Dict(mandatory=True, desc="the series' entities")
    sources = traits.List(traits.Str, value=[], usedefault=True)


class FitProducts(SimpleInterface):
    """Every derivative of one fit (maps, std, NRMSE, clusters, latent, fit record)."""

    input_spec = _FitProductsInputSpec
    output_spec = _ProductsOutputSpec

    def _run_interface(self, runtime):
        img = nib.load(self.inputs.mask_file)
        mask = np.asanyarray(img.dataobj) > 0
        with np.load(self.inputs.fit_file) as fit:
            arrays = {k: fit[k] for k in fit.files}
        record = json.loads(Path(self.inputs.record_file).read_text())
        products = fit_products(arrays, record, self.inputs.entities, mask, img.affine,
                                list(self.inputs.sources))
        root = os.path.join(runtime.cwd, "derivatives")
        self._results["out_root"] = root
        self._results["out_files"] = [str(p) for p in write_products(products, root, img)]
        return runtime


class _SeriesSummaryInputSpec(BaseInterfaceInputSpec):
    plan = traits.Dict(mandatory=True, desc="SeriesPlan.to_dict() of the series")
    methods = traits.List(traits.Str, mandatory=True)
    mask_info = traits.Dict(mandatory=True)
    fit_records = traits.List(traits.Str, value=[], usedefault=True,
                              desc="written fit records (also orders this node after the fits)")
    output_dir = traits.Str(mandatory=True)
    device = traits.Str(mandatory=True)
    seed = traits.Int(mandatory=True)
    validator = traits.Str(mandatory=True)
    started = traits.Str(mandatory=True)


class SeriesSummary(SimpleInterface):
    """``<prefix>_summary.json``: what ran on which inputs, for the reports."""

    input_spec = _SeriesSummaryInputSpec
    output_spec = _ProductsOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        i = self.inputs
        summary = series_summary(i.plan, list(i.methods), dict(i.mask_info), list(i.fit_records),
                                 i.output_dir, device=i.device, seed=i.seed, validator=i.validator,
                                 started=i.started)
        root = os.path.join(runtime.cwd, "derivatives")
        out = summary_output(i.plan["series"]["entities"])
        self._results["out_root"] = root
        self._results["out_files"] = [str(p) for p in write_products([Product(out, summary)],
                                                                     root, None)]
        return runtime


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_files = traits.List(File(exists=True), mandatory=True, desc="files under in_root")
    in_root = traits.Str(mandatory=True, desc="their paths relative to it are the output paths")
    output_dir = traits.Str(mandatory=True)


class _SinkOutputSpec(TraitedSpec):
    out_files = traits.List(traits.Str, desc="the files in OUTPUT_DIR, in writing order")
    last_file = traits.Str(desc="the file written last (a fit record or a summary)")


class DerivativesSink(SimpleInterface):
    """Copy products into OUTPUT_DIR at their relative paths, each atomically, in order."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        root, out_dir = Path(self.inputs.in_root), Path(self.inputs.output_dir)
        written = [str(copy_file_atomic(f, out_dir / Path(f).relative_to(root)))
                   for f in self.inputs.in_files]
        self._results["out_files"] = written
        self._results["last_file"] = written[-1] if written else ""
        return runtime
