"""The graph of one DWI series (a participant, session, acquisition and run):

    prepare_series -> fit_<model>_<method> -> products_<model>_<method> -> ds_<model>_<method>
          |                                                                     |
          +-> series_products -> ds_series                     summary -> ds_summary
          +-> summary_early -> ds_summary_early (before the fits: a failed fit keeps a report)

With ``--denoise``, ``denoise_series -> prepare_series``: prepare_series reads the denoised
series (in denoise_series' work folder) instead of the input; ``--denoise-output`` adds
``denoised_products -> ds_denoised``.

``prepare_series`` reads the image once (mask + signals); every fit node reads its signals;
products nodes compute a fit's derivatives (:mod:`vaemap_bids.outputs`); sinks copy them into
OUTPUT_DIR. Node names are stable and their inputs deterministic (sorted JSON options, resolved
device, the seed), so a rerun with the same work dir re-uses every node that finished.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from nipype.pipeline import engine as pe

from ..config import Config
from ..dataset.bids import SeriesPlan
from ..fitting import NETWORK_METHODS
from ..interfaces.derivatives import DerivativesSink, FitProducts, SeriesProducts, SeriesSummary
from ..interfaces.fitting import FitModel
from ..interfaces.series import DenoisedProducts, DenoiseSeries, PrepareSeries


def series_workflow_name(plan: SeriesPlan) -> str:
    """``sub-01_ses-a_run-1`` -> ``sub_01_ses_a_run_1_wf`` (Nipype names are identifiers)."""
    return re.sub(r"[^A-Za-z0-9]", "_", plan.series.prefix) + "_wf"


def bids_uri(path: str, bids_dir: str, dataset: str = "raw") -> str:
    """``bids:raw:sub-01/dwi/...`` for a file of the input dataset (the BIDS ``Sources`` form;
    ``dataset`` is the input's name in the output's ``DatasetLinks``: raw, or qsiprep)."""
    try:
        return f"bids:{dataset}:" + str(Path(path).resolve().relative_to(Path(bids_dir).resolve()))
    except ValueError:
        return Path(path).resolve().as_uri()


def estimate_mem_gb(plan: SeriesPlan, factor: float, cap_gb: float) -> float:
    """A node's memory estimate from the image size (float32 copies), capped at the plugin's
    budget so that MultiProc never refuses a node it could run alone."""
    n_values = 1
    for s in plan.shape:
        n_values *= int(s)
    return float(min(max(0.25, factor * n_values * 4 / 1024 ** 3), cap_gb))


def _sink(name: str, output_dir: str) -> pe.Node:
    return pe.Node(DerivativesSink(output_dir=output_dir), name=name,
                   run_without_submitting=True)


def init_series_wf(plan: SeriesPlan, config: Config, name: str | None = None) -> pe.Workflow:
    """Prepare the series, fit every (model, method) the acquisition supports, write it all."""
    series = plan.series
    wf = pe.Workflow(name=name or series_workflow_name(plan))
    out_dir = str(Path(config.output_dir).resolve())
    sources = [bids_uri(p, config.bids_dir, config.source_dataset_name)
               for p in (series.sources or (series.dwi, series.bval, series.bvec))]
    cap = config.effective_mem_gb()
    device = config.resolved_device or "cpu"   # "auto" with a cluster plugin: the node decides
    omp = config.effective_omp_nthreads()

    fits = [(m, meth) for m in plan.models_to_run() for meth in config.methods]
    # the receive channels of the magnitude, for the series' sigma (the first fit's setting)
    n_coils = int(config.fit_options(*fits[0][::-1]).get("n_coils", 1)) if fits else 1
    prepare = pe.Node(PrepareSeries(bval_file=series.bval,
                                    bvec_file=series.bvec, arrays_file=plan.arrays_file,
                                    mask_source=plan.mask_source, n_coils=n_coils),
                      name="prepare_series", mem_gb=estimate_mem_gb(plan, 2.0, cap))
    if config.denoise == "none":
        prepare.inputs.dwi_file = series.dwi
    else:
        denoise = pe.Node(DenoiseSeries(dwi_file=series.dwi, bval_file=series.bval,
                                        bvec_file=series.bvec, arrays_file=plan.arrays_file,
                                        method=config.denoise, n_coils=n_coils),
                          name="denoise_series", n_procs=omp,
                          mem_gb=estimate_mem_gb(plan, 4.0, cap))
        wf.connect([(denoise, prepare, [("out_file", "dwi_file"),
                                        ("denoise_info", "denoise_info"),
                                        ("raw_noise", "raw_noise")])])
        if config.denoise_output:
            denoised = pe.Node(DenoisedProducts(bval_file=series.bval, bvec_file=series.bvec,
                                                entities=series.entities, sources=sources),
                               name="denoised_products", mem_gb=estimate_mem_gb(plan, 2.0, cap))
            ds_denoised = _sink("ds_denoised", out_dir)
            wf.connect([(denoise, denoised, [("out_file", "in_file"),
                                             ("denoise_info", "denoise_info")]),
                        (denoised, ds_denoised, [("out_root", "in_root"),
                                                 ("out_files", "in_files")])])
    series_products = pe.Node(SeriesProducts(entities=series.entities, sources=sources),
                              name="series_products")
    ds_series = _sink("ds_series", out_dir)
    wf.connect([
        (prepare, series_products, [("mask_file", "mask_file"), ("signals_file", "signals_file"),
                                    ("mask_info", "mask_info")]),
        (series_products, ds_series, [("out_root", "in_root"), ("out_files", "in_files")]),
    ])

    # a first summary before the fits, so that a failed fit still leaves a report of the others
    record = dict(plan=plan.to_dict(), methods=list(config.methods), output_dir=out_dir,
                  device=device, seed=config.seed, validator=config.validator,
                  started=config.started)
    early = pe.Node(SeriesSummary(final=False, **record), name="summary_early",
                    run_without_submitting=True)
    ds_early = _sink("ds_summary_early", out_dir)
    summary = pe.Node(SeriesSummary(**record), name="summary", run_without_submitting=True)
    ds_summary = _sink("ds_summary", out_dir)
    wf.connect([(prepare, early, [("mask_info", "mask_info")]),
                (early, ds_early, [("out_root", "in_root"), ("out_files", "in_files")]),
                (ds_early, summary, [("last_file", "after")]),
                (prepare, summary, [("mask_info", "mask_info")]),
                (summary, ds_summary, [("out_root", "in_root"), ("out_files", "in_files")])])
    if fits:
        from nipype.interfaces.utility import Merge
        records = pe.Node(Merge(len(fits)), name="merge_records", run_without_submitting=True)
        wf.connect([(records, summary, [("out", "fit_records")])])

    for i, (model, method) in enumerate(fits):
        options = config.fit_options(method, model)
        fit = pe.Node(FitModel(model=model, method=method,
                               options=json.dumps(options, sort_keys=True), device=device,
                               seed=config.seed, use_gpu=device.startswith("cuda"),
                               num_threads=omp, progress=config.verbosity > 0,
                               series=series.prefix),
                      name=f"fit_{model}_{method}", n_procs=omp,
                      mem_gb=estimate_mem_gb(plan, 2.0 if method in NETWORK_METHODS else 3.0, cap))
        products = pe.Node(FitProducts(entities=series.entities, sources=sources),
                           name=f"products_{model}_{method}", mem_gb=0.5)
        sink = _sink(f"ds_{model}_{method}", out_dir)
        wf.connect([
            (prepare, fit, [("signals_file", "signals_file")]),
            (fit, products, [("fit_file", "fit_file"), ("record_file", "record_file")]),
            (prepare, products, [("mask_file", "mask_file")]),
            (products, sink, [("out_root", "in_root"), ("out_files", "in_files")]),
            (sink, records, [("last_file", f"in{i + 1}")]),
        ])
    return wf
