"""Test helpers for the HCP fetch: a real S3 server on 127.0.0.1 (moto in server mode) with IAM
authentication switched on, a TCP proxy that can cut or stall a download, and a tiny fake HCP
subject. Nothing here talks to any host but 127.0.0.1."""
from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

BUCKET = "hcp-openaccess"
RELEASE = "HCP_1200"
ADMIN = {"aws_access_key_id": "AKIAADMINSEEDONLY000", "aws_secret_access_key": "admin-seed-secret",
         "region_name": "us-east-1"}

_READ_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                   "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}],
}


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str

    def env(self) -> dict:
        return {"AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key}


class MotoS3:
    """moto's S3 + IAM in server mode on 127.0.0.1, seeded, then with authentication enforced:
    ``reader`` may read the bucket, ``denied`` is a valid user without any permission (403)."""

    def __init__(self):
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        logging.getLogger("moto").setLevel(logging.WARNING)  # the server logs request headers
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.port = port
        self.url = f"http://{host}:{port}"
        self.s3 = boto3.client("s3", endpoint_url=self.url, **ADMIN)
        iam = boto3.client("iam", endpoint_url=self.url, **ADMIN)
        self.s3.create_bucket(Bucket=BUCKET)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-hcp",
                            PolicyDocument=json.dumps(_READ_POLICY))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        self.reader = Keys(key["AccessKeyId"], key["SecretAccessKey"])
        iam.create_user(UserName="seeder")
        iam.put_user_policy(UserName="seeder", PolicyName="write-hcp", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                     "Resource": "*"}]}))
        key = iam.create_access_key(UserName="seeder")["AccessKey"]
        self.seeder = Keys(key["AccessKeyId"], key["SecretAccessKey"])
        iam.create_user(UserName="denied")
        key = iam.create_access_key(UserName="denied")["AccessKey"]
        self.denied = Keys(key["AccessKeyId"], key["SecretAccessKey"])
        self._set_auth("0")  # from now on every request is authenticated and authorised

    def _set_auth(self, count: str) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=count.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()

    def put_multipart(self, key: str, body: bytes) -> str:
        """Upload in one multipart part: the ETag is then ``"<md5 of md5s>-1"``, not an MD5."""
        client = self._seeder_client()
        upload = client.create_multipart_upload(Bucket=BUCKET, Key=key)
        part = client.upload_part(Bucket=BUCKET, Key=key, PartNumber=1, Body=body,
                                  UploadId=upload["UploadId"])
        done = client.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
        return done["ETag"]

    def _seeder_client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.seeder.access_key_id,
                            aws_secret_access_key=self.seeder.secret_access_key)

    def put(self, key: str, body: bytes) -> None:
        """Upload as ``seeder`` (the admin keys stop working once authentication is on)."""
        self._seeder_client().put_object(Bucket=BUCKET, Key=key, Body=body)

    def stop(self) -> None:
        try:
            self._set_auth("inf")  # moto's settings are process-wide: leave them as found
        finally:
            self.server.stop()


def seed_subject(s3: MotoS3, subject: str, files: dict[str, Path]) -> None:
    for name, path in files.items():
        s3.put(f"{RELEASE}/{subject}/T1w/Diffusion/{name}", Path(path).read_bytes())


# ---- fake subject ------------------------------------------------------------------------------

