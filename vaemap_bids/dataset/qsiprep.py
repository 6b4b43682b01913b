"""QSIPrep derivatives as input (``--input-type qsiprep``, or detected from ``GeneratedBy``).

What is read, per series (``sub-<L>[/ses-<S>]/dwi/``)::

    <entities>_space-<space>_desc-preproc_dwi.nii.gz         the preprocessed DWI
    <entities>_space-<space>_desc-preproc_dwi.bval/.bvec     gradients (else .b, else .b_table.txt)
    <entities>_space-<space>_desc-brain_mask.nii.gz          the brain mask, used as given (required)

Every entity of the DWI name except ``desc`` identifies the series and is kept in the output
names (``space-`` included). The gradient table is converted into vaemap's one frame (FSL's
``.bvec`` convention, :mod:`vaemap_bids.dataset.gradients`) and written as ``.bval``/``.bvec``
into the work dir; the graph reads those, and the sidecars' ``Sources`` name QSIPrep's own files
(``bids:qsiprep:...``).

The BIDS validator is not run on QSIPrep input: it validates raw datasets, and a derivatives
dataset's ``.b``/``.b_table.txt``/``desc-`` files are outside its raw schema. vaemap checks
instead what it relies on: a ``dataset_description.json`` with ``DatasetType`` ``derivative``,
and, per selected series, the DWI, a readable gradient table and the brain mask.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from ..atomic import write_text_atomic
from .bids import DwiSeries, NoMatchingData, collect_dwi_series
from .gradients import (fsl_gradient_text, read_bval, read_bvec, read_dsistudio_btable,
                        read_mrtrix_b, voxel_to_bvec_frame, world_to_bvec_frame)

log = logging.getLogger("vaemap.dataset")

#: ``GeneratedBy[].Name`` of a QSIPrep dataset (compared case-insensitively).
QSIPREP_NAME = "QSIPrep"
#: The BIDS URI dataset name of QSIPrep input in ``Sources`` (``bids:qsiprep:sub-01/...``).
DATASET_NAME = "qsiprep"
#: What the summary records as the validator of QSIPrep input.
VALIDATOR_NOTE = ("not run: QSIPrep derivatives (DatasetType derivative); vaemap checked the "
                  "description, and every series' DWI, gradients and brain mask")
_PREPROC = re.compile(r"_desc-preproc_dwi\.nii(\.gz)?$")


def read_description(bids_dir) -> dict:
    path = Path(bids_dir) / "dataset_description.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def generated_by_qsiprep(bids_dir) -> bool:
    """Whether ``dataset_description.json`` says QSIPrep made the dataset."""
    generated = read_description(bids_dir).get("GeneratedBy") or []
    if isinstance(generated, dict):
        generated = [generated]
    return any(isinstance(g, dict) and str(g.get("Name", "")).strip().lower()
               == QSIPREP_NAME.lower() for g in generated)


def check_qsiprep_dataset(bids_dir) -> None:
    """The description checks that replace the BIDS validator (ValueError when they fail)."""
    path = Path(bids_dir) / "dataset_description.json"
    if not path.is_file():
        raise ValueError(f"{path}: not found (a QSIPrep output folder has one)")
    desc = read_description(bids_dir)
    if not desc:
        raise ValueError(f"{path}: not readable JSON")
    if desc.get("DatasetType") != "derivative":
        raise ValueError(f"{path}: DatasetType is {desc.get('DatasetType', 'missing')!r}, not "
                         "'derivative': is this QSIPrep's output folder?")


def sibling(dwi: str, suffix: str) -> Path:
    """``..._desc-preproc_dwi.nii.gz`` -> ``..._desc-preproc_dwi<suffix>`` or, for
    ``suffix="mask"``, ``..._desc-brain_mask.nii.gz``."""
    if suffix == "mask":
        return Path(_PREPROC.sub("_desc-brain_mask.nii.gz", dwi))
    return Path(_PREPROC.sub("_desc-preproc_dwi", dwi) + suffix)


def gradient_table(dwi: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(b-values s/mm^2, directions in the ``.bvec`` (FSL) frame, the QSIPrep files read) of a
    QSIPrep DWI: ``.bval``+``.bvec`` (voxel frame), else ``.b`` (world RAS+), else
    ``.b_table.txt`` (world LPS+). FileNotFoundError when none is there."""
    bval, bvec, mrtrix, btable = (sibling(dwi, s) for s in (".bval", ".bvec", ".b",
                                                            ".b_table.txt"))
    affine = nib.load(dwi).affine
    if bval.is_file() and bvec.is_file():
        return read_bval(bval), voxel_to_bvec_frame(read_bvec(bvec), affine), [str(bval),
                                                                                str(bvec)]
    if mrtrix.is_file():
        bvals, world = read_mrtrix_b(mrtrix)
        return bvals, world_to_bvec_frame(world, affine), [str(mrtrix)]
    if btable.is_file():
        bvals, world = read_dsistudio_btable(btable)
        return bvals, world_to_bvec_frame(world, affine), [str(btable)]
    raise FileNotFoundError(f"{dwi}: no gradient table ({bval.name} + {bvec.name}, "
                            f"{mrtrix.name} or {btable.name})")


