"""HCP WU-Minn 1200 diffusion data: fetch from S3 (:mod:`.fetch`) and convert to BIDS
(:mod:`.convert`); errors carry their exit codes (:mod:`.errors`). The command is
``vaemap-fetch-hcp`` (:mod:`vaemap_bids.cli.fetch_hcp`); the graph that runs it inside ``vaemap``
is :mod:`vaemap_bids.workflows.hcp`.

Library use::

    from vaemap_bids.hcp import fetch_and_convert, convert_hcp_subject, HCPError
    sub = fetch_and_convert("100307", "/data/hcp_bids", profile="hcp")
    sub.dwi, sub.bval, sub.bvec, sub.mask, sub.mask_derivatives_dir
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import naming
from .convert import (MASK_DERIVATIVE, ConvertedSubject, convert_hcp_subject, hcp_dwi_metadata,
                      list_hcp_subjects, mask_derivatives_dir)
from .errors import (HCPAccessDeniedError, HCPBusyError, HCPCredentialsError, HCPDataError,
                     HCPError, HCPInputError, HCPNetworkError, HCPOutputError,
                     HCPSubjectNotFoundError)
from .fetch import (HCP_BUCKET, HCP_DIFFUSION_FILES, HCP_RELEASE, SECRET_ENV_VARS, FetchResult,
                    diffusion_dir, fetch_hcp_subject, mask_key_id, safe_url)

__all__ = [
    "HCP_BUCKET", "HCP_RELEASE", "HCP_DIFFUSION_FILES", "MASK_DERIVATIVE", "SECRET_ENV_VARS",
    "ConvertedSubject", "FetchResult",
    "HCPError", "HCPSubjectNotFoundError", "HCPDataError", "HCPCredentialsError",
    "HCPAccessDeniedError", "HCPInputError", "HCPOutputError", "HCPNetworkError", "HCPBusyError",
    "fetch_hcp_subject", "convert_hcp_subject", "fetch_and_convert", "convert_hcp_tree",
    "list_hcp_subjects", "default_download_root", "mask_derivatives_dir", "diffusion_dir",
    "hcp_dwi_metadata", "mask_key_id", "safe_url", "subject_label",
]


def default_download_root(bids_dir, release: str = HCP_RELEASE) -> Path:
    """Where downloads go by default: ``BIDS_DIR/sourcedata/HCP_1200`` (BIDS keeps pre-conversion
    data in ``sourcedata/``, which validators ignore); holds ``<id>/T1w/Diffusion/...``."""
    return Path(bids_dir) / "sourcedata" / release


def fetch_and_convert(subject: str, bids_dir, *, profile: str | None = None,
                      endpoint_url: str | None = None,
                      credentials_file: str | os.PathLike | None = None,
                      download_root=None, link: bool = True, progress: bool = True,
                      **fetch_options) -> ConvertedSubject:
    """Download one subject (resuming/skipping what is there) and convert it into BIDS_DIR.

    ``download_root`` defaults to :func:`default_download_root`; ``fetch_options`` go to
    :func:`fetch_hcp_subject` (``attempts``, ``backoff_s``, ``timeout_s``, ``bucket``, ...)."""
    root = Path(download_root) if download_root else default_download_root(bids_dir)
    result = fetch_hcp_subject(subject, root, profile=profile, endpoint_url=endpoint_url,
                               credentials_file=credentials_file, progress=progress,
                               **fetch_options)
    bucket = fetch_options.get("bucket", HCP_BUCKET)
    release = fetch_options.get("release", HCP_RELEASE)
    return convert_hcp_subject(root, result.subject, bids_dir, link=link,
                               source=f"s3://{bucket}/{release}/{result.subject}/T1w/Diffusion")


def convert_hcp_tree(hcp_root, bids_dir, subjects=None, *, link: bool = True) \
        -> list[ConvertedSubject]:
    """``--input-type hcp``: convert subjects of an HCP tree on disk (all that have
    ``T1w/Diffusion`` when ``subjects`` is None) into BIDS_DIR."""
    subjects = list(subjects) if subjects else list_hcp_subjects(hcp_root)
    if not subjects:
        raise HCPSubjectNotFoundError(f"no subject with T1w/Diffusion data in {hcp_root}")
    return [convert_hcp_subject(hcp_root, subject_label(s), bids_dir, link=link)
            for s in subjects]


def subject_label(label) -> str:
    """An HCP subject ID with or without ``sub-`` (e.g. ``100307``); ValueError otherwise."""
    text = str(label).strip()
    return naming.check_label(text[4:] if text.startswith("sub-") else text, "HCP subject ID")
