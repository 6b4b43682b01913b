"""The graph of one MEGRE series (QSM):

    qsm_mask -> qsm_field -> qsm_<method> (tkd, tv, dip) -> qsm_products -> ds_qsm

``qsm_mask``: the given derivative mask or one from the magnitude; ``qsm_field``: phase to
radians, unwrapping, the multi-echo field fit and background removal; one inversion node per
method (DIP flagged as a GPU node when the run has a GPU, like the diffusion networks);
``qsm_products`` writes the maps and sidecars, which the sink copies into OUTPUT_DIR.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from nipype.interfaces.utility import Merge
from nipype.pipeline import engine as pe

from ..config import Config
from ..interfaces.derivatives import DerivativesSink
from ..interfaces.qsm import QsmInvert, QsmLocalField, QsmMask, QsmProducts
from ..qsm.inputs import QsmPlan
from ..qsm.options import qsm_options


def qsm_workflow_name(plan: QsmPlan) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", plan.series.prefix) + "_qsm_wf"


def init_qsm_wf(plan: QsmPlan, config: Config, name: str | None = None) -> pe.Workflow:
    """Mask, local field, each of ``config.qsm_methods``, products and sink of one series."""
    from .series import bids_uri
    series = plan.series
    wf = pe.Workflow(name=name or qsm_workflow_name(plan))
    out_dir = str(Path(config.output_dir).resolve())
    opts = qsm_options(config.hyperparameters)
    options = json.dumps(opts, sort_keys=True)
    device = config.resolved_device or "cpu"
    omp = config.effective_omp_nthreads()
    sources = [bids_uri(p, config.bids_dir) for p in series.magnitude + series.phase]
    mask = pe.Node(QsmMask(magnitude_files=series.magnitude, given_mask=plan.mask_file or "",
                           options=options), name="qsm_mask")
    fld = pe.Node(QsmLocalField(magnitude_files=series.magnitude, phase_files=series.phase,
                                echo_times=plan.echo_times_s, b0_tesla=plan.b0_tesla,
                                options=options), name="qsm_field")
    methods = list(config.qsm_methods)
    chis = pe.Node(Merge(len(methods)), name="merge_chi", run_without_submitting=True)
    recs = pe.Node(Merge(len(methods)), name="merge_records", run_without_submitting=True)
    plan_dict = plan.to_dict()
    plan_dict["options"] = opts
    products = pe.Node(QsmProducts(entities=series.entities, plan=json.loads(json.dumps(
        plan_dict, default=str)), sources=sources, seed=config.seed), name="qsm_products")
    sink = pe.Node(DerivativesSink(output_dir=out_dir), name="ds_qsm",
                   run_without_submitting=True)
    wf.connect([(mask, fld, [("mask_file", "mask_file")]),
                (fld, products, [("field_file", "field_file")]),
                (mask, products, [("mask_source", "mask_source")]),
                (chis, products, [("out", "chi_files")]),
                (recs, products, [("out", "record_files")]),
                (products, sink, [("out_root", "in_root"), ("out_files", "in_files")])])
    for i, method in enumerate(methods, start=1):
        gpu = method == "dip" and device.startswith("cuda")
        node = pe.Node(QsmInvert(method=method, options=options, seed=config.seed,
                                 device=device if method == "dip" else "cpu", use_gpu=gpu,
                                 num_threads=omp),
                       name=f"qsm_{method}", n_procs=omp)
        wf.connect([(fld, node, [("field_file", "field_file")]),
                    (node, chis, [("chi_file", f"in{i}")]),
                    (node, recs, [("record_file", f"in{i}")])])
    return wf


__all__ = ["init_qsm_wf", "qsm_workflow_name"]
