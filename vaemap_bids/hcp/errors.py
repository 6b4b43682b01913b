"""Errors of the HCP fetch and conversion, each carrying the exit code the command line uses.

Codes follow the BIDS-Apps execution spec used by ``vaemap`` (ARCHITECTURE.md section 3):

=============================  ====  ===================================================
exception                      code  when
=============================  ====  ===================================================
HCPSubjectNotFoundError          18  no such subject (S3 404 / no folder on disk), or the
                                     subject has no ``T1w/Diffusion`` data
HCPDataError                     65  files that are there but wrong (counts, shapes, grids)
HCPCredentialsError              66  no AWS credentials, unknown profile, or the server
                                     rejected the key (InvalidAccessKeyId, bad signature)
HCPAccessDeniedError             66  the credentials are valid but may not read the object
                                     (HTTP 403: data-use terms not accepted, wrong account)
HCPInputError                    66  the local HCP tree (``--input-type hcp``) is missing
HCPOutputError                   73  BIDS_DIR (or the download folder) cannot be created or
                                     written, disk full, quota exceeded, read-only
HCPNetworkError                  75  network failure after retries with back-off, 5xx, a
                                     transfer corrupted in transit: run the command again
                                     (downloads resume)
HCPBusyError                     75  another process is downloading the same subject into
                                     the same folder
=============================  ====  ===================================================

Messages never contain credentials: at most the credential *source* (``env``,
``shared-credentials-file``, a profile name) and a key id masked to its last four characters.
"""
from __future__ import annotations

from ..config import ExitCode


class HCPError(Exception):
    """Base class: the HCP data could not be obtained. ``exit_code`` is what the CLI returns."""

    exit_code = ExitCode.NOINPUT


class HCPSubjectNotFoundError(HCPError, LookupError):
    exit_code = ExitCode.NO_DATA


class HCPDataError(HCPError, ValueError):
    exit_code = ExitCode.DATAERR


class HCPCredentialsError(HCPError):
    exit_code = ExitCode.NOINPUT


class HCPAccessDeniedError(HCPError):
    exit_code = ExitCode.NOINPUT


class HCPInputError(HCPError):
    exit_code = ExitCode.NOINPUT


class HCPOutputError(HCPError):
    exit_code = ExitCode.CANTCREAT


class HCPNetworkError(HCPError):
    exit_code = ExitCode.TEMPFAIL


def output_error(path, exc: OSError, doing: str = "write") -> HCPOutputError:
    """An HCPOutputError naming the path and the system's reason (disk full, read-only, ...)."""
    reason = exc.strerror or type(exc).__name__
    return HCPOutputError(f"cannot {doing} {path}: {reason}")


class HCPBusyError(HCPError):
    exit_code = ExitCode.TEMPFAIL
