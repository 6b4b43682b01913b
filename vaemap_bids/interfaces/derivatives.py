"""Nipype interfaces that put derivatives into OUTPUT_DIR.

Products nodes (``SeriesProducts``, ``FitProducts``, ``SeriesSummary``) call the plain functions
of :mod:`vaemap_bids.outputs` and write their files in the node's folder at the paths of the
derivatives table; ``DerivativesSink`` (always run, like niworkflows' DerivativesDataSink)
copies them into OUTPUT_DIR atomically, in order, so a rerun restores deleted outputs from the
cached products and the record written last marks completeness.
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
from ..outputs.products import Product, fit_products, series_products, write_products
from ..outputs.records import series_summary, summary_output


class _ProductsOutputSpec(TraitedSpec):
    out_root = traits.Str(desc="folder holding the products at their OUTPUT_DIR paths")
    out_files = traits.List(File(exists=True), desc="the products, in writing order")


class _ProductsInterface(SimpleInterface):
    """Writes what :meth:`products` returns under ``<node dir>/derivatives``."""

    output_spec = _ProductsOutputSpec

    def products(self) -> tuple[list[Product], object]:
        """The products and the image (or header) whose grid they are on."""
        raise NotImplementedError

    def _run_interface(self, runtime):
        products, reference = self.products()
        root = os.path.join(runtime.cwd, "derivatives")
        self._results["out_root"] = root
        self._results["out_files"] = [str(p) for p in write_products(products, root, reference)]
        return runtime


def _load_mask(path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(path)
    return np.asanyarray(img.dataobj) > 0, img


class _OnGridInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="grid, header and voxel order of the rows")
    entities = traits.Dict(mandatory=True, desc="the series' entities")
    sources = traits.List(traits.Str, value=[], usedefault=True, desc="BIDS URIs of the inputs")


class _SeriesProductsInputSpec(_OnGridInputSpec):
    signals_file = File(exists=True, mandatory=True, desc="for the valid rows")
    mask_info = traits.Dict(mandatory=True)


class SeriesProducts(_ProductsInterface):
    """The brain mask and validity mask derivatives."""

    input_spec = _SeriesProductsInputSpec

    def products(self):
        mask, img = _load_mask(self.inputs.mask_file)
        with np.load(self.inputs.signals_file) as data:
            valid = np.zeros(mask.shape, dtype=bool)
            valid[mask] = data["valid"]
        info = self.inputs.mask_info
        return series_products(self.inputs.entities, mask, valid, info["source"],
                               info["excluded"], list(self.inputs.sources)), img


class _FitProductsInputSpec(_OnGridInputSpec):
    fit_file = File(exists=True, mandatory=True)
    record_file = File(exists=True, mandatory=True)


class FitProducts(_ProductsInterface):
    """Every derivative of one fit (maps, std, NRMSE, clusters, latent, fit record)."""

    input_spec = _FitProductsInputSpec

    def products(self):
        mask, img = _load_mask(self.inputs.mask_file)
        with np.load(self.inputs.fit_file) as fit:
            arrays = {k: fit[k] for k in fit.files}
        record = json.loads(Path(self.inputs.record_file).read_text())
        return fit_products(arrays, record, self.inputs.entities, mask, img.affine,
                            list(self.inputs.sources)), img


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
    final = traits.Bool(True, usedefault=True,
                        desc="False: the summary written before the fits, so that a failed fit "
                             "still leaves a report of the others")
    after = traits.Any(desc="only orders this node after another")


class SeriesSummary(_ProductsInterface):
    """``<prefix>_summary.json``: what ran on which inputs, for the reports."""

    input_spec = _SeriesSummaryInputSpec
    _always_run = True

    def products(self):
        i = self.inputs
        summary = series_summary(i.plan, list(i.methods), dict(i.mask_info), list(i.fit_records),
                                 i.output_dir, device=i.device, seed=i.seed, validator=i.validator,
                                 started=i.started, final=i.final)
        return [Product(summary_output(i.plan["series"]["entities"]), summary)], None


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
