"""``vaemap-fetch-hcp``: download HCP WU-Minn 1200 preprocessed diffusion data from S3 and
convert it into a BIDS dataset, or convert an HCP tree already on disk (:mod:`vaemap_bids.hcp`).

    vaemap-fetch-hcp BIDS_DIR --participant-label 100307 [--hcp-profile hcp]
    vaemap-fetch-hcp BIDS_DIR --hcp-dir /mnt/HCP_1200 [--participant-label 100307]

Exit codes: those of :mod:`vaemap_bids.hcp.errors`; 64 for usage errors.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .. import __version__
from ..config import ExitCode, exit_codes_help
from ..hcp import (HCPError, convert_hcp_tree, default_download_root, fetch_and_convert,
                   fetch_hcp_subject, mask_derivatives_dir, subject_label)
from ..hcp.fetch import quiet_sdk_loggers

log = logging.getLogger("vaemap.hcp")


# ---- command line ------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors exit 64 (BIDS-Apps / sysexits), not argparse's 2
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vaemap-fetch-hcp",
        description="Download HCP WU-Minn 1200 preprocessed diffusion data (T1w/Diffusion) from "
                    "the hcp-openaccess S3 bucket and convert it into a BIDS dataset, or convert "
                    "an HCP tree already on disk (--hcp-dir).",
        epilog=exit_codes_help((ExitCode.OK, ExitCode.NO_DATA, ExitCode.USAGE, ExitCode.DATAERR,
                                ExitCode.NOINPUT, ExitCode.CANTCREAT, ExitCode.TEMPFAIL))
        + " 18: subject not found; 66: no or rejected credentials, access denied (403), HCP "
          "folder missing; 73: BIDS_DIR not writable or disk full; 75: network failure after "
          "retries (run again: downloads resume). Credentials: the standard AWS variables, or "
          "a profile.")
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
        return ExitCode.USAGE
    progress = not args.no_progress and not args.quiet
    try:
        if args.hcp_dir:
            done = convert_hcp_tree(args.hcp_dir, args.bids_dir, args.participant_label,
                                    link=not args.copy)
        else:
            done = []
            for label in args.participant_label:
                subject = subject_label(label)
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
        return ExitCode.USAGE
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
