"""The graph of ``vaemap --fetch-hcp`` / ``--input-type hcp``: one node per HCP subject, run in
this process before the participant level, with node failures mapped back to their HCPError."""
from __future__ import annotations

import json
from pathlib import Path

from nipype.pipeline import engine as pe

from ..hcp import (ConvertedSubject, HCPError, errors, list_hcp_subjects, mask_derivatives_dir,
                   subject_label)
from ..interfaces.hcp import ConvertHCPSubject, FetchHCPSubject


def init_hcp_fetch_wf(subjects, bids_dir, *, hcp_root=None, profile=None, endpoint_url=None,
                      download_dir=None, link=True, error_dir=None, progress=False,
                      name="hcp_fetch_wf") -> pe.Workflow:
    """One FetchHCPSubject (or ConvertHCPSubject, with ``hcp_root``) node per subject, named
    ``hcp_<id>``."""
    wf = pe.Workflow(name=name)
    for subject in subjects:
        error_file = str(Path(error_dir) / f"{subject}.json") if error_dir else ""
        if hcp_root:
            iface = ConvertHCPSubject(hcp_root=str(hcp_root), subject=subject,
                                      bids_dir=str(bids_dir), link=link, error_file=error_file)
        else:
            iface = FetchHCPSubject(subject=subject, bids_dir=str(bids_dir), link=link,
                                    error_file=error_file, progress=progress)
            for trait, value in (("profile", profile), ("endpoint_url", endpoint_url),
                                 ("download_dir", download_dir)):
                if value:
                    setattr(iface.inputs, trait, str(value))
        # always rerun: cheap when everything is there (HEAD requests, links), and it notices
        # files removed from BIDS_DIR or changed on the server since the cached run
        wf.add_nodes([pe.Node(iface, name=f"hcp_{subject}", overwrite=True)])
    return wf


def run_hcp_fetch(subjects, bids_dir, work_dir, *, hcp_root=None, profile=None,
                  endpoint_url=None, download_dir=None, link=True,
                  progress=False) -> list[ConvertedSubject]:
    """Run :func:`init_hcp_fetch_wf` under ``work_dir`` and return the converted subjects.

    The nodes run in this process (Nipype's Linear plugin, whatever plugin the participant level
    uses): downloads are I/O-bound, and the credentials stay in this process's memory, never in
    a job script or a scheduler's records. When a node fails, the HCPError it raised is raised
    here again (same class, message and ``exit_code``)."""
    subjects = [subject_label(s) for s in subjects]
    error_dir = Path(work_dir) / "hcp_fetch_errors"
    for subject in subjects:
        (error_dir / f"{subject}.json").unlink(missing_ok=True)
    wf = init_hcp_fetch_wf(subjects, bids_dir, hcp_root=hcp_root, profile=profile,
                           endpoint_url=endpoint_url, download_dir=download_dir, link=link,
                           error_dir=error_dir, progress=progress)
    wf.base_dir = str(work_dir)
    wf.config["execution"].update({"crashfile_format": "txt",
                                   "crashdump_dir": str(Path(work_dir) / "crash"),
                                   "stop_on_first_crash": "false"})
    try:
        graph = wf.run(plugin="Linear")
    except RuntimeError:
        for subject in subjects:
            record = error_dir / f"{subject}.json"
            if record.is_file():
                info = json.loads(record.read_text())
                cls = getattr(errors, str(info.get("type")), None)
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
                      bids_dir=None, profile=None, endpoint_url=None,
                      progress=False) -> tuple[Path, Path]:
    """What ``vaemap --fetch-hcp`` / ``--input-type hcp`` run before the participant graph.

    - ``input_type="fetch"``: download ``participant_labels`` (required) and convert them into
      ``source_dir``, which is BIDS_DIR (created when missing).
    - ``input_type="hcp"``: ``source_dir`` is an HCP tree (``<id>/T1w/Diffusion``); convert the
      labels (default: every subject there) into ``bids_dir`` (default ``work_dir/hcp_bids``;
      hard links, so no second copy of the images on the same file system).

    Returns ``(bids_dir, mask_derivatives_dir)``: run the participant level on the first, with
    the second added to ``--derivatives``. Raises ValueError (usage, exit 64) and HCPError
    (``exit_code``)."""
    labels = [subject_label(s) for s in (participant_labels or [])]
    if input_type == "fetch":
        if not labels:
            raise ValueError("--fetch-hcp needs --participant-label (the HCP subject IDs)")
        target, hcp_root = Path(source_dir), None
    elif input_type == "hcp":
        hcp_root = Path(source_dir)
        labels = labels or list_hcp_subjects(hcp_root)
        if not labels:
            raise errors.HCPSubjectNotFoundError(
                f"no subject with T1w/Diffusion data in {hcp_root}")
        target = Path(bids_dir) if bids_dir else Path(work_dir) / "hcp_bids"
    else:
        raise ValueError(f"unknown HCP input type {input_type!r} (fetch or hcp)")
    run_hcp_fetch(labels, target, Path(work_dir), hcp_root=hcp_root, profile=profile,
                  endpoint_url=endpoint_url, progress=progress)
    return target, mask_derivatives_dir(target)
