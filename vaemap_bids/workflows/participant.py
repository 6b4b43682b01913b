"""The graph of one DWI series (a participant, session, acquisition and run):

    brain_mask -> load_signals -> fit_<model>_<method> (one node each) -> writers -> summary

Node names are stable and their inputs deterministic (sorted JSON options, resolved device, the
seed), so a rerun with the same work dir re-uses every node that finished.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from nipype.pipeline import engine as pe

from ..config import Config
from ..dataset.bids import SeriesPlan
from ..fitting import NETWORK_METHODS
from ..fitting.options import options_for
from ..interfaces.fitting import FitModel
from ..interfaces.io import BrainMask, LoadSignals
from .outputs import init_fit_outputs_wf, init_mask_outputs_wf, init_summary_wf


def series_workflow_name(plan: SeriesPlan) -> str:
    """``sub-01_ses-a_run-1`` -> ``sub_01_ses_a_run_1_wf`` (Nipype names are identifiers)."""
    return re.sub(r"[^A-Za-z0-9]", "_", plan.series.prefix) + "_wf"


def bids_uri(path: str, bids_dir: str) -> str:
    """``bids:raw:sub-01/dwi/...`` for a file of the input dataset (the BIDS ``Sources`` form)."""
    try:
        return "bids:raw:" + str(Path(path).resolve().relative_to(Path(bids_dir).resolve()))
    except ValueError:
        return Path(path).resolve().as_uri()


def estimate_mem_gb(plan: SeriesPlan, factor: float, cap_gb: float) -> float:
    """A node's memory estimate from the image size (float32 copies), capped at the plugin's
    budget so that MultiProc never refuses a node it could run alone."""
    n_values = 1
    for s in plan.shape:
        n_values *= int(s)
    return float(min(max(0.25, factor * n_values * 4 / 1024 ** 3), cap_gb))


def init_single_subject_wf(plan: SeriesPlan, config: Config, name: str | None = None) -> pe.Workflow:
    """Mask, signals, one fit node per (model, method) the acquisition supports, and writers."""
    series = plan.series
    wf = pe.Workflow(name=name or series_workflow_name(plan))
    out_dir = str(Path(config.output_dir).resolve())
    sources = [bids_uri(p, config.bids_dir) for p in (series.dwi, series.bval, series.bvec)]
    cap = config.effective_mem_gb()
    device = config.resolved_device or "cpu"
    omp = config.effective_omp_nthreads()

    brain_mask = pe.Node(BrainMask(dwi_file=series.dwi, bval_file=series.bval,
                                   bvec_file=series.bvec), name="brain_mask",
                         mem_gb=estimate_mem_gb(plan, 0.3, cap))
    if plan.mask_file:
        brain_mask.inputs.given_mask = plan.mask_file
    load = pe.Node(LoadSignals(dwi_file=series.dwi, bval_file=series.bval, bvec_file=series.bvec),
                   name="load_signals", mem_gb=estimate_mem_gb(plan, 2.0, cap))
    wf.connect([(brain_mask, load, [("mask_file", "mask_file")])])

    mask_out = init_mask_outputs_wf(series.entities, out_dir, sources)
    wf.connect([(brain_mask, mask_out, [("mask_file", "inputnode.mask_file"),
                                        ("mask_info", "inputnode.mask_info")])])

    fits = [(m, meth) for m in plan.models_to_run() for meth in config.methods]
    summary = init_summary_wf(plan.to_dict(), list(config.methods), out_dir, device, config.seed,
                              config.validator, config.started, len(fits))
    wf.connect([(brain_mask, summary, [("mask_info", "inputnode.mask_info")]),
                (load, summary, [("signal_info", "inputnode.signal_info")])])

    for i, (model, method) in enumerate(fits):
        options = options_for(config.hyperparameters, method, model)
        gpu = device.startswith("cuda")
        fit = pe.Node(FitModel(model=model, method=method,
                               options=json.dumps(options, sort_keys=True), device=device,
                               seed=config.seed, use_gpu=gpu, num_threads=omp,
                               progress=config.verbosity > 0),
                      name=f"fit_{model}_{method}", n_procs=omp,
                      mem_gb=estimate_mem_gb(plan, 2.0 if method in NETWORK_METHODS else 3.0, cap))
        outputs = init_fit_outputs_wf(series.entities, model, method, out_dir, sources,
                                      config.seed)
        wf.connect([
            (load, fit, [("signals_file", "signals_file")]),
            (fit, outputs, [("fit_file", "inputnode.fit_file"),
                            ("record_file", "inputnode.record_file")]),
            (load, outputs, [("signals_file", "inputnode.signals_file")]),
            (brain_mask, outputs, [("mask_file", "inputnode.mask_file")]),
            (outputs, summary, [("outputnode.fit_record", f"inputnode.fit_record{i}")]),
        ])
    return wf
