"""Download one HCP subject's preprocessed diffusion data from S3 with boto3, resumably.

Keys: ``s3://hcp-openaccess/HCP_1200/<id>/T1w/Diffusion/{data.nii.gz, bvals, bvecs,
nodif_brain_mask.nii.gz}``, written to ``<dest_root>/<id>/T1w/Diffusion/`` (the same layout as an
HCP tree on disk, so the converter reads both the same way).

- Credentials: boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile
  of the shared credentials/config files, SSO, ...); ``profile`` picks a profile;
  ``credentials_file`` points boto3 at another credentials file (a path, never its content).
- Endpoint: ``endpoint_url`` when given, else boto3's own ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL`` handling (botocore >= 1.31.56 honours them natively), else AWS.
- Resumable: every object is first HEADed (size, ETag). A file already there with the object's
  size and recorded ETag (or, when none is recorded, a matching MD5 for single-part ETags) is
  skipped. Data stream into ``<name>.part``; the ETag and size are recorded in
  ``.vaemap-fetch.json`` before the first byte, so a later run continues a ``.part`` with a
  ranged GET (``Range: bytes=<n>-``) sent with ``If-Match: <ETag>`` -- the server refuses (412)
  rather than mixing two versions of an object, and the download then starts over. A complete
  file is checked (size; MD5 when the ETag is one) and renamed into place atomically.
- Network failures (connection refused/reset, timeouts, truncated streams, HTTP 5xx, throttling)
  are retried with exponential back-off; a retry after partial progress resumes where the
  stream broke. When the attempts are spent: :class:`HCPNetworkError` (exit 75).
- Secrets never reach a log line, an exception message or a file: logs name the credential
  source and the key id masked to its last four characters.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .. import atomic, naming
from .errors import (HCPAccessDeniedError, HCPBusyError, HCPCredentialsError, HCPError,
                         HCPInputError, HCPNetworkError, HCPOutputError,
                         HCPSubjectNotFoundError, output_error)

log = logging.getLogger("vaemap.hcp")

HCP_BUCKET = "hcp-openaccess"
HCP_RELEASE = "HCP_1200"
#: The bucket's region; used when neither the profile nor AWS_DEFAULT_REGION names one.
HCP_REGION = "us-east-1"
#: The four files of ``T1w/Diffusion``, small ones first so that a 403/404 shows before 1.3 GB.
HCP_DIFFUSION_FILES = ("bvals", "bvecs", "nodif_brain_mask.nii.gz", "data.nii.gz")
MANIFEST_NAME = ".vaemap-fetch.json"
LOCK_NAME = ".vaemap-fetch.lock"
PART_SUFFIX = ".part"

#: Environment variables that hold secrets (removed from Nipype-recorded environments).
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                   "AWS_SECURITY_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN")



def scrub_environ(environ: dict) -> dict:
    """``environ`` without the variables that hold secrets (in place; returned for chaining).
    For the copies of the environment that Nipype records, never ``os.environ`` itself."""
    for name in SECRET_ENV_VARS:
        environ.pop(name, None)
    return environ


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "AuthorizationHeaderMalformed", "InvalidSecurity"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden", "AccountProblem"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "500", "502",
                    "503", "504"}


def _network_errors() -> tuple[type[BaseException], ...]:
    import http.client

    import botocore.exceptions as bexc
    import urllib3.exceptions

    return (bexc.HTTPClientError, bexc.ConnectionError, bexc.IncompleteReadError,
            urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError)


class _ShortRead(Exception):
    """The server closed the stream before the object's last byte without an error."""


# ---- names -----------------------------------------------------------------------------------

def diffusion_dir(root, subject: str) -> Path:
    """``<root>/<subject>/T1w/Diffusion`` (the HCP layout, on disk or in the bucket)."""
    return Path(root) / str(subject) / "T1w" / "Diffusion"


def object_key(subject: str, name: str, release: str = HCP_RELEASE) -> str:
    return f"{release}/{subject}/T1w/Diffusion/{name}"


