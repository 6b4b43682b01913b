"""BIDS names: the one label cleaner, the entity order, and the name builder.

Every file name vaemap writes is ``build_name(entities, suffix, extension)``: the entities in the
order of :data:`ENTITIES` (``sub``, ``ses``, ``acq``, ``run``, ``space`` of the input series, then
``model``, ``desc``, ``param``, ``stat`` of the derivative), then the suffix. Which outputs exist
and what their entities are is the derivatives table, :mod:`vaemap_bids.outputs.table`.
"""
from __future__ import annotations

import re

#: (entity, key in file names), in the order names are written.
ENTITIES = (("subject", "sub"), ("session", "ses"), ("acquisition", "acq"), ("run", "run"),
            ("space", "space"), ("model", "model"), ("desc", "desc"), ("param", "param"),
            ("stat", "stat"))
#: The input series' entities carried into every output name.
SERIES_ENTITIES = ("subject", "session", "acquisition", "run", "space")
_KEYS = dict(ENTITIES)
_ENTITY_OF_KEY = {key: entity for entity, key in ENTITIES}
_LABEL = re.compile(r"^[A-Za-z0-9]+$")


def check_label(value, what: str = "label") -> str:
    """A BIDS label: letters and digits only (rejects '/', '..', '_', '-' and spaces)."""
    value = str(value)
    if not _LABEL.match(value):
        raise ValueError(f"invalid {what} {value!r}: BIDS labels are letters and digits only")
    return value


def clean_label(value, key: str = "sub") -> str:
    """The bare label of ``sub-01`` or ``01`` (``key`` is the entity key: sub, ses, ...);
    ValueError when what is left is not a BIDS label."""
    text = str(value).strip()
    if text.startswith(f"{key}-"):
        text = text[len(key) + 1:]
    return check_label(text, f"{_ENTITY_OF_KEY.get(key, key)} label")


def _run_index(value) -> str:
    """A run index as the input wrote it (``run-01`` stays ``run-01``: pybids' PaddedInt keeps
    the padding in ``str``)."""
    text = str(value)
    if not text.isdigit():
        raise ValueError(f"invalid run {text!r}: BIDS run indices are non-negative integers")
    return text


def series_entities(entities: dict) -> dict:
    """The series part of ``entities`` (those present)."""
    return {k: entities[k] for k in SERIES_ENTITIES if entities.get(k) not in (None, "")}


def entity_parts(entities: dict) -> list[str]:
    """``["sub-01", "ses-a", ..., "model-msdki", "desc-lsq"]`` in BIDS order."""
    if not entities.get("subject"):
        raise ValueError("a subject label is required")
    unknown = set(entities) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}")
    parts = []
    for entity, key in ENTITIES:
        value = entities.get(entity)
        if value in (None, ""):
            continue
        parts.append(f"{key}-{_run_index(value) if entity == 'run' else check_label(value, entity)}")
    return parts


def build_name(entities: dict, suffix: str, extension: str) -> str:
    """``sub-01_model-msdki_desc-lsq_param-msd_dwimap.nii.gz`` from entities, suffix, extension."""
    return "_".join(entity_parts(entities) + [suffix]) + extension


def prefix(entities: dict) -> str:
    """``sub-01_ses-a_acq-b_run-1``: the series' entities, the start of all its output names."""
    return "_".join(entity_parts(series_entities(entities)))


def subject_dir(entities: dict) -> str:
    """``sub-<L>`` or ``sub-<L>/ses-<S>`` (relative to OUTPUT_DIR)."""
    sub = f"sub-{check_label(entities['subject'], 'subject')}"
    ses = entities.get("session")
    return f"{sub}/ses-{check_label(ses, 'session')}" if ses else sub


def sidecar(nifti_name: str) -> str:
    """``x.nii.gz`` -> ``x.json``; ``x_dseg.nii.gz`` -> ``x_dseg.json``."""
    return re.sub(r"\.nii(\.gz)?$", ".json", nifti_name)


def parse(name: str) -> dict:
    """Keys of a BIDS name, e.g. ``{"sub": "01", "model": "msdki", ..., "suffix": "dwimap"}``."""
    stem = re.sub(r"\.(nii\.gz|nii|json|npz|tsv)$", "", name.rsplit("/", 1)[-1])
    parts = stem.split("_")
    out = dict(p.split("-", 1) for p in parts[:-1] if "-" in p)
    out["suffix"] = parts[-1]
    return out


def parse_series_entities(name: str) -> dict:
    """The series entities of a BIDS file name, as ``{"subject": ..., "session": ...}``."""
    keys = parse(name)
    return {entity: keys[key] for entity, key in ENTITIES[:len(SERIES_ENTITIES)] if key in keys}


# ---- QSM (MEGRE input, outputs in anat/) ------------------------------------------------------
#: kind -> (desc, suffix): ``sub-<L>[_ses-<S>]_model-qsm_desc-<desc>_<suffix>.nii.gz``; the brain
#: mask has no model entity (as the DWI one). Fields are ``fieldmap`` with ``Units: ppm`` in the
#: sidecar (BIDS has no suffix for a field in ppm; BEP016-like ``model-qsm`` marks them).
QSM_OUTPUTS = {"localfield": ("localfield", "fieldmap"), "totalfield": ("totalfield", "fieldmap"),
               "mask": ("brain", "mask"), "record": ("qsmrecord", "qsm")}


def qsm_name(entities: dict, kind: str, method: str | None = None, extension=".nii.gz") -> str:
    """``sub-01_model-qsm_desc-tv_Chimap.nii.gz`` (``kind="chi"``), ``..._desc-localfield_
    fieldmap.nii.gz``, ``sub-01_desc-brain_mask.nii.gz``; relative to the subject's folder."""
    ents = series_entities(entities)
    if kind == "chi":
        return build_name({**ents, "model": "qsm", "desc": method}, "Chimap", extension)
    desc, suffix = QSM_OUTPUTS[kind]
    if kind != "mask":
        ents = {**ents, "model": "qsm"}
    return build_name({**ents, "desc": desc}, suffix, ".json" if kind == "record" else extension)


def qsm_path(entities: dict, kind: str, method: str | None = None) -> str:
    """The path of a QSM output relative to OUTPUT_DIR (``sub-<L>[/ses-<S>]/anat/...``; the run
    record goes to ``.../log/``)."""
    folder = "log" if kind == "record" else "anat"
    return f"{subject_dir(entities)}/{folder}/{qsm_name(entities, kind, method)}"
