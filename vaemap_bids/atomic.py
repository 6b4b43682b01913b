"""Atomic file writes: a hidden temporary file in the target folder, then a rename.

Every file vaemap writes goes through here, so that a crash, a full disk or an interrupt never
leaves a half-written output where a user (or a resumed run) would take it for a complete one.
Temporary files are named ``.<name>.<random>.vaemap-tmp``: no tool that globs ``*.nii.gz``
takes one for an image, and :func:`remove_stale_temporaries` finds the ones a killed run left.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


TEMP_SUFFIX = ".vaemap-tmp"


def _replace_from_temp(path, write) -> Path:
    """Call ``write(temp_path)``, then move the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path, data: bytes) -> Path:
    return _replace_from_temp(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def to_jsonable(obj):
    """``json.dumps`` default: numpy scalars and arrays, paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=to_jsonable) + "\n")


def write_nifti_atomic(path, img: nib.Nifti1Image) -> Path:
    """The image's bytes, gzipped (mtime 0, nibabel's level 1) when the name ends in .gz, so
    identical images give identical files."""
    data = img.to_bytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)
    return write_bytes_atomic(path, data)


def write_npz_if_changed(path, **arrays) -> Path:
    """An uncompressed ``.npz``, rewritten only when its content changes: a file whose bytes
    stay the same keeps its timestamp, by which Nipype decides whether a node input changed."""
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return path
    return write_bytes_atomic(path, data)


def write_npz_atomic(path, **arrays) -> Path:
    def write(tmp):
        with open(tmp, "wb") as fobj:
            np.savez_compressed(fobj, **arrays)
    return _replace_from_temp(path, write)


def copy_file_atomic(src, dst) -> Path:
    """Copy ``src`` onto ``dst`` through a temporary file in ``dst``'s folder."""
    import shutil
    return _replace_from_temp(dst, lambda tmp: shutil.copyfile(src, tmp))


def remove_stale_temporaries(folder) -> int:
    """Delete the temporary files of writes that a killed run never finished, under ``folder``
    (call it only while holding the folder's lock); returns how many were removed."""
    n = 0
    for tmp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            n += 1
    return n
