"""Derivative writers: one small sub-workflow per kind of output (mask, fit, run summary)."""
from __future__ import annotations

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from ..interfaces.derivatives import WriteFitDerivatives, WriteMask, WriteSummary


def init_mask_outputs_wf(entities: dict, output_dir: str, sources: list[str],
                         name: str = "mask_outputs_wf") -> pe.Workflow:
    """``<prefix>_desc-brain_mask.nii.gz`` (+ sidecar)."""
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=["mask_file", "mask_info"]), name="inputnode")
    ds_mask = pe.Node(WriteMask(entities=entities, output_dir=output_dir, sources=sources),
                      name="ds_mask", run_without_submitting=True)
    outputnode = pe.Node(niu.IdentityInterface(fields=["out_file"]), name="outputnode")
    wf.connect([
        (inputnode, ds_mask, [("mask_file", "mask_file"), ("mask_info", "mask_info")]),
        (ds_mask, outputnode, [("out_file", "out_file")]),
    ])
    return wf


def init_fit_outputs_wf(entities: dict, model: str, method: str, output_dir: str,
                        sources: list[str], seed: int, name: str | None = None) -> pe.Workflow:
    """Every output of one (model, method) fit: parameter maps, posterior-std maps, NRMSE map,
    vaegmm dseg/probseg, the latent subsample and the fit record."""
    wf = pe.Workflow(name=name or f"outputs_{model}_{method}_wf")
    inputnode = pe.Node(niu.IdentityInterface(
        fields=["fit_file", "record_file", "signals_file", "mask_file"]), name="inputnode")
    ds_fit = pe.Node(WriteFitDerivatives(entities=entities, model=model, method=method,
                                         output_dir=output_dir, sources=sources, seed=seed),
                     name="ds_fit", mem_gb=0.5)
    outputnode = pe.Node(niu.IdentityInterface(fields=["fit_record", "out_files"]),
                         name="outputnode")
    wf.connect([
        (inputnode, ds_fit, [("fit_file", "fit_file"), ("record_file", "record_file"),
                             ("signals_file", "signals_file"), ("mask_file", "mask_file")]),
        (ds_fit, outputnode, [("fit_record", "fit_record"), ("out_files", "out_files")]),
    ])
    return wf


def init_summary_wf(plan: dict, methods: list[str], output_dir: str, device: str, seed: int,
                    validator: str, started: str, n_fits: int,
                    name: str = "summary_wf") -> pe.Workflow:
    """``<prefix>_summary.json`` once the mask, the signals and every fit record are written."""
    wf = pe.Workflow(name=name)
    fields = ["mask_info", "signal_info"] + [f"fit_record{i}" for i in range(n_fits)]
    inputnode = pe.Node(niu.IdentityInterface(fields=fields), name="inputnode")
    ds_summary = pe.Node(WriteSummary(plan=plan, methods=methods, output_dir=output_dir,
                                      device=device, seed=seed, validator=validator,
                                      started=started),
                         name="ds_summary", run_without_submitting=True)
    wf.connect([(inputnode, ds_summary, [("mask_info", "mask_info"),
                                         ("signal_info", "signal_info")])])
    if n_fits:
        merge = pe.Node(niu.Merge(n_fits), name="merge_records", run_without_submitting=True)
        wf.connect([(inputnode, merge, [(f"fit_record{i}", f"in{i + 1}") for i in range(n_fits)]),
                    (merge, ds_summary, [("out", "fit_records")])])
    return wf
