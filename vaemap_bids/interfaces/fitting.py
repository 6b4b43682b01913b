"""The Nipype interface of one (model, method) fit: the series' signals in, estimates out.

The node exposes ``use_gpu`` so that Nipype's MultiProc (``n_gpu_procs``) never runs two GPU fits
at once on one GPU. ``use_gpu``, ``num_threads`` and ``progress`` do not enter the node's hash:
changing them on a rerun re-uses a finished fit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..atomic import to_jsonable
from ..dataset.signals import fit_quality
from ..fitting.base import METHODS, SPATIAL_METHODS
from ..physics import Acquisition, make_model


class _SeriesTag(logging.Filter):
    def __init__(self, tag: str):
        super().__init__()
        self.tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{self.tag}: {record.msg}"
        return True


@contextlib.contextmanager
def _log_tagged(tag: str):
    """Prefix what vaemap logs meanwhile with ``tag`` (one fit runs per process at a time)."""
    handlers = logging.getLogger("vaemap").handlers if tag else []
    tagger = _SeriesTag(tag)
    for handler in handlers:
        handler.addFilter(tagger)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(tagger)


class _FitInputSpec(BaseInterfaceInputSpec):
    signals_file = File(exists=True, mandatory=True, desc="npz written by PrepareSeries")
    model = traits.Str(mandatory=True, desc="signal model name (msdki, ballstick, ...)")
    method = traits.Enum(*METHODS, mandatory=True)
    options = traits.Str("{}", usedefault=True, desc="resolved hyper-parameters, sorted JSON")
    device = traits.Str("cpu", usedefault=True, desc="torch device (resolved: cpu, cuda, cuda:N)")
    seed = traits.Int(0, usedefault=True)
    use_gpu = traits.Bool(False, usedefault=True, nohash=True,
                          desc="Nipype MultiProc: this node occupies a GPU slot")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="torch CPU threads")
    progress = traits.Bool(False, usedefault=True, nohash=True, desc="show a progress bar")
    series = traits.Str("", usedefault=True, nohash=True, desc="series prefix, for the log")


class _FitOutputSpec(TraitedSpec):
    fit_file = File(exists=True, desc="npz: params, valid, nrmse, invalid, at_bound, and std, "
                                      "responsibilities, latent_mean where the method has them")
    record_file = File(exists=True, desc="json: hyper-parameters, history, timings, counts")


class FitModel(SimpleInterface):
    """``vaemap_bids.fitting.fit`` on the signals of one series, and the fit's quality."""

    input_spec = _FitInputSpec
    output_spec = _FitOutputSpec

    def _run_interface(self, runtime):
        import torch
        from threadpoolctl import threadpool_info, threadpool_limits

        from ..fitting import fit
        from ..fitting.calibration import check_fit

        threads = max(1, self.inputs.num_threads)  # the CPUs this node asked MultiProc for
        with np.load(self.inputs.signals_file) as data:
            signals = data["signals"]
            sigma = data["sigma"] if "sigma" in data.files else None   # σ/S0 per row
            series_noise = json.loads(str(data["noise"])) if "noise" in data.files else None
            acq = Acquisition(data["bvals"], data["bvecs"])
            denoise = str(data["denoise"]) if "denoise" in data.files else "none"
            # the spatial method reads each row's voxel (the plan's mask) and mean b0
            spatial = ({"voxel_coords": data["voxel_coords"], "s0": data["s0"]}
                       if self.inputs.method in SPATIAL_METHODS else {})
        model = make_model(self.inputs.model, acq)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with threadpool_limits(threads), _log_tagged(self.inputs.series):
                used = {"torch": torch.get_num_threads(),
                        "blas": max([p["num_threads"] for p in threadpool_info()], default=1)}
                result = fit(model, signals, self.inputs.method, device=self.inputs.device,
                             seed=self.inputs.seed, options=json.loads(self.inputs.options),
                             progress=self.inputs.progress, sigma=sigma, **spatial)
                if series_noise is not None:
                    result.hyperparameters.setdefault("noise", {})["series_estimate"] = series_noise
                # the std's coverage on voxels simulated like this series (report: calibration)
                calibration = check_fit(model, result, sigma,
                                        options=json.loads(self.inputs.options),
                                        device=self.inputs.device, seed=self.inputs.seed)
        finally:
            torch.set_num_threads(before)
        quality = fit_quality(model, signals, result.params, result.valid)
        arrays = {"params": result.params, "valid": result.valid, **quality}
        for name in ("std", "responsibilities", "latent_mean"):
            value = getattr(result, name)
            if value is not None:
                arrays[name] = value
        fit_file = os.path.join(runtime.cwd, "fit.npz")
        np.savez(fit_file, **arrays)
        fitted = result.valid & np.all(np.isfinite(result.params), axis=1)
        nrmse_fitted = quality["nrmse"][fitted]
        record = {
            "model": self.inputs.model,
            "method": self.inputs.method,
            "hyperparameters": result.hyperparameters,
            "history": result.history,
            "timings": result.timings,
            "device": result.device,
            "seed": result.seed,
            "n_voxels": int(fitted.sum()),
            "n_excluded": int((~result.valid).sum()),
            "n_failed": int((result.valid & ~fitted).sum()),
            "n_invalid": int(quality["invalid"].sum()),
            "n_at_bound": int(quality["at_bound"].sum()),
            "nrmse_median": float(np.median(nrmse_fitted)) if nrmse_fitted.size else None,
            "nrmse_mean": float(np.mean(nrmse_fitted)) if nrmse_fitted.size else None,
            "n_measurements": int(model.n_measurements),
            "threads": used,
            "calibration": calibration,
            "denoise": denoise,
        }
        record_file = os.path.join(runtime.cwd, "fit_record.json")
        with open(record_file, "w") as fobj:
            json.dump(record, fobj, default=to_jsonable)
        self._results["fit_file"] = fit_file
        self._results["record_file"] = record_file
        return runtime