def mask_key_id(key_id: str | None) -> str:
    """``****WXYZ`` (the last four characters only, as ``aws configure list`` shows them)."""
    if not key_id:
        return "none"
    return "****" + key_id[-4:] if len(key_id) >= 12 else "****"


def safe_url(url: str | None) -> str:
    """An endpoint URL fit for logs: no user:password@, no query string."""
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# ---- connection ------------------------------------------------------------------------------

@dataclass
class S3Connection:
    """A boto3 S3 client plus what may be said about it in logs."""

    client: object
    credential_source: str          # e.g. "env, key ****WXYZ" -- never the key itself
    endpoint: str                   # safe_url() of the endpoint in use
    _secrets: tuple[str, ...] = field(default=(), repr=False)

    def scrub(self, text: str) -> str:
        """``text`` with every credential string replaced by ``****``."""
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "****")
        return text


def quiet_sdk_loggers() -> None:
    """Keep boto3/botocore/urllib3 at INFO or above: their DEBUG records carry request headers
    (the Authorization header names the access key id)."""
    for name in ("botocore", "boto3", "urllib3", "s3transfer"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


def connect(profile: str | None = None, endpoint_url: str | None = None,
            credentials_file: str | os.PathLike | None = None, region: str | None = None,
            timeout_s: float = 60.0) -> S3Connection:
    """An S3 client from boto3's standard credential chain; raises HCPCredentialsError when no
    usable credentials are found (an unknown profile, none at all, incomplete ones)."""
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    quiet_sdk_loggers()
    if endpoint_url:
        scheme = urlsplit(endpoint_url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"endpoint URL must start with http:// or https://, got "
                             f"{safe_url(endpoint_url)!r}")
    core = botocore.session.Session()
    if credentials_file:
        core.set_config_variable("credentials_file", str(credentials_file))
    where = f"profile {profile!r}" if profile else "the default AWS credential chain"
    try:
        session = boto3.Session(botocore_session=core, profile_name=profile or None)
        creds = session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
    except ProfileNotFound:
        raise HCPCredentialsError(
            f"AWS profile {profile!r} not found in the AWS config or credentials files "
            "(see `aws configure list-profiles`)") from None
    except BotoCoreError as exc:  # partial credentials, broken config, expired SSO, ...
        raise HCPCredentialsError(f"AWS credentials from {where} are not usable "
                                  f"({type(exc).__name__})") from None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        raise HCPCredentialsError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "select a profile of your AWS credentials file with --hcp-profile (HCP data need "
            "the AWS keys that ConnectomeDB issues after you accept the data-use terms)")
    source = f"{creds.method}" + (f" (profile {profile!r})" if profile else "")
    source += f", key {mask_key_id(frozen.access_key)}"
    config = Config(retries={"max_attempts": 1, "mode": "standard"},  # we retry, with resume
                    connect_timeout=timeout_s, read_timeout=timeout_s,
                    user_agent_extra="vaemap-fetch-hcp")
    client = session.client("s3", region_name=region or session.region_name or HCP_REGION,
                            endpoint_url=endpoint_url or None, config=config)
    return S3Connection(client, source, safe_url(client.meta.endpoint_url),
                        (frozen.access_key, frozen.secret_key, frozen.token or ""))


# ---- manifest (what was asked for, by ETag; no secrets) ----------------------------------------

