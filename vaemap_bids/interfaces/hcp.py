"""Nipype interfaces over the HCP fetch/conversion of :mod:`vaemap_bids.hcp` (their graph is
:mod:`vaemap_bids.workflows.hcp`).

No secret is ever a node input: nodes get at most a profile name, and boto3 resolves the keys
inside the node from its standard chain (the environment of the vaemap process, which runs these
nodes itself). Nipype records the environment of every node in the work dir
(``_report/report.rst``, ``result_*.pklz``): these interfaces drop the AWS secret variables from
that record.
"""
from __future__ import annotations

import json
from pathlib import Path

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from ..hcp import ConvertedSubject, HCPError, convert_hcp_subject, fetch_and_convert
from ..hcp.fetch import scrub_environ


class _ConvertedOutputSpec(TraitedSpec):
    subject = traits.Str(desc="HCP subject ID (the BIDS participant label)")
    bids_dir = traits.Str(desc="the BIDS dataset")
    dwi = File(exists=True, desc="sub-<id>/dwi/sub-<id>_dwi.nii.gz")
    bval = File(exists=True, desc="sub-<id>_dwi.bval")
    bvec = File(exists=True, desc="sub-<id>_dwi.bvec")
    sidecar = File(exists=True, desc="sub-<id>_dwi.json")
    mask = File(exists=True, desc="derivatives/hcp-mask/sub-<id>/dwi/sub-<id>_desc-brain_mask.nii.gz")
    mask_derivatives_dir = traits.Str(desc="BIDS_DIR/derivatives/hcp-mask (for --derivatives)")


class _FetchHCPInputSpec(BaseInterfaceInputSpec):
    subject = traits.Str(mandatory=True, desc="HCP subject ID, e.g. 100307")
    bids_dir = traits.Str(mandatory=True, desc="BIDS dataset to write into (created)")
    profile = traits.Str(desc="AWS profile name; credentials are resolved by boto3 in the node")
    endpoint_url = traits.Str(desc="S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    download_dir = traits.Str(desc="download root (default BIDS_DIR/sourcedata/HCP_1200)")
    link = traits.Bool(True, usedefault=True, desc="hard-link image and mask when possible")
    progress = traits.Bool(False, usedefault=True, desc="tqdm progress bars on stderr")
    attempts = traits.Int(5, usedefault=True, desc="attempts per request on network failure")
    backoff_s = traits.Float(2.0, usedefault=True, desc="first back-off delay (doubles)")
    error_file = traits.Str(nohash=True, desc="where to record an HCPError (JSON) for the caller")


class _ConvertHCPInputSpec(BaseInterfaceInputSpec):
    hcp_root = traits.Str(mandatory=True, desc="HCP tree: <hcp_root>/<id>/T1w/Diffusion")
    subject = traits.Str(mandatory=True, desc="HCP subject ID")
    bids_dir = traits.Str(mandatory=True, desc="BIDS dataset to write into (created)")
    link = traits.Bool(True, usedefault=True, desc="hard-link image and mask when possible")
    error_file = traits.Str(nohash=True, desc="where to record an HCPError (JSON) for the caller")


def _record_error(path: str, exc: HCPError) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"type": type(exc).__name__, "exit_code": exc.exit_code,
                                          "message": str(exc)}) + "\n")


class _HCPInterface(SimpleInterface):
    def _convert(self) -> ConvertedSubject:
        raise NotImplementedError

    def _run_interface(self, runtime):
        scrub_environ(runtime.environ)  # Nipype writes this environment into the work dir
        try:
            converted = self._convert()
        except HCPError as exc:
            _record_error(self.inputs.error_file or "", exc)
            raise
        self._results.update(converted.as_dict())
        return runtime


class FetchHCPSubject(_HCPInterface):
    """Download one HCP subject's ``T1w/Diffusion`` from S3 (resumable) and convert it to BIDS."""

    input_spec = _FetchHCPInputSpec
    output_spec = _ConvertedOutputSpec

    def _convert(self) -> ConvertedSubject:
        inp = self.inputs
        opt = lambda name: getattr(inp, name) or None  # noqa: E731 -- unset traits -> None
        return fetch_and_convert(inp.subject, inp.bids_dir, profile=opt("profile"),
                                 endpoint_url=opt("endpoint_url"),
                                 download_root=opt("download_dir"), link=inp.link,
                                 progress=inp.progress, attempts=inp.attempts,
                                 backoff_s=inp.backoff_s)


class ConvertHCPSubject(_HCPInterface):
    """Convert one subject of an HCP tree already on disk to BIDS (``--input-type hcp``)."""

    input_spec = _ConvertHCPInputSpec
    output_spec = _ConvertedOutputSpec

    def _convert(self) -> ConvertedSubject:
        inp = self.inputs
        return convert_hcp_subject(inp.hcp_root, inp.subject, inp.bids_dir, link=inp.link)
