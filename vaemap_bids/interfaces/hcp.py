"""Nipype interfaces over the HCP fetch/conversion of :mod:`vaemap_bids.dataset.hcp`, and a
small graph that runs them (one node per subject) with failures mapped back to HCPError.

No secret is ever a node input: nodes get a profile name and, at most, the *path* of a
credentials file (see :func:`~vaemap_bids.dataset.hcp.stash_env_credentials`); boto3 resolves
the keys inside the node. Nipype records the process environment of every node in the work dir
(``_report/report.rst``, ``result_*.pklz``); these interfaces drop the AWS secret variables from
that record, and :func:`run_hcp_fetch` takes them out of ``os.environ`` for the whole run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    traits)

from .. import naming
from ..dataset import hcp_errors
from ..dataset.hcp import (ConvertedSubject, HCPError, convert_hcp_subject, fetch_and_convert,
                           scrub_environ, stash_env_credentials)

log = logging.getLogger("vaemap.hcp")


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
    credentials_file = traits.Str(nohash=True,
                                  desc="path of an AWS credentials file (never its content)")
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
                                 credentials_file=opt("credentials_file"),
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


def init_hcp_fetch_wf(subjects, bids_dir, *, hcp_root=None, profile=None, endpoint_url=None,
                      credentials_file=None, download_dir=None, link=True, error_dir=None,
                      progress=False, name="hcp_fetch_wf"):
    """One FetchHCPSubject (or ConvertHCPSubject, with ``hcp_root``) node per subject, named
    ``hcp_<id>``; independent nodes, so MultiProc/SLURM plugins run subjects in parallel."""
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name=name)
    for subject in subjects:
        error_file = str(Path(error_dir) / f"{subject}.json") if error_dir else ""
        if hcp_root:
            iface = ConvertHCPSubject(hcp_root=str(hcp_root), subject=subject,
                                      bids_dir=str(bids_dir), link=link, error_file=error_file)
        else:
            iface = FetchHCPSubject(subject=subject, bids_dir=str(bids_dir), link=link,
                                    error_file=error_file)
            for trait, value in (("profile", profile), ("endpoint_url", endpoint_url),
                                 ("credentials_file", credentials_file),
                                 ("download_dir", download_dir)):
                if value:
                    setattr(iface.inputs, trait, str(value))
            iface.inputs.progress = progress
        # always rerun: cheap when everything is there (HEAD requests, links), and it notices
        # files removed from BIDS_DIR or changed on the server since the cached run
        wf.add_nodes([pe.Node(iface, name=f"hcp_{subject}", overwrite=True)])
    return wf


def run_hcp_fetch(subjects, bids_dir, work_dir, *, hcp_root=None, profile=None,
                  endpoint_url=None, download_dir=None, link=True, plugin="Linear",
                  plugin_args=None, progress=False) -> list[ConvertedSubject]:
    """Run :func:`init_hcp_fetch_wf` under ``work_dir`` and return the converted subjects.

    AWS secrets in the environment are stashed into a private file for the run (see
    :func:`~vaemap_bids.dataset.hcp.stash_env_credentials`). When a node fails, the HCPError it
    raised is raised here again (same class, message and ``exit_code``)."""
    subjects = [naming.check_label(str(s)[4:] if str(s).startswith("sub-") else str(s),
                                   "HCP subject ID") for s in subjects]
    error_dir = Path(work_dir) / "hcp_fetch_errors"
    for subject in subjects:
        (error_dir / f"{subject}.json").unlink(missing_ok=True)
    with stash_env_credentials(profile) as creds:
        wf = init_hcp_fetch_wf(subjects, bids_dir, hcp_root=hcp_root, profile=creds.profile,
                               endpoint_url=endpoint_url, credentials_file=creds.credentials_file,
                               download_dir=download_dir, link=link, error_dir=error_dir,
                               progress=progress)
        wf.base_dir = str(work_dir)
        wf.config["execution"].update({"crashfile_format": "txt",
                                       "crashdump_dir": str(Path(work_dir) / "crash"),
                                       "stop_on_first_crash": "false"})
        try:
            graph = wf.run(plugin=plugin, plugin_args=plugin_args or {})
        except RuntimeError:
            for subject in subjects:
                record = error_dir / f"{subject}.json"
                if record.is_file():
                    info = json.loads(record.read_text())
                    cls = getattr(hcp_errors, str(info.get("type")), None)
                    if not (isinstance(cls, type) and issubclass(cls, HCPError)):
                        cls = HCPError
                    raise cls(info["message"]) from None
            raise
    done = {}
    for node in graph.nodes():
        out = node.result.outputs
        done[out.subject] = ConvertedSubject(
            out.subject, Path(out.bids_dir), Path(out.dwi), Path(out.bval), Path(out.bvec),
            Path(out.sidecar), Path(out.mask), Path(out.mask_derivatives_dir))
    return [done[s] for s in subjects]


def prepare_hcp_input(input_type: str, source_dir, participant_labels, work_dir, *,
                      bids_dir=None, profile=None, endpoint_url=None, plugin="Linear",
                      plugin_args=None, progress=False) -> tuple[Path, Path]:
    """What ``vaemap --fetch-hcp`` / ``--input-type hcp`` run before the participant graph.

    - ``input_type="fetch"``: download ``participant_labels`` (required) and convert them into
      ``source_dir``, which is BIDS_DIR (created when missing).
    - ``input_type="hcp"``: ``source_dir`` is an HCP tree (``<id>/T1w/Diffusion``); convert the
      labels (default: every subject there) into ``bids_dir`` (default ``work_dir/hcp_bids``;
      hard links, so no second copy of the images on the same file system).

    Returns ``(bids_dir, mask_derivatives_dir)``: run the participant level on the first, with
    the second added to ``--derivatives``. Raises ValueError (usage, exit 64) and HCPError
    (``exit_code``), secrets kept out of the work dir as in :func:`run_hcp_fetch`."""
    from ..dataset.hcp import list_hcp_subjects, mask_derivatives_dir

    labels = [str(s)[4:] if str(s).startswith("sub-") else str(s)
              for s in (participant_labels or [])]
    if input_type == "fetch":
        if not labels:
            raise ValueError("--fetch-hcp needs --participant-label (the HCP subject IDs)")
        target, hcp_root = Path(source_dir), None
    elif input_type == "hcp":
        hcp_root = Path(source_dir)
        labels = labels or list_hcp_subjects(hcp_root)
        if not labels:
            raise hcp_errors.HCPSubjectNotFoundError(
                f"no subject with T1w/Diffusion data in {hcp_root}")
        target = Path(bids_dir) if bids_dir else Path(work_dir) / "hcp_bids"
    else:
        raise ValueError(f"unknown HCP input type {input_type!r} (fetch or hcp)")
    run_hcp_fetch(labels, target, Path(work_dir), hcp_root=hcp_root, profile=profile,
                  endpoint_url=endpoint_url, plugin=plugin, plugin_args=plugin_args,
                  progress=progress)
    return target, mask_derivatives_dir(target)