def _write_if_changed(path: Path, text: str) -> str:
    """Rewrite only a changed file: Nipype hashes inputs by time stamp, and a rerun must find
    the same files to resume."""
    if not (path.is_file() and path.read_text() == text):
        write_text_atomic(path, text)
    return str(path)


def collect_qsiprep_series(qsiprep_dir, participant_labels=None, session_labels=None, *,
                           gradient_dir) -> list[DwiSeries]:
    """The ``desc-preproc`` DWI series of the selected participants and sessions, each with its
    given mask and its gradients converted into ``gradient_dir``. Raises NoMatchingData (none
    found), FileNotFoundError (a mask or gradient table is missing), ValueError (bad files)."""
    found = collect_dwi_series(qsiprep_dir, participant_labels, session_labels)
    series = [s for s in found if _PREPROC.search(s.dwi)]
    if not series:
        raise NoMatchingData(f"{qsiprep_dir}: no QSIPrep DWI (*_desc-preproc_dwi.nii.gz) found "
                             f"among {len(found)} DWI file(s)")
    out = []
    for s in series:
        mask = sibling(s.dwi, "mask")
        if not mask.is_file():
            mask = Path(str(mask)[: -len(".gz")])
        if not mask.is_file():
            raise FileNotFoundError(f"{sibling(s.dwi, 'mask')}: QSIPrep brain mask not found for "
                                    f"{Path(s.dwi).name} (vaemap uses QSIPrep's own mask)")
        bvals, bvecs, read = gradient_table(s.dwi)
        bval_text, bvec_text = fsl_gradient_text(bvals, bvecs)
        stem = Path(gradient_dir) / f"{s.prefix}_dwi"
        Path(gradient_dir).mkdir(parents=True, exist_ok=True)
        bval = _write_if_changed(stem.with_suffix(".bval"), bval_text)
        bvec = _write_if_changed(stem.with_suffix(".bvec"), bvec_text)
        meta = sibling(s.dwi, ".json")
        log.info("%s: QSIPrep input %s, gradients from %s, mask %s", s.prefix,
                 Path(s.dwi).name, ", ".join(Path(p).name for p in read), mask.name)
        out.append(DwiSeries(s.entities, s.dwi, bval, bvec, str(meta) if meta.is_file() else None,
                             mask=str(mask), sources=[s.dwi, *read]))
    return out


__all__ = ["QSIPREP_NAME", "DATASET_NAME", "VALIDATOR_NOTE", "generated_by_qsiprep",
           "check_qsiprep_dataset", "gradient_table", "collect_qsiprep_series", "sibling"]
