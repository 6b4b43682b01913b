"""HCP WU-Minn 1200 diffusion data: fetch from S3 and convert to BIDS (the public API), and the
``vaemap-fetch-hcp`` command.

Library use::

    from vaemap_bids.dataset.hcp import fetch_and_convert, convert_hcp_subject, HCPError
    sub = fetch_and_convert("100307", "/data/hcp_bids", profile="hcp")
    sub.dwi, sub.bval, sub.bvec, sub.mask, sub.mask_derivatives_dir

Command line (exit codes in :mod:`vaemap_bids.dataset.hcp_errors`; 64 for usage errors)::

    vaemap-fetch-hcp BIDS_DIR --participant-label 100307 [--hcp-profile hcp]
    vaemap-fetch-hcp BIDS_DIR --hcp-dir /mnt/HCP_1200 [--participant-label 100307]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from .hcp_convert import (MASK_DERIVATIVE, ConvertedSubject, convert_hcp_subject,
                          hcp_dwi_metadata, list_hcp_subjects, mask_derivatives_dir)
from .hcp_errors import (EXIT_BAD_DATA, EXIT_CANNOT_CREATE_OUTPUT, EXIT_MISSING_INPUT,
                         EXIT_NO_DATA, EXIT_TEMPORARY_FAILURE, HCPAccessDeniedError, HCPBusyError,
                         HCPCredentialsError, HCPDataError, HCPError, HCPInputError,
                         HCPNetworkError, HCPOutputError, HCPSubjectNotFoundError)
from .hcp_fetch import (HCP_BUCKET, HCP_DIFFUSION_FILES, HCP_RELEASE, SECRET_ENV_VARS,
                        FetchResult, diffusion_dir, fetch_hcp_subject, mask_key_id,
                        quiet_sdk_loggers, safe_url)

__all__ = [
    "HCP_BUCKET", "HCP_RELEASE", "HCP_DIFFUSION_FILES", "MASK_DERIVATIVE", "EXIT_USAGE",
    "EXIT_NO_DATA", "EXIT_BAD_DATA", "EXIT_MISSING_INPUT", "EXIT_CANNOT_CREATE_OUTPUT",
    "EXIT_TEMPORARY_FAILURE",
    "ConvertedSubject", "FetchResult", "StashedCredentials",
    "HCPError", "HCPSubjectNotFoundError", "HCPDataError", "HCPCredentialsError",
    "HCPAccessDeniedError", "HCPInputError", "HCPOutputError", "HCPNetworkError", "HCPBusyError",
    "fetch_hcp_subject", "convert_hcp_subject", "fetch_and_convert", "convert_hcp_tree",
    "list_hcp_subjects", "default_download_root", "mask_derivatives_dir", "diffusion_dir",
    "hcp_dwi_metadata", "stash_env_credentials", "scrub_environ", "mask_key_id", "safe_url",
    "main",
]

log = logging.getLogger("vaemap.hcp")
EXIT_USAGE = 64


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
    return [convert_hcp_subject(hcp_root, _clean(s), bids_dir, link=link) for s in subjects]


def _clean(label: str) -> str:
    label = str(label).strip()
    return label[4:] if label.startswith("sub-") else label


# ---- keeping secrets out of Nipype's records ---------------------------------------------------

@dataclass(frozen=True)
class StashedCredentials:
    """What a Nipype node may receive instead of secrets: a profile name and a file path."""

    profile: str | None
    credentials_file: str | None


def scrub_environ(environ: dict) -> dict:
    """``environ`` without the variables that hold secrets (in place; returned for chaining)."""
    for name in SECRET_ENV_VARS:
        environ.pop(name, None)
    return environ


@contextlib.contextmanager
def stash_env_credentials(profile: str | None = None, directory=None):
    """Take AWS secrets out of ``os.environ`` while a Nipype workflow runs.

    Nipype records ``os.environ`` of every node (``_report/report.rst``, ``result_*.pklz`` in the
    work dir), so keys exported as ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` would end up
    there. Inside this context they are moved into a private credentials file (mode 0600, in a
    fresh 0700 temporary folder outside the work and output dirs, deleted on exit) under the
    profile ``vaemap-env``; yields the :class:`StashedCredentials` to give the fetch node. With an
    explicit ``profile`` boto3 ignores the variables anyway: they are only removed, and the
    profile is passed through."""
    saved = {name: os.environ[name] for name in SECRET_ENV_VARS if name in os.environ}
    tmpdir = None
    try:
        if profile or not (saved.get("AWS_ACCESS_KEY_ID") and saved.get("AWS_SECRET_ACCESS_KEY")):
            stashed = StashedCredentials(profile, None)
        else:
            tmpdir = tempfile.mkdtemp(prefix="vaemap-aws-", dir=directory)
            path = Path(tmpdir) / "credentials"
            lines = ["[vaemap-env]", f"aws_access_key_id = {saved['AWS_ACCESS_KEY_ID']}",
                     f"aws_secret_access_key = {saved['AWS_SECRET_ACCESS_KEY']}"]
            token = saved.get("AWS_SESSION_TOKEN") or saved.get("AWS_SECURITY_TOKEN")
            if token:
                lines.append(f"aws_session_token = {token}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
            with os.fdopen(fd, "w") as fobj:
                fobj.write("\n".join(lines) + "\n")
            stashed = StashedCredentials("vaemap-env", str(path))
        for name in saved:
            del os.environ[name]
        yield stashed
    finally:
        os.environ.update(saved)
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


# ---- command line ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 64 (BIDS-Apps / sysexits), not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vaemap-fetch-hcp",
        description="Download HCP WU-Minn 1200 preprocessed diffusion data (T1w/Diffusion) from "
                    "the hcp-openaccess S3 bucket and convert it into a BIDS dataset, or convert "
                    "an HCP tree already on disk (--hcp-dir).",
        epilog="Exit codes: 0 done; 18 subject not found; 64 usage; 65 bad data; 66 no or "
               "rejected credentials, access denied (403), HCP folder missing; 73 BIDS_DIR "
               "not writable or disk full; 75 network failure after retries (run again: "
               "downloads resume). Credentials: the standard AWS variables, or a profile.")
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="BIDS dataset to write (created)")
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="ID",
                   help="HCP subject IDs, e.g. 100307 (sub- prefix allowed); with --hcp-dir, "
                        "default: every subject there")
    p.add_argument("--hcp-dir", metavar="HCP_ROOT",
                   help="convert <HCP_ROOT>/<id>/T1w/Diffusion from disk, no download")
    p.add_argument("--hcp-profile", metavar="PROFILE",
                   help="AWS profile holding your HCP keys (default: AWS variables, AWS_PROFILE)")
    p.add_argument("--endpoint-url", metavar="URL",
                   help="S3 endpoint (default: $AWS_ENDPOINT_URL, else AWS)")
    p.add_argument("--download-dir", metavar="DIR",
                   help="where downloads go (default: BIDS_DIR/sourcedata/HCP_1200)")
    p.add_argument("--no-convert", action="store_true", help="download only")
    p.add_argument("--copy", action="store_true",
                   help="copy the image and mask into BIDS_DIR (default: hard link if possible)")
    p.add_argument("--retries", type=int, default=5, metavar="N",
                   help="attempts per request on network failure (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="more log lines")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only")
    p.add_argument("--version", action="version", version=f"vaemap-fetch-hcp {__version__}")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (64)
        return int(exc.code or 0)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("vaemap").setLevel(level)
    quiet_sdk_loggers()
    prog = parser.prog
    problem = ("--retries must be at least 1" if args.retries < 1 else
               "--participant-label is required to download (or give --hcp-dir)"
               if not args.hcp_dir and not args.participant_label else None)
    if problem:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    progress = not args.no_progress and not args.quiet
    try:
        if args.hcp_dir:
            done = convert_hcp_tree(args.hcp_dir, args.bids_dir, args.participant_label,
                                    link=not args.copy)
        else:
            done = []
            for label in args.participant_label:
                subject = _clean(label)
                if args.no_convert:
                    root = args.download_dir or default_download_root(args.bids_dir)
                    fetch_hcp_subject(subject, root, profile=args.hcp_profile,
                                      endpoint_url=args.endpoint_url, progress=progress,
                                      attempts=args.retries)
                else:
                    done.append(fetch_and_convert(
                        subject, args.bids_dir, profile=args.hcp_profile,
                        endpoint_url=args.endpoint_url, download_root=args.download_dir,
                        link=not args.copy, progress=progress, attempts=args.retries))
    except HCPError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # a subject ID that is not a label, a bad endpoint URL
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    for sub in done:
        log.info("sub-%s ready: %s", sub.subject, sub.dwi)
    if done:
        log.info("BIDS dataset: %s; brain masks: --derivatives %s", Path(args.bids_dir),
                 mask_derivatives_dir(args.bids_dir))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