def hcp_like_table(n_b0: int = 3, n_dirs: int = 8, shells=(1000, 2000), seed: int = 0):
    """bvals (jittered like HCP's: b0 = 5, shells +-5) and unit bvecs (3, T), interleaved."""
    rng = np.random.default_rng(seed)
    bvals, bvecs = [], []
    for shell in shells:
        for _ in range(n_dirs):
            v = rng.normal(size=3)
            bvecs.append(v / np.linalg.norm(v))
            bvals.append(shell + int(rng.choice([-5, 0, 5])))
    order = rng.permutation(len(bvals))
    bvals = [bvals[i] for i in order]
    bvecs = [bvecs[i] for i in order]
    for k in range(n_b0):  # b0s spread through the series, with HCP's (1, 0, 0) direction
        pos = k * (len(bvals) // max(n_b0, 1) + 1)
        bvals.insert(pos, 5)
        bvecs.insert(pos, np.array([1.0, 0.0, 0.0]))
    return np.array(bvals, float), np.array(bvecs).T


def make_fake_subject(folder: Path, shape=(6, 7, 5), seed: int = 0, noise: float = 0.02,
                      bvec_rows: int = 3) -> dict[str, Path]:
    """A tiny HCP ``T1w/Diffusion`` folder: an LAS 1.25 mm float32 image with a mono-exponential
    plus kurtosis-like decay in a central 'brain', bvals/bvecs as HCP writes them, and a mask."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bvals, bvecs = hcp_like_table(seed=seed)
    b = bvals * 1e-3                                            # ms/um^2
    diff = rng.uniform(0.6, 1.2, size=shape)
    kurt = rng.uniform(0.3, 1.0, size=shape)
    s0 = rng.uniform(800, 1200, size=shape)
    signal = s0[..., None] * np.exp(-b * diff[..., None] + (b * diff[..., None]) ** 2
                                    * kurt[..., None] / 6)
    signal += rng.normal(scale=noise * 1000, size=signal.shape)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1
    signal[mask == 0] = rng.normal(scale=20, size=(int((mask == 0).sum()), b.size))
    affine = np.diag([-1.25, 1.25, 1.25, 1.0])                  # LAS, like HCP's T1w/Diffusion
    affine[:3, 3] = [90.0, -126.0, -72.0]
    img = nib.Nifti1Image(signal.astype(np.float32), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    files = {"data.nii.gz": folder / "data.nii.gz", "bvals": folder / "bvals",
             "bvecs": folder / "bvecs", "nodif_brain_mask.nii.gz": folder / "nodif_brain_mask.nii.gz"}
    nib.save(img, str(files["data.nii.gz"]))
    mask_img = nib.Nifti1Image(mask.astype(np.float32), affine)
    mask_img.header.set_xyzt_units("mm", "sec")
    mask_img.header.set_qform(affine, code=1)
    mask_img.header.set_sform(affine, code=1)
    nib.save(mask_img, str(files["nodif_brain_mask.nii.gz"]))
    files["bvals"].write_text(" ".join(f"{v:g}" for v in bvals) + "\n")
    table = bvecs if bvec_rows == 3 else bvecs.T
    files["bvecs"].write_text("".join(" ".join(f"{x:.6f}" for x in row) + "\n" for row in table))
    return files


def make_big_image(path: Path, n_bytes: int, n_volumes: int, seed: int = 1) -> None:
    """Overwrite ``path`` with an incompressible float32 image of about ``n_bytes`` (gzip), so a
    download can be interrupted after whole 1 MiB chunks have reached the disk."""
    rng = np.random.default_rng(seed)
    side = int(round((n_bytes / 4 / n_volumes) ** (1 / 3))) + 1
    data = rng.uniform(1, 1000, size=(side, side, side, n_volumes)).astype(np.float32)
    affine = np.diag([-1.25, 1.25, 1.25, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    mask = np.ones((side, side, side), np.uint8)
    nib.save(nib.Nifti1Image(mask, affine), str(Path(path).with_name("nodif_brain_mask.nii.gz")))


def gunzip_ok(path: Path) -> bool:
    with gzip.open(path) as fobj:
        while fobj.read(1 << 20):
            pass
    return True


# ---- a proxy that can break downloads -----------------------------------------------------------

class FlakyProxy:
    """A TCP proxy 127.0.0.1:<port> -> the S3 server that forwards requests one per connection
    (``Connection: close``), records (method, path, Range) of each, and can

    - ``corrupt``: flip one byte of a matching GET's body (corruption in transit);
    - ``cut``: close the connection after N bytes of a matching GET's body (a network drop), the
      next ``times`` times;
    - ``stall``: stop forwarding after N body bytes and hold the connection open (a hung
      transfer, for a download killed halfway)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.requests: list[tuple[str, str, str | None]] = []
        self.rules: list[dict] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def cut(self, path_part: str, after: int, times: int = 1) -> None:
        self.rules.append({"kind": "cut", "path": path_part, "after": after, "times": times})

    def corrupt(self, path_part: str, at: int, times: int = 1) -> None:
        """Flip the bits of body byte ``at`` of the next ``times`` matching GETs."""
        self.rules.append({"kind": "corrupt", "path": path_part, "after": at, "times": times})

    def stall(self, path_part: str, after: int) -> None:
        self.rules.append({"kind": "stall", "path": path_part, "after": after, "times": 10 ** 6})

    def clear(self) -> None:
        self.rules.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _rule_for(self, method: str, path: str):
        if method != "GET":
            return None
        for rule in self.rules:
            if rule["path"] in path and rule["times"] > 0:
                rule["times"] -= 1
                return rule
        return None

    def _handle(self, conn: socket.socket) -> None:
        up = None
        try:
            conn.settimeout(30)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            head, body = head.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = [line for line in lines[1:] if not line.lower().startswith("connection:")]
            rng = next((line.split(":", 1)[1].strip() for line in headers
                        if line.lower().startswith("range:")), None)
            length = next((int(line.split(":", 1)[1]) for line in headers
                           if line.lower().startswith("content-length:")), 0)
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append((method, path, rng))
            rule = self._rule_for(method, path)
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
            out = "\r\n".join([lines[0], *headers, "Connection: close"]) + "\r\n\r\n"
            up.sendall(out.encode("latin-1") + body)
            sent_body, header_done, buf = 0, False, b""
            while True:
                data = up.recv(65536)
                if not data:
                    break
                if not header_done:
                    buf += data
                    if b"\r\n\r\n" not in buf:
                        continue
                    rhead, data = buf.split(b"\r\n\r\n", 1)
                    conn.sendall(rhead + b"\r\n\r\n")
                    header_done = True
                if rule is not None and rule["kind"] == "corrupt":
                    at = rule["after"] - sent_body
                    if 0 <= at < len(data):
                        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                elif rule is not None and sent_body + len(data) >= rule["after"]:
                    conn.sendall(data[: rule["after"] - sent_body])
                    if rule["kind"] == "stall":
                        self._stop.wait()
                    return
                conn.sendall(data)
                sent_body += len(data)
        except OSError:
            return
        finally:
            for s in (conn, up):
                if s is not None:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
