"""HCP fetch (S3) and HCP -> BIDS conversion, against a real S3 server on 127.0.0.1 (moto in
server mode, IAM authentication on). No test talks to any other host: a guard fails any socket
connection elsewhere, the instance-metadata lookup is off and proxies are unset."""
from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import hcp_s3  # noqa: E402

from vaemap_bids import hcp  # noqa: E402
from vaemap_bids.cli import fetch_hcp  # noqa: E402
from vaemap_bids.hcp import fetch as hcp_fetch  # noqa: E402
from vaemap_bids.hcp import (HCPAccessDeniedError, HCPCredentialsError,  # noqa: E402
                             HCPDataError, HCPInputError, HCPNetworkError, HCPOutputError,
                             HCPSubjectNotFoundError)

SUBJECT = "100307"
BIG_SUBJECT = "100408"        # a ~2.5 MB image, for interrupting downloads
NO_DWI_SUBJECT = "100610"     # exists in the bucket, but without T1w/Diffusion
MULTIPART_SUBJECT = "100711"  # uploaded multipart: ETags are not MD5s
DATA_KEY = f"{SUBJECT}/T1w/Diffusion/data.nii.gz"
_ALLOWED_HOSTS = {"127.0.0.1", "localhost", "::1"}


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Fail any TCP connection to a host other than 127.0.0.1."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _ALLOWED_HOSTS:
            raise AssertionError(f"test tried to reach {address[0]}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def clean_aws_env(monkeypatch, tmp_path_factory):
    """No AWS settings from the machine: empty config/credentials files, no IMDS, no proxy."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
    empty = tmp_path_factory.mktemp("aws")
    (empty / "config").write_text("")
    (empty / "credentials").write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    sleeps: list[float] = []
    monkeypatch.setattr(hcp_fetch, "_sleep", sleeps.append)  # record back-off, do not wait
    return sleeps


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The fake HCP tree that is uploaded: {subject: {file name: path}}."""
    root = tmp_path_factory.mktemp("hcp_source")
    small = hcp_s3.make_fake_subject(root / SUBJECT / "T1w" / "Diffusion")
    big = hcp_s3.make_fake_subject(root / BIG_SUBJECT / "T1w" / "Diffusion", seed=5)
    hcp_s3.make_big_image(big["data.nii.gz"], 2_500_000, n_volumes=19)
    return {"root": root, SUBJECT: small, BIG_SUBJECT: big}


@pytest.fixture(scope="module")
def s3(source):
    server = hcp_s3.MotoS3()
    try:
        hcp_s3.seed_subject(server, SUBJECT, source[SUBJECT])
        hcp_s3.seed_subject(server, BIG_SUBJECT, source[BIG_SUBJECT])
        server.put(f"{hcp_s3.RELEASE}/{NO_DWI_SUBJECT}/T1w/T1w_acpc_dc_restore.nii.gz", b"x")
        for name, path in source[SUBJECT].items():
            server.put_multipart(f"{hcp_s3.RELEASE}/{MULTIPART_SUBJECT}/T1w/Diffusion/{name}",
                                 path.read_bytes())
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(s3):
    p = hcp_s3.FlakyProxy(s3.port)
    yield p
    p.stop()


@pytest.fixture
def reader_env(s3, monkeypatch):
    for name, value in s3.reader.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    return s3.reader


def _gets(proxy, name="data.nii.gz"):
    return [r for r in proxy.requests if r[0] == "GET" and r[1].endswith(name)]


def _secrets_in_tree(root: Path, secrets) -> list[str]:
    """Files under ``root`` whose bytes (gunzipped for .pklz/.gz) contain a secret."""
    hits = []
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            try:
                data = gzip.decompress(data)
            except OSError:
                pass
        for secret in secrets:
            if secret.encode() in data:
                hits.append(f"{path} contains {secret[:4]}...")
    return hits


# ---- fetch -> convert -----------------------------------------------------------------------------

def test_fetch_and_convert_gives_valid_bids(source, reader_env, tmp_path):
    bids_dir = tmp_path / "bids"
    sub = hcp.fetch_and_convert(SUBJECT, bids_dir, progress=False)

    src = source[SUBJECT]
    assert sub.dwi == bids_dir / "sub-100307" / "dwi" / "sub-100307_dwi.nii.gz"
    assert sub.dwi.read_bytes() == src["data.nii.gz"].read_bytes()      # image unchanged
    assert os.path.samefile(sub.dwi, bids_dir / "sourcedata" / "HCP_1200" / DATA_KEY)  # linked
    np.testing.assert_allclose(np.loadtxt(sub.bval), np.loadtxt(src["bvals"]))
    bvec = np.loadtxt(sub.bvec)
    assert bvec.shape == (3, 19)
    np.testing.assert_allclose(bvec, np.loadtxt(src["bvecs"]), atol=1e-9)  # FSL == BIDS frame
    meta = json.loads(sub.sidecar.read_text())
    assert meta["EchoTime"] == 0.0895
    assert (meta["SmallDelta"], meta["BigDelta"]) == (0.0106, 0.0431)
    assert [s["MeanBValue"] for s in meta["DiffusionShells"]] == [5, 1000, 2000]
    assert meta["SpatialReference"].startswith("T1w")
    desc = json.loads((bids_dir / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"]

    assert sub.mask == (bids_dir / "derivatives" / "hcp-mask" / "sub-100307" / "dwi"
                        / "sub-100307_desc-brain_mask.nii.gz")
    mask, dwi = nib.load(sub.mask), nib.load(sub.dwi)
    assert mask.shape == dwi.shape[:3] and np.allclose(mask.affine, dwi.affine)
    deriv_desc = json.loads((sub.mask_derivatives_dir / "dataset_description.json").read_text())
    assert deriv_desc["DatasetType"] == "derivative"

    from bids import BIDSLayout
    layout = BIDSLayout(str(bids_dir), validate=True, derivatives=str(sub.mask_derivatives_dir))
    assert layout.get(subject=SUBJECT, suffix="dwi", extension=".nii.gz",
                      return_type="file") == [str(sub.dwi)]
    assert layout.get_metadata(str(sub.dwi))["EchoTime"] == 0.0895
    masks = layout.get(subject=SUBJECT, suffix="mask", desc="brain", extension=".nii.gz",
                       return_type="file")
    assert masks == [str(sub.mask)]


def test_converted_dataset_passes_the_bids_validator(source, tmp_path):
    validator = __import__("shutil").which("bids-validator-deno")
    if validator is None:
        pytest.skip("bids-validator-deno is not installed")
    sub = hcp.convert_hcp_subject(source["root"], SUBJECT, tmp_path / "bids")
    for dataset in (sub.bids_dir, sub.mask_derivatives_dir):
        proc = subprocess.run([validator, str(dataset), "--format", "json"], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, NO_COLOR="1"))
        issues = json.loads(proc.stdout)["issues"]["issues"]
        errors = [i for i in issues if i["severity"] == "error"]
        assert errors == [], errors


def test_second_run_transfers_nothing(reader_env, proxy, tmp_path):
    bids_dir = tmp_path / "bids"
    hcp.fetch_and_convert(SUBJECT, bids_dir, endpoint_url=proxy.url, progress=False)
    first = len(proxy.requests)
    result = hcp.fetch_hcp_subject(SUBJECT, bids_dir / "sourcedata" / "HCP_1200",
                                   endpoint_url=proxy.url, progress=False)
    later = proxy.requests[first:]
    assert sorted(result.skipped) == sorted(hcp.HCP_DIFFUSION_FILES)
    assert result.bytes_transferred == 0
    assert {method for method, _, _ in later} == {"HEAD"}


def test_cli_shows_a_progress_bar(reader_env, tmp_path, capsys):
    assert fetch_hcp.main([str(tmp_path / "bids"), "--participant-label", SUBJECT]) == 0
    err = capsys.readouterr().err
    assert f"{SUBJECT} data.nii.gz: 100%" in err                      # tqdm, on stderr


def test_explicit_endpoint_overrides_environment(s3, reader_env, proxy, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hcp_s3.closed_port()}")
    hcp.fetch_hcp_subject(SUBJECT, tmp_path, endpoint_url=proxy.url, progress=False)
    assert _gets(proxy)


# ---- interrupted downloads -----------------------------------------------------------------------

def test_network_drop_mid_file_resumes_with_a_ranged_get(source, reader_env, proxy, tmp_path,
                                                        clean_aws_env):
    proxy.cut(DATA_KEY, after=5000, times=2)
    result = hcp.fetch_hcp_subject(SUBJECT, tmp_path, endpoint_url=proxy.url, progress=False,
                                   chunk_size=1024)
    gets = _gets(proxy)
    assert len(gets) == 3
    assert gets[0][2] is None
    starts = [int(r[2].split("=")[1].rstrip("-")) for r in gets[1:]]
    assert 0 < starts[0] <= 5000 and starts[0] < starts[1] <= 10000  # each retry resumes
    assert (tmp_path / DATA_KEY).read_bytes() == source[SUBJECT]["data.nii.gz"].read_bytes()
    assert not (tmp_path / (DATA_KEY + ".part")).exists()
    assert clean_aws_env == [2.0, 2.0]  # progress each time: the back-off does not grow
    # every byte written once: the retries fetched only what was missing
    assert result.bytes_transferred == sum(p.stat().st_size for p in source[SUBJECT].values())


def test_download_killed_halfway_resumes(source, s3, reader_env, proxy, tmp_path):
    """A real `vaemap-fetch-hcp` process is killed (SIGKILL) while the image downloads; the next
    run continues the .part file with a ranged GET and the result is byte-identical."""
    bids_dir = tmp_path / "bids"
    part = bids_dir / "sourcedata" / "HCP_1200" / BIG_SUBJECT / "T1w" / "Diffusion" / \
        "data.nii.gz.part"
    size = source[BIG_SUBJECT]["data.nii.gz"].stat().st_size
    proxy.stall(f"{BIG_SUBJECT}/T1w/Diffusion/data.nii.gz", after=(1 << 20) + 300_000)
    env = dict(os.environ, AWS_ENDPOINT_URL=proxy.url)
    proc = subprocess.Popen([sys.executable, "-m", "vaemap_bids.cli.fetch_hcp", str(bids_dir),
                             "--participant-label", BIG_SUBJECT, "--no-progress", "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not (part.is_file() and part.stat().st_size >= 1 << 20):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the download never reached 1 MiB"
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    have = part.stat().st_size
    assert 0 < have < size
    manifest = json.loads((part.parent / hcp_fetch.MANIFEST_NAME).read_text())
    assert manifest["files"]["data.nii.gz"]["state"] == "partial"

    proxy.clear()
    before = len(proxy.requests)
    assert fetch_hcp.main([str(bids_dir), "--participant-label", BIG_SUBJECT, "--no-progress", "-q",
                     "--endpoint-url", proxy.url]) == 0
    gets = [r for r in proxy.requests[before:] if r[0] == "GET" and "data.nii.gz" in r[1]]
    assert [r[2] for r in gets] == [f"bytes={have}-"]
    out = bids_dir / "sub-100408" / "dwi" / "sub-100408_dwi.nii.gz"
    assert out.read_bytes() == source[BIG_SUBJECT]["data.nii.gz"].read_bytes()
    assert hcp_s3.gunzip_ok(out)


def test_partial_file_of_another_version_is_not_mixed(source, reader_env, proxy, tmp_path):
    folder = tmp_path / SUBJECT / "T1w" / "Diffusion"
    folder.mkdir(parents=True)
    (folder / "data.nii.gz.part").write_bytes(b"old version bytes" * 50)
    (folder / hcp_fetch.MANIFEST_NAME).write_text(json.dumps({"files": {"data.nii.gz": {
        "etag": '"0123456789abcdef0123456789abcdef"', "size": 10 ** 6, "state": "partial"}}}))
    result = hcp.fetch_hcp_subject(SUBJECT, tmp_path, endpoint_url=proxy.url, progress=False)
    assert [r[2] for r in _gets(proxy)] == [None]                        # started over
    assert (folder / "data.nii.gz").read_bytes() == source[SUBJECT]["data.nii.gz"].read_bytes()
    assert "data.nii.gz" in result.downloaded and not result.resumed


def test_object_changed_between_head_and_get_restarts(source, reader_env, proxy, tmp_path,
                                                      monkeypatch):
    """The GET carries If-Match: the server answers 412 for a stale ETag instead of sending bytes
    of another version; the fetch looks again and downloads the current object whole."""
    real_head = hcp_fetch._Fetcher.head
    calls = []

    def stale_head(self, name):
        remote = real_head(self, name)
        calls.append(name)
        if name == "data.nii.gz" and calls.count(name) == 1:
            return hcp_fetch.RemoteFile(remote.name, remote.key, remote.size,
                                        '"ffffffffffffffffffffffffffffffff"')
        return remote

    monkeypatch.setattr(hcp_fetch._Fetcher, "head", stale_head)
    hcp.fetch_hcp_subject(SUBJECT, tmp_path, endpoint_url=proxy.url, progress=False)
    assert calls.count("data.nii.gz") == 2
    assert (tmp_path / DATA_KEY).read_bytes() == source[SUBJECT]["data.nii.gz"].read_bytes()


@pytest.mark.parametrize("subject", [SUBJECT, MULTIPART_SUBJECT])
def test_corrupted_in_transit_is_fetched_again(source, reader_env, proxy, tmp_path, subject):
    """A flipped byte is caught by the MD5 (single-part ETag) or, for a multipart ETag, by the
    gzip CRC; the file is downloaded once more, and a second corruption is an error (75)."""
    key = f"{subject}/T1w/Diffusion/data.nii.gz"
    proxy.corrupt(key, at=3000, times=1)
    result = hcp.fetch_hcp_subject(subject, tmp_path, endpoint_url=proxy.url, progress=False)
    assert [r[2] for r in _gets(proxy)] == [None, None]
    assert (tmp_path / key).read_bytes() == source[SUBJECT]["data.nii.gz"].read_bytes()
    assert "data.nii.gz" in result.downloaded

    proxy.corrupt(key, at=3000, times=2)
    with pytest.raises(HCPNetworkError, match="corrupted twice") as info:
        hcp.fetch_hcp_subject(subject, tmp_path / "again", endpoint_url=proxy.url,
                              progress=False)
    assert info.value.exit_code == 75
    assert not list((tmp_path / "again").rglob("data.nii.gz*"))


def test_multipart_etag_is_not_taken_for_an_md5(s3, reader_env, tmp_path):
    conn = hcp_fetch.connect()
    head = conn.client.head_object(Bucket=hcp_s3.BUCKET,
                                   Key=f"HCP_1200/{MULTIPART_SUBJECT}/T1w/Diffusion/bvals")
    remote = hcp_fetch.RemoteFile("bvals", "k", head["ContentLength"], head["ETag"])
    assert head["ETag"].endswith('-1"') and remote.md5 is None


def test_a_second_concurrent_fetch_of_a_subject_is_refused(reader_env, tmp_path):
    import fcntl
    folder = tmp_path / SUBJECT / "T1w" / "Diffusion"
    folder.mkdir(parents=True)
    with open(folder / hcp_fetch.LOCK_NAME, "a") as held:       # as a running fetch holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(hcp.HCPBusyError, match="another process") as info:
            hcp.fetch_hcp_subject(SUBJECT, tmp_path, progress=False)
        assert info.value.exit_code == 75
    hcp.fetch_hcp_subject(SUBJECT, tmp_path, progress=False)     # released: fine


def test_complete_file_without_record_is_checked_by_md5(source, reader_env, proxy, tmp_path):
    folder = tmp_path / SUBJECT / "T1w" / "Diffusion"
    folder.mkdir(parents=True)
    good = source[SUBJECT]["bvals"].read_bytes()
    (folder / "bvals").write_bytes(good)                                  # right bytes: kept
    bad = bytearray(source[SUBJECT]["bvecs"].read_bytes())
    bad[0:1] = b"9"
    (folder / "bvecs").write_bytes(bytes(bad))                            # same size, wrong
    result = hcp.fetch_hcp_subject(SUBJECT, tmp_path, endpoint_url=proxy.url, progress=False)
    assert "bvals" in result.skipped and "bvecs" in result.downloaded
    assert (folder / "bvecs").read_bytes() == source[SUBJECT]["bvecs"].read_bytes()


# ---- errors and exit codes -----------------------------------------------------------------------

def test_access_denied_403(s3, monkeypatch, tmp_path, capsys):
    for name, value in s3.denied.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    with pytest.raises(HCPAccessDeniedError, match="403") as info:
        hcp.fetch_hcp_subject(SUBJECT, tmp_path, progress=False)
    assert info.value.exit_code == 66
    assert fetch_hcp.main([str(tmp_path / "bids"), "--participant-label", SUBJECT,
                     "--no-progress"]) == 66
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vaemap-fetch-hcp: error: access denied (HTTP 403)")
    assert not list((tmp_path / "bids").rglob("*.nii.gz"))


@pytest.mark.parametrize("keys", ["unknown", "wrong-secret"])
def test_rejected_credentials(s3, monkeypatch, tmp_path, keys):
    key_id = "AKIAUNKNOWNKEY123456" if keys == "unknown" else s3.reader.access_key_id
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    with pytest.raises(HCPCredentialsError) as info:
        hcp.fetch_hcp_subject(SUBJECT, tmp_path, progress=False)
    assert info.value.exit_code == 66
    assert key_id not in str(info.value) and "not-the-secret" not in str(info.value)
    assert "****" + key_id[-4:] in str(info.value)


def test_subject_not_found_404(reader_env, tmp_path, capsys):
    with pytest.raises(HCPSubjectNotFoundError, match="999999 not found") as info:
        hcp.fetch_hcp_subject("999999", tmp_path, progress=False)
    assert info.value.exit_code == 18
    assert not (tmp_path / "999999").exists()
    with pytest.raises(HCPSubjectNotFoundError, match=f"{NO_DWI_SUBJECT} has no bvals"):
        hcp.fetch_hcp_subject(NO_DWI_SUBJECT, tmp_path, progress=False)
    assert fetch_hcp.main([str(tmp_path / "bids"), "--participant-label", "sub-999999",
                     "--no-progress"]) == 18
    assert "not found" in capsys.readouterr().err


def test_no_credentials(s3, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    with pytest.raises(HCPCredentialsError, match="no AWS credentials found"):
        hcp.fetch_hcp_subject(SUBJECT, tmp_path, progress=False)
    with pytest.raises(HCPCredentialsError, match="profile 'nope' not found"):
        hcp.fetch_hcp_subject(SUBJECT, tmp_path, profile="nope", progress=False)
    assert fetch_hcp.main([str(tmp_path / "bids"), "--participant-label", SUBJECT,
                     "--no-progress"]) == 66
    assert "no AWS credentials found" in capsys.readouterr().err


def test_profile_from_credentials_file(source, s3, monkeypatch, tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text(f"[hcp]\naws_access_key_id = {s3.reader.access_key_id}\n"
                     f"aws_secret_access_key = {s3.reader.secret_access_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    sub = hcp.fetch_and_convert(SUBJECT, tmp_path / "bids", profile="hcp", endpoint_url=s3.url,
                                progress=False)
    assert sub.dwi.read_bytes() == source[SUBJECT]["data.nii.gz"].read_bytes()


def test_network_failure_retries_with_backoff_then_exit_75(reader_env, monkeypatch, tmp_path,
                                                           clean_aws_env, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{hcp_s3.closed_port()}")
    with pytest.raises(HCPNetworkError, match="after 4 attempt") as info:
        hcp.fetch_hcp_subject(SUBJECT, tmp_path, progress=False, attempts=4, backoff_s=1.5)
    assert info.value.exit_code == 75
    assert clean_aws_env == [1.5, 3.0, 6.0]                               # exponential back-off
    assert fetch_hcp.main([str(tmp_path / "bids"), "--participant-label", SUBJECT, "--no-progress",
                     "--retries", "2"]) == 75
    assert "run the same command again" in capsys.readouterr().err


def test_unwritable_bids_dir_or_full_disk_exit_73(source, reader_env, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert fetch_hcp.main([str(blocker / "bids"), "--participant-label", SUBJECT,
                     "--no-progress"]) == 73
    with pytest.raises(HCPOutputError, match="cannot create or write"):
        hcp.convert_hcp_subject(source["root"], SUBJECT, blocker / "bids")

    # a write that the kernel refuses with ENOSPC: the .part file is /dev/full
    folder = tmp_path / "full" / SUBJECT / "T1w" / "Diffusion"
    folder.mkdir(parents=True)
    (folder / "bvals.part").symlink_to("/dev/full")
    with pytest.raises(HCPOutputError, match="No space left on device") as info:
        hcp.fetch_hcp_subject(SUBJECT, tmp_path / "full", progress=False)
    assert info.value.exit_code == 73

    class Usage:
        free = 1000
    monkeypatch.setattr(hcp_fetch.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(HCPOutputError, match="not enough free space") as info:
        hcp.fetch_hcp_subject(SUBJECT, tmp_path / "dl", progress=False)
    assert info.value.exit_code == 73


def test_usage_errors_exit_64(tmp_path, capsys):
    assert fetch_hcp.main([str(tmp_path)]) == 64                       # no subject, no --hcp-dir
    assert fetch_hcp.main([str(tmp_path), "--participant-label", "../etc"]) == 64
    assert "invalid HCP subject ID" in capsys.readouterr().err


# ---- secrets -------------------------------------------------------------------------------------

def test_no_secret_in_outputs_work_dir_or_logs(source, s3, reader_env, tmp_path, caplog, capfd):
    """Fetch through the library, the CLI and the Nipype graph (credentials in the environment,
    as most users set them): no key id or secret anywhere on disk or in the logs."""
    caplog.set_level("DEBUG")
    from vaemap_bids.interfaces.hcp import FetchHCPSubject
    from vaemap_bids.workflows.hcp import run_hcp_fetch
    secrets = [s3.reader.access_key_id, s3.reader.secret_access_key]
    bids_dir, work_dir = tmp_path / "bids", tmp_path / "work"
    subs = run_hcp_fetch([SUBJECT], bids_dir, work_dir)
    assert subs[0].dwi.read_bytes() == source[SUBJECT]["data.nii.gz"].read_bytes()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3.reader.secret_access_key  # restored

    # the interface alone, secrets left in os.environ: it drops them from Nipype's record
    from nipype.pipeline import engine as pe
    node = pe.Node(FetchHCPSubject(subject=SUBJECT, bids_dir=str(tmp_path / "bids2")),
                   name="fetch", base_dir=str(work_dir / "bare"))
    result = node.run()
    assert Path(result.outputs.dwi).is_file() and Path(result.outputs.mask).is_file()
    assert "AWS_SECRET_ACCESS_KEY" not in result.runtime.environ
    assert (work_dir / "bare" / "fetch" / "_report" / "report.rst").is_file()

    assert fetch_hcp.main([str(tmp_path / "bids3"), "--participant-label", SUBJECT, "-v",
                     "--no-progress"]) == 0
    assert _secrets_in_tree(tmp_path, secrets) == []
    logs = caplog.text + "".join(capfd.readouterr())
    assert "****" + secrets[0][-4:] in logs
    for secret in secrets:
        assert secret not in logs


def test_secrets_withheld_keeps_them_in_memory_only(s3, reader_env, tmp_path):
    """While the participant graph runs, the secrets leave os.environ and no file holds them."""
    import tempfile

    from vaemap_bids.cli.credentials import secrets_withheld
    before = set(Path(tempfile.gettempdir()).iterdir())
    with secrets_withheld() as names:
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(names)
        assert not any(name in os.environ for name in hcp.SECRET_ENV_VARS)
        created = set(Path(tempfile.gettempdir()).iterdir()) - before
        secret = s3.reader.secret_access_key
        for path in created:  # other processes of this machine may create files meanwhile
            if path.is_dir():
                assert _secrets_in_tree(path, [secret]) == []
            elif path.is_file():
                assert secret.encode() not in path.read_bytes()
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3.reader.secret_access_key


def test_graph_failure_raises_the_nodes_hcp_error(reader_env, tmp_path):
    from vaemap_bids.workflows.hcp import run_hcp_fetch
    with pytest.raises(HCPSubjectNotFoundError) as info:
        run_hcp_fetch(["999999"], tmp_path / "bids", tmp_path / "work")
    assert info.value.exit_code == 18


# ---- an HCP tree on disk (--input-type hcp) ------------------------------------------------------

def test_convert_hcp_tree_on_disk(source, tmp_path):
    root = tmp_path / "HCP"
    files = hcp_s3.make_fake_subject(root / "200109" / "T1w" / "Diffusion", seed=9, bvec_rows=19)
    hcp_s3.make_fake_subject(root / "200210" / "T1w" / "Diffusion", seed=10)
    (root / "200311" / "MNINonLinear").mkdir(parents=True)                # no diffusion: skipped
    subs = hcp.convert_hcp_tree(root, tmp_path / "bids", link=False)
    assert [s.subject for s in subs] == ["200109", "200210"]
    bvec = np.loadtxt(subs[0].bvec)
    assert bvec.shape == (3, 19)                                          # T rows of 3 -> 3 rows
    np.testing.assert_allclose(bvec, np.loadtxt(files["bvecs"]).T, atol=1e-9)
    assert not os.path.samefile(subs[0].dwi, files["data.nii.gz"])        # copied
    assert subs[0].dwi.read_bytes() == files["data.nii.gz"].read_bytes()
    assert fetch_hcp.main([str(tmp_path / "bids2"), "--hcp-dir", str(root), "--participant-label",
                     "200210", "--copy"]) == 0
    assert (tmp_path / "bids2" / "sub-200210" / "dwi" / "sub-200210_dwi.nii.gz").is_file()

    from vaemap_bids.workflows.hcp import run_hcp_fetch               # the same, as a graph
    sub = run_hcp_fetch(["sub-200109"], tmp_path / "bids3", tmp_path / "work", hcp_root=root)[0]
    assert os.path.samefile(sub.dwi, files["data.nii.gz"])               # hard-linked
    np.testing.assert_allclose(np.loadtxt(sub.bvec), np.loadtxt(files["bvecs"]).T, atol=1e-9)
    with pytest.raises(ValueError, match="invalid HCP subject ID"):
        run_hcp_fetch(["../200109"], tmp_path / "bids3", tmp_path / "work", hcp_root=root)

    from vaemap_bids.workflows.hcp import prepare_hcp_input             # the CLI's entry
    bids_dir, masks = prepare_hcp_input("hcp", root, None, tmp_path / "work4")
    assert bids_dir == tmp_path / "work4" / "hcp_bids"
    assert sorted(p.name for p in bids_dir.glob("sub-*")) == ["sub-200109", "sub-200210"]
    assert sorted(p.name for p in masks.glob("sub-*")) == ["sub-200109", "sub-200210"]
    with pytest.raises(ValueError, match="needs --participant-label"):
        prepare_hcp_input("fetch", tmp_path / "bids5", [], tmp_path / "work5")


def test_hcp_tree_errors(source, tmp_path):
    with pytest.raises(HCPInputError):
        hcp.convert_hcp_subject(tmp_path / "missing", SUBJECT, tmp_path / "bids")
    assert fetch_hcp.main([str(tmp_path / "bids"), "--hcp-dir", str(tmp_path / "missing")]) == 66
    assert fetch_hcp.main([str(tmp_path / "bids"), "--hcp-dir", str(source["root"]),
                     "--participant-label", "123456"]) == 18
    bad = hcp_s3.make_fake_subject(tmp_path / "HCP" / "300100" / "T1w" / "Diffusion")
    bad["bvals"].write_text(" ".join(["5"] + ["1000"] * 10) + "\n")       # 11 b-values, 19 vols
    with pytest.raises(HCPDataError, match="19 gradient directions but .* has 11 b-values"):
        hcp.convert_hcp_subject(tmp_path / "HCP", "300100", tmp_path / "bids")
    assert fetch_hcp.main([str(tmp_path / "bids"), "--hcp-dir", str(tmp_path / "HCP")]) == 65
    bad = hcp_s3.make_fake_subject(tmp_path / "HCP2" / "300200" / "T1w" / "Diffusion")
    nib.save(nib.Nifti1Image(np.ones((6, 7, 4), np.uint8), np.diag([-1.25, 1.25, 1.25, 1])),
             str(bad["nodif_brain_mask.nii.gz"]))
    with pytest.raises(HCPDataError, match="differs from the DWI grid"):
        hcp.convert_hcp_subject(tmp_path / "HCP2", "300200", tmp_path / "bids")


# ---- fetch -> convert -> vaemap participant ------------------------------------------------------

TINY_CONFIG = """\
lsq: {max_iter: 5}
vaeunig: {epochs: 2, warmup_epochs: 1, ramp_epochs: 1, n_posterior_samples: 2, patience: 2}
"""


@pytest.mark.slow
def test_vaemap_fetch_hcp_participant(source, s3, reader_env, tmp_path):
    """The whole path through the command line: `vaemap BIDS_DIR OUT participant --fetch-hcp`
    downloads and converts, then fits with the HCP mask; credentials stay in the environment the
    whole time, as users set them, and no secret lands on disk (Nipype records node environments,
    the TOML records the settings)."""
    import torch

    from vaemap_bids.cli.run import main as vaemap_main

    torch.set_num_threads(1)
    bids_dir, out_dir, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    code = vaemap_main([str(bids_dir), str(out_dir), "participant", "--fetch-hcp",
                        "--participant-label", SUBJECT, "-w", str(work), "--config", str(config),
                        "--device", "cpu", "--nprocs", "1", "--omp-nthreads", "1",
                        "--models", "msdki", "--methods", "lsq", "vaeunig"])
    assert code == 0
    sub_dwi = bids_dir / "sub-100307" / "dwi" / "sub-100307_dwi.nii.gz"
    mask_file = (bids_dir / "derivatives" / "hcp-mask" / "sub-100307" / "dwi"
                 / "sub-100307_desc-brain_mask.nii.gz")
    dwi_out = out_dir / "sub-100307" / "dwi"
    used_mask = nib.load(dwi_out / "sub-100307_desc-brain_mask.nii.gz").get_fdata() > 0
    hcp_mask = nib.load(mask_file).get_fdata() > 0
    assert np.array_equal(used_mask, hcp_mask)                  # the HCP mask, not median_otsu
    for method in ("lsq", "vaeunig"):
        msd = nib.load(dwi_out / f"sub-100307_model-msdki_desc-{method}_param-msd_dwimap.nii.gz")
        values = msd.get_fdata()[hcp_mask]
        assert np.all(np.isfinite(values)) and np.all(values > 0)
        assert np.allclose(msd.affine, nib.load(sub_dwi).affine)
    assert (out_dir / "sub-100307.html").is_file()
    toml = next(work.glob("config-*.toml")).read_text()
    assert 'input_type = "fetch"' in toml
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3.reader.secret_access_key  # restored
    secrets = [s3.reader.access_key_id, s3.reader.secret_access_key]
    assert _secrets_in_tree(tmp_path, secrets) == []


@pytest.mark.slow
def test_vaemap_input_type_hcp(tmp_path):
    """`--input-type hcp`: an HCP tree on disk is converted in the work dir, then fitted."""
    from vaemap_bids.cli.run import main as vaemap_main

    root = tmp_path / "HCP"
    hcp_s3.make_fake_subject(root / "200109" / "T1w" / "Diffusion", seed=9)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    out_dir, work = tmp_path / "out", tmp_path / "work"
    code = vaemap_main([str(root), str(out_dir), "participant", "--input-type", "hcp",
                        "-w", str(work), "--config", str(config), "--device", "cpu",
                        "--nprocs", "1", "--models", "msdki", "--methods", "lsq"])
    assert code == 0
    assert (out_dir / "sub-200109" / "dwi"
            / "sub-200109_model-msdki_desc-lsq_param-msd_dwimap.nii.gz").is_file()
    assert (work / "hcp" / "hcp_bids" / "sub-200109").is_dir()
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(
        ["bvals", "bvecs", "data.nii.gz", "nodif_brain_mask.nii.gz"])   # input untouched


def test_vaemap_fetch_hcp_needs_participant_labels(tmp_path, capsys):
    from vaemap_bids.cli.run import main as vaemap_main
    code = vaemap_main([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                        "--fetch-hcp", "-w", str(tmp_path / "work")])
    assert code == 64 and "needs --participant-label" in capsys.readouterr().err
