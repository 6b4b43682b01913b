"""Atomic file writes: a hidden temporary file in the target folder, then a rename.

Every file vaemap writes goes through here, so that a crash, a full disk or an interrupt never
leaves a half-written output where a user (or a resumed run) would take it for a complete one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


def _replace_from_temp(path, write) -> Path:
    """Call ``write(temp_path)``, then move the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the extension so that writers choosing a format by name (nibabel) see the real one
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
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
    """nibabel writes gzip with mtime 0, so identical images give identical bytes."""
    return _replace_from_temp(path, lambda tmp: nib.save(img, tmp))


def write_npz_atomic(path, **arrays) -> Path:
    def write(tmp):
        with open(tmp, "wb") as fobj:
            np.savez_compressed(fobj, **arrays)
    return _replace_from_temp(path, write)


def copy_file_atomic(src, dst) -> Path:
    """Copy ``src`` onto ``dst`` through a temporary file in ``dst``'s folder."""
    import shutil
    return _replace_from_temp(dst, lambda tmp: shutil.copyfile(src, tmp))