class _Manifest:
    def __init__(self, directory: Path):
        self.path = directory / MANIFEST_NAME
        try:
            data = json.loads(self.path.read_text())
            self.files = dict(data.get("files", {}))
        except (OSError, ValueError, AttributeError):
            self.files = {}

    def get(self, name: str) -> dict:
        return dict(self.files.get(name) or {})

    def set(self, name: str, **entry) -> None:
        self.files[name] = entry
        write_text_atomic(self.path, json.dumps({"files": self.files}, indent=2) + "\n")

    def drop(self, name: str) -> None:
        if self.files.pop(name, None) is not None:
            write_text_atomic(self.path, json.dumps({"files": self.files}, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`vaemap_bids.atomic.write_text_atomic`, a failure reported as an HCP output error."""
    try:
        atomic.write_text_atomic(path, text)
    except OSError as exc:
        raise output_error(Path(path), exc) from None


def ensure_writable_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and prove it is writable; HCPOutputError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise output_error(path, exc, "create or write to") from None
    return path


# ---- remote objects --------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteFile:
    name: str
    key: str
    size: int
    etag: str

    @property
    def md5(self) -> str | None:
        """The object's MD5 when its ETag is one (single-part upload), else None."""
        tag = self.etag.strip('"')
        return tag if re.fullmatch(r"[0-9a-f]{32}", tag) else None


@dataclass
class FetchResult:
    subject: str
    directory: Path                         # <dest_root>/<id>/T1w/Diffusion
    paths: dict[str, Path]                  # file name -> local path
    downloaded: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_transferred: int = 0


def _error_info(exc) -> tuple[str, int | None]:
    response = getattr(exc, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code, status


def _is_transient(exc) -> bool:
    code, status = _error_info(exc)
    return code in _TRANSIENT_CODES or (status is not None and status >= 500)


def _sleep(seconds: float) -> None:
    """Back-off pause (one name, so tests can record it instead of waiting)."""
    time.sleep(seconds)


def _backoff(attempt: int, backoff_s: float) -> float:
    return min(backoff_s * 2 ** (attempt - 1), 60.0)


class _Fetcher:
    def __init__(self, conn: S3Connection, bucket: str, release: str, subject: str,
                 attempts: int, backoff_s: float):
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        self.conn, self.client = conn, conn.client
        self.bucket, self.release, self.subject = bucket, release, subject
        self.attempts, self.backoff_s = attempts, backoff_s
        self.network_errors = _network_errors()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _reason(self, exc: BaseException) -> str:
        from botocore.exceptions import ClientError
        if isinstance(exc, ClientError):
            code, status = _error_info(exc)
            return f"HTTP {status} {code}".strip()
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return self.conn.scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    def _give_up(self, what: str, reason: str) -> HCPNetworkError:
        return HCPNetworkError(f"network failure while {what} from {self.conn.endpoint} after "
                               f"{self.attempts} attempt(s) ({reason}); run the same command "
                               "again: finished files are kept and partial ones resume")

    def _call(self, what: str, call):
        """``call()`` with retries and back-off on network failures and transient HTTP errors."""
        from botocore.exceptions import ClientError
        for attempt in range(1, self.attempts + 1):
            try:
                return call()
            except ClientError as exc:
                if not _is_transient(exc):
                    raise
                reason = self._reason(exc)
            except self.network_errors as exc:
                reason = self._reason(exc)
            if attempt == self.attempts:
                raise self._give_up(what, reason)
            delay = _backoff(attempt, self.backoff_s)
            log.warning("%s: %s; retry %d of %d in %.1f s", what, reason, attempt,
                        self.attempts - 1, delay)
            _sleep(delay)
        raise AssertionError("unreachable")

    def classify(self, exc, key: str) -> HCPError:
        """The HCPError for a non-transient ClientError on ``key``."""
        code, status = _error_info(exc)
        url = self.url(key)
        if code in _CREDENTIAL_CODES:
            return HCPCredentialsError(
                f"the server rejected the AWS credentials ({code}) for {url}: the key "
                f"({self.conn.credential_source}) is unknown, expired or its secret is wrong")
        if code in _DENIED_CODES or status == 403:
            return HCPAccessDeniedError(
                f"access denied (HTTP 403) to {url} with credentials from "
                f"{self.conn.credential_source}: use the AWS keys ConnectomeDB issued for HCP "
                "data (after accepting the data-use terms), or pick their profile with "
                "--hcp-profile")
        if code in _NOT_FOUND_CODES or status == 404:
            return self._not_found(key)
        if code == "NoSuchBucket":
            return HCPInputError(f"bucket {self.bucket!r} not found at {self.conn.endpoint}")
        return HCPError(f"S3 refused {url} (HTTP {status} {code})")

    def _not_found(self, key: str) -> HCPSubjectNotFoundError:
        """Subject unknown, or known without this diffusion file? Ask the bucket once."""
        from botocore.exceptions import ClientError
        prefix = f"{self.release}/{self.subject}/"
        try:
            listing = self._call(f"listing {self.url(prefix)}", lambda: self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, MaxKeys=1))
            exists = bool(listing.get("KeyCount") or listing.get("Contents"))
        except (ClientError, HCPNetworkError):  # listing may be denied: say what we know
            return HCPSubjectNotFoundError(
                f"{self.url(key)} not found (HTTP 404): HCP subject {self.subject} does not "
                f"exist in {self.release} or has no preprocessed diffusion data")
        if not exists:
            return HCPSubjectNotFoundError(
                f"HCP subject {self.subject} not found in s3://{self.bucket}/{self.release}/ "
                "(HTTP 404)")
        return HCPSubjectNotFoundError(
            f"HCP subject {self.subject} has no {key.rsplit('/', 1)[-1]} in T1w/Diffusion "
            f"(HTTP 404 for {self.url(key)}): no preprocessed diffusion data for this subject")

    def head(self, name: str) -> RemoteFile:
        from botocore.exceptions import ClientError
        key = object_key(self.subject, name, self.release)
        try:
            resp = self._call(f"checking {self.url(key)}",
                              lambda: self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            code, status = _error_info(exc)
            if status == 403 and code in ("403", "Forbidden", ""):
                # HEAD answers carry no body: one 1-byte GET tells a bad key from a denial
                try:
                    self._call(f"checking {self.url(key)}", lambda: self.client.get_object(
                        Bucket=self.bucket, Key=key, Range="bytes=0-0"))
                except ClientError as exc2:
                    raise self.classify(exc2, key) from None
            raise self.classify(exc, key) from None
        return RemoteFile(name, key, int(resp["ContentLength"]), str(resp["ETag"]))

    def download(self, remote: RemoteFile, dest: Path, manifest: _Manifest, progress: bool,
                 chunk_size: int, result: FetchResult) -> None:
        from botocore.exceptions import ClientError, FlexibleChecksumError
        from tqdm import tqdm

        part = dest.with_name(dest.name + PART_SUFFIX)
        entry = manifest.get(remote.name)
        if self._is_complete(remote, dest, entry, manifest):
            result.skipped.append(remote.name)
            return
        offset = 0
        if part.is_file():
            have = part.stat().st_size
            if (entry.get("etag") == remote.etag and entry.get("size") == remote.size
                    and 0 < have <= remote.size):
                offset = have
                result.resumed.append(remote.name)
                log.info("%s: resuming a partial download at %d of %d bytes", remote.name, have,
                         remote.size)
            else:
                log.info("%s: discarding a partial download of another version", remote.name)
        manifest.set(remote.name, key=remote.key, etag=remote.etag, size=remote.size,
                     state="partial")
        what = f"downloading {self.url(remote.key)}"
        failures, restarted = 0, False
        with tqdm(total=remote.size, initial=offset, unit="B", unit_scale=True,
                  unit_divisor=1024, desc=f"{self.subject} {remote.name}", disable=not progress,
                  leave=progress, dynamic_ncols=True) as bar:
            for whole_file_try in (1, 2):  # a file corrupted in transit is fetched once more
                problem = None
                while True:
                    if offset == remote.size and part.is_file():  # complete, not yet renamed
                        break
                    start = offset
                    try:
                        offset = self._stream(remote, part, offset, chunk_size, bar, result)
                        if offset != remote.size:
                            raise _ShortRead(f"stream ended at byte {offset} of {remote.size}")
                        break
                    except FlexibleChecksumError:  # botocore checked the object's checksum
                        problem = "its checksum does not match the object's"
                        break
                    except ClientError as exc:
                        code, status = _error_info(exc)
                        if status == 412 and not restarted:  # the object changed since we looked
                            log.warning("%s changed on the server; starting over", remote.name)
                            remote = self.head(remote.name)
                            manifest.set(remote.name, key=remote.key, etag=remote.etag,
                                         size=remote.size, state="partial")
                            bar.reset(total=remote.size)
                            offset, restarted = 0, True
                            continue
                        if not _is_transient(exc):
                            raise self.classify(exc, remote.key) from None
                        reason = self._reason(exc)
                    except (*self.network_errors, _ShortRead) as exc:
                        reason = self._reason(exc)
                        offset = part.stat().st_size if part.is_file() else 0
                    failures = 0 if offset > start else failures + 1  # progress resets the count
                    if failures >= self.attempts:
                        raise self._give_up(what, reason)
                    delay = _backoff(max(failures, 1), self.backoff_s)
                    log.warning("%s: %s at byte %d; resuming in %.1f s", remote.name, reason,
                                offset, delay)
                    _sleep(delay)
                problem = problem or _integrity_problem(part, remote)
                if problem is None:
                    break
                part.unlink(missing_ok=True)
                if whole_file_try == 2:
                    manifest.drop(remote.name)
                    raise HCPNetworkError(f"{self.url(remote.key)} arrived corrupted twice "
                                          f"({problem}); the partial file was removed: run again")
                log.warning("%s arrived corrupted (%s); downloading it again", remote.name,
                            problem)
                bar.reset(total=remote.size)
                offset = 0
        try:
            os.replace(part, dest)
        except OSError as exc:
            raise output_error(dest, exc, "rename into") from None
        manifest.set(remote.name, key=remote.key, etag=remote.etag, size=remote.size,
                     state="complete")
        if remote.name not in result.resumed:
            result.downloaded.append(remote.name)

    def _stream(self, remote: RemoteFile, part: Path, offset: int, chunk_size: int, bar,
                result: FetchResult) -> int:
        """One GET from ``offset`` appended to ``part``; returns the new size of ``part``."""
        kwargs = {"Bucket": self.bucket, "Key": remote.key, "IfMatch": remote.etag}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        resp = self.client.get_object(**kwargs)
        if offset and not resp.get("ContentRange"):  # the server sent the whole object
            bar.reset(total=remote.size)
            offset = 0
        try:
            # unbuffered: what was received is on disk (a killed run resumes from there), and
            # closing never retries a failed write
            fobj = open(part, "r+b" if offset else "wb", buffering=0)
        except OSError as exc:
            raise output_error(part, exc) from None
        with fobj:
            if offset:  # drop anything past the resume point ("wb" already emptied the file)
                try:
                    fobj.seek(offset)
                    fobj.truncate()
                except OSError as exc:
                    raise output_error(part, exc) from None
            for chunk in resp["Body"].iter_chunks(chunk_size):
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[fobj.write(view):]
                except OSError as exc:
                    raise output_error(part, exc) from None
                offset += len(chunk)
                result.bytes_transferred += len(chunk)
                bar.update(len(chunk))
            try:
                os.fsync(fobj.fileno())
            except OSError as exc:
                raise output_error(part, exc) from None
        return offset

    def _is_complete(self, remote: RemoteFile, dest: Path, entry: dict,
                     manifest: _Manifest) -> bool:
        if not dest.is_file() or dest.stat().st_size != remote.size:
            return False
        if entry.get("state") == "complete" and entry.get("etag") == remote.etag:
            log.info("%s: up to date (size and ETag match), skipped", remote.name)
            return True
        if entry.get("etag") not in (None, remote.etag):
            log.info("%s: the object changed on the server (ETag), downloading again",
                     remote.name)
            return False
        if remote.md5 is not None:
            if _md5(dest) != remote.md5:
                log.info("%s: MD5 differs from the object's ETag, downloading again",
                         remote.name)
                return False
            how = "size and MD5 match the ETag"
        else:
            how = "size matches; a multipart ETag cannot be checked locally"
        manifest.set(remote.name, key=remote.key, etag=remote.etag, size=remote.size,
                     state="complete")
        log.info("%s: already there (%s), skipped", remote.name, how)
        return True


def _integrity_problem(path: Path, remote: RemoteFile) -> str | None:
    """Why a complete download cannot be trusted, or None: the MD5 when the ETag is one (single-
    part upload), else for gzip files the gzip CRC and length (multipart ETags are not MD5s)."""
    if remote.md5 is not None:
        return None if _md5(path) == remote.md5 else "its MD5 does not match the ETag"
    if remote.name.endswith(".gz"):
        import gzip
        import zlib
        try:
            with gzip.open(path, "rb") as fobj:
                while fobj.read(1 << 22):
                    pass
        except (OSError, EOFError, zlib.error) as exc:
            return f"gzip check failed: {type(exc).__name__}"
    return None


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fobj:
        for block in iter(lambda: fobj.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_hcp_subject(subject: str, dest_root, *, profile: str | None = None,
                      endpoint_url: str | None = None,
                      credentials_file: str | os.PathLike | None = None,
                      bucket: str = HCP_BUCKET, release: str = HCP_RELEASE,
                      files: tuple[str, ...] = HCP_DIFFUSION_FILES, progress: bool = True,
                      attempts: int = 5, backoff_s: float = 2.0, timeout_s: float = 60.0,
                      chunk_size: int = 1 << 20) -> FetchResult:
    """Download ``<release>/<subject>/T1w/Diffusion/<files>`` into
    ``<dest_root>/<subject>/T1w/Diffusion/``, resuming and skipping what is already there.

    Raises ValueError for a subject ID that is not a plain label, and the HCPError subclasses
    of :mod:`vaemap_bids.hcp.errors` (each with its ``exit_code``)."""
    subject = naming.check_label(subject, "HCP subject ID")
    ensure_writable_dir(dest_root)  # an unwritable destination fails before any request
    directory = diffusion_dir(dest_root, subject)
    conn = connect(profile, endpoint_url, credentials_file, timeout_s=timeout_s)
    fetcher = _Fetcher(conn, bucket, release, subject, attempts, backoff_s)
    log.info("HCP subject %s: s3://%s/%s/%s/T1w/Diffusion from %s (credentials: %s) -> %s",
             subject, bucket, release, subject, conn.endpoint, conn.credential_source, directory)
    remotes = [fetcher.head(name) for name in files]  # every 403/404 before any big transfer
    ensure_writable_dir(directory)
    with _subject_lock(directory, subject):
        manifest = _Manifest(directory)
        _check_free_space(directory, remotes)
        result = FetchResult(subject, directory, {r.name: directory / r.name for r in remotes})
        for remote in remotes:
            fetcher.download(remote, directory / remote.name, manifest, progress, chunk_size,
                             result)
    log.info("HCP subject %s: %d downloaded, %d resumed, %d already there (%.1f MB transferred)",
             subject, len(result.downloaded), len(result.resumed), len(result.skipped),
             result.bytes_transferred / 1e6)
    return result


@contextlib.contextmanager
def _subject_lock(directory: Path, subject: str):
    """One fetch per subject folder at a time: two writers of one ``.part`` would interleave.
    An advisory ``flock`` (released by the kernel if the process dies); where the file system
    has no locks, the fetch goes on unlocked."""
    import fcntl
    path = directory / LOCK_NAME
    try:
        fobj = open(path, "a")
    except OSError as exc:
        raise output_error(path, exc) from None
    with fobj:
        try:
            fcntl.flock(fobj.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HCPBusyError(f"another process is downloading HCP subject {subject} into "
                               f"{directory}; run again when it has finished") from None
        except OSError:  # no lock support (some network file systems)
            pass
        yield


def _check_free_space(directory: Path, remotes: list[RemoteFile]) -> None:
    """Fail before downloading when the disk cannot hold what is still missing."""
    needed = 0
    for remote in remotes:
        dest = directory / remote.name
        part = dest.with_name(dest.name + PART_SUFFIX)
        if dest.is_file() and dest.stat().st_size == remote.size:
            continue
        needed += remote.size - (part.stat().st_size if part.is_file() else 0)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if needed > free:
        raise HCPOutputError(f"not enough free space in {directory}: the download needs "
                             f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB are free")
