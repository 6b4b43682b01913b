"""Keeping AWS secrets out of every file a run writes.

Nipype records the process environment of every node in the work dir (``_report/report.rst``,
``result_*.pklz``). While the participant graph runs, the AWS secret variables are therefore
taken out of ``os.environ`` and held in this process's memory only, then put back: nothing is
written anywhere. The HCP fetch needs them: it runs in this process (the Linear plugin), where
boto3 reads them from the environment, and its interfaces drop them from the environment Nipype
records (:func:`vaemap_bids.hcp.fetch.scrub_environ`).
"""
from __future__ import annotations

import contextlib
import os

from ..hcp.fetch import SECRET_ENV_VARS


@contextlib.contextmanager
def secrets_withheld():
    """Remove the AWS secret variables from ``os.environ`` for the duration (memory only)."""
    saved = {name: os.environ.pop(name) for name in SECRET_ENV_VARS if name in os.environ}
    try:
        yield sorted(saved)
    finally:
        os.environ.update(saved)
