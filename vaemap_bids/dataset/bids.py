"""The input BIDS dataset: validation, DWI series discovery (pybids), given brain masks, and the
per-series plan (which models can run on which acquisition) checked before any graph is built.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import naming
from ..atomic import write_npz_if_changed
from ..physics import Acquisition, get_model_class
from .gradients import load_acquisition
from .image import scan_image

log = logging.getLogger("vaemap.dataset")

#: Entities that identify a DWI series and are carried into output names.
SERIES_ENTITIES = naming.SERIES_ENTITIES


class ValidationFailed(ValueError):
    """The input dataset is not valid BIDS (the CLI maps this to exit code 16)."""


class NoMatchingData(LookupError):
    """No participant, session or DWI series matches the request (exit code 18)."""


# ---- validation ------------------------------------------------------------------------------

@dataclass
class ValidationReport:
    validator: str                  # e.g. "bids-validator-deno 3.0.2 (schema 1.2.7)"
    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    @property
    def n_warnings(self) -> int:
        return len(self.warnings)

    def first_errors(self, n: int = 3) -> str:
        parts = [f"{e.get('code')} {e.get('location') or ''}".strip() for e in self.errors[:n]]
        more = len(self.errors) - n
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _deno_validator_command() -> list[str] | None:
    try:
        import bids_validator_deno  # noqa: F401
        import deno  # noqa: F401
    except ImportError:
        exe = shutil.which("bids-validator-deno")
        return [exe] if exe else None
    return [sys.executable, "-c", "from bids_validator_deno import cli; cli()"]


def _deno_validator_version() -> str:
    try:
        from importlib.metadata import version
        return version("bids-validator-deno")
    except Exception:
        return "unknown"


def run_bids_validator(bids_dir, scratch_dir=None, timeout_s: float = 1800) -> ValidationReport | None:
    """Validate with the BIDS validator (deno build, runs offline: its schema is bundled).

    Returns None when the validator cannot be run here; the caller falls back to pybids."""
    cmd = _deno_validator_command()
    if cmd is None:
        return None
    from ..config import subprocess_env
    extra = {"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
    if scratch_dir is not None:  # deno keeps a cache; keep it out of $HOME (read-only in containers)
        extra["DENO_DIR"] = str(Path(scratch_dir) / "deno")
    env = subprocess_env(**extra)
    try:
        proc = subprocess.run([*cmd, str(bids_dir), "--format", "json"], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("BIDS validator could not run (%s); falling back to pybids", exc)
        return None
    try:
        result = json.loads(proc.stdout)
        issues = result["issues"]["issues"]
    except (ValueError, KeyError, TypeError):
        log.warning("BIDS validator gave no readable result (exit %s: %s); falling back to pybids",
                    proc.returncode, (proc.stderr or proc.stdout).strip()[-300:])
        return None
    schema = (result.get("summary") or {}).get("schemaVersion")
    name = f"bids-validator-deno {_deno_validator_version()}" + (f" (schema {schema})" if schema else "")
    errors = [i for i in issues if i.get("severity") == "error"]
    return ValidationReport(name, errors, [i for i in issues if i.get("severity") == "warning"])


def pybids_validation(bids_dir) -> ValidationReport:
    """pybids' own checks (a dataset_description.json with a Name and BIDSVersion; files that do
    not follow BIDS naming are ignored when indexing)."""
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError

    import bids
    name = f"pybids {bids.__version__}"
    try:
        BIDSLayout(str(bids_dir), validate=True)
    except BIDSValidationError as exc:
        return ValidationReport(name, [{"code": "PYBIDS", "location": str(exc).splitlines()[0]}])
    return ValidationReport(name)


def validate_dataset(bids_dir, scratch_dir=None) -> ValidationReport:
    """Validate the input dataset; returns the report (validator, warnings), raises
    ValidationFailed."""
    report = run_bids_validator(bids_dir, scratch_dir)
    if report is None:
        report = pybids_validation(bids_dir)
    if report.errors:
        raise ValidationFailed(f"{bids_dir}: BIDS validation failed ({report.validator}): "
                               f"{len(report.errors)} error(s): {report.first_errors()}; fix the "
                               "dataset or use --skip-bids-validation")
    log.info("BIDS validation passed (%s, %d warnings)", report.validator, report.n_warnings)
    return report


# ---- discovery -------------------------------------------------------------------------------

@dataclass
class DwiSeries:
    """One DWI series of the input dataset."""

    entities: dict          # subject, session, acquisition, run, space (those present)
    dwi: str
    bval: str
    bvec: str
    metadata: str | None = None
    mask: str | None = None          # a brain mask given with the series (QSIPrep's), used as is
    sources: list[str] | None = None  # the input files behind dwi/bval/bvec, when converted

    @property
    def prefix(self) -> str:
        return naming.prefix(self.entities)


#: A BIDS DWI file name: key-label pairs of letters and digits, then the suffix.
_DWI_NAME = re.compile(r"^sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*_dwi\.nii(?:\.gz)?$")
_SUBJECT_DIR = re.compile(r"^sub-[A-Za-z0-9]+$")


def symlink_cycles(root) -> list[Path]:
    """Symbolic links under ``root`` that lead back to a folder above them (following them would
    never end); found without following any link twice."""
    found: list[Path] = []

    def walk(folder: str, ancestors: frozenset) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=True):
                    continue
            except OSError:
                continue
            real = os.path.realpath(entry.path)
            if real in ancestors:
                found.append(Path(entry.path))
            else:
                walk(entry.path, ancestors | {real})

    walk(str(root), frozenset({os.path.realpath(root)}))
    return found


def _layout(bids_dir):
    """pybids' index of the dataset, leaving out what must not be followed or read: symbolic
    link cycles and ``sub-*`` folders whose label is not a BIDS label (each with a warning)."""
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError
    from bids.layout.index import BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    root = Path(bids_dir)
    skip = symlink_cycles(root)
    for link in skip:
        log.warning("%s: a symbolic link back to %s (a cycle): not followed", link,
                    os.path.realpath(link))
    for folder in sorted(root.glob("sub-*")):
        if folder.is_dir() and not _SUBJECT_DIR.match(folder.name):
            log.warning("%s: not a BIDS subject folder (labels are letters and digits): ignored",
                        folder)
            skip.append(folder)
    indexer = BIDSLayoutIndexer(ignore=list(DEFAULT_LOCATIONS_TO_IGNORE) + skip)
    try:
        # validate=False: validation is a separate, explicit step (the real validator or pybids')
        return BIDSLayout(str(bids_dir), validate=False, indexer=indexer)
    except BIDSValidationError as exc:
        raise ValueError(f"{bids_dir}: {str(exc).splitlines()[0]}") from None


def collect_dwi_series(bids_dir, participant_labels=None, session_labels=None) -> list[DwiSeries]:
    """Every DWI series (``*_dwi.nii[.gz]``) of the selected participants and sessions.

    Raises NoMatchingData for an unknown participant or session, or when nothing is found."""
    layout = _layout(bids_dir)
    subjects = sorted(layout.get_subjects())
    if participant_labels:
        unknown = [s for s in participant_labels if s not in subjects]
        if unknown:
            raise NoMatchingData(f"{bids_dir}: participant(s) {', '.join(unknown)} not found "
                                 f"(the dataset has: {', '.join(subjects) or 'none'})")
    query = {"suffix": "dwi", "extension": [".nii", ".nii.gz"], "return_type": "object"}
    if participant_labels:
        query["subject"] = list(participant_labels)
    if session_labels:
        known = set(layout.get_sessions(subject=list(participant_labels) if participant_labels
                                         else None))
        unknown = [s for s in session_labels if s not in known]
        if unknown:
            raise NoMatchingData(f"{bids_dir}: session(s) {', '.join(unknown)} not found for the "
                                 f"selected participants (sessions: {', '.join(sorted(known)) or 'none'})")
        query["session"] = list(session_labels)
    files = layout.get(**query)
    if not files:
        who = ", ".join(participant_labels) if participant_labels else "any participant"
        raise NoMatchingData(f"{bids_dir}: no DWI series (*_dwi.nii[.gz]) found for {who}")
    series: list[DwiSeries] = []
    for bids_file in sorted(files, key=lambda f: f.path):
        if not _DWI_NAME.match(Path(bids_file.path).name):
            raise ValueError(f"{bids_file.path}: not a BIDS file name (entities are key-label "
                             "pairs of letters and digits joined by '_')")
        ents = bids_file.get_entities()
        entities = {k: str(ents[k]) for k in SERIES_ENTITIES if ents.get(k) not in (None, "")}
        bval = layout.get_nearest(bids_file.path, suffix="dwi", extension=".bval", all_=False)
        bvec = layout.get_nearest(bids_file.path, suffix="dwi", extension=".bvec", all_=False)
        stem = _strip_ext(bids_file.path)
        meta = layout.get_nearest(bids_file.path, suffix="dwi", extension=".json", all_=False)
        series.append(DwiSeries(entities, bids_file.path, bval or f"{stem}.bval",
                                bvec or f"{stem}.bvec", meta))
    seen: dict[str, str] = {}
    for s in series:
        if s.prefix in seen:
            raise ValueError(f"{s.dwi}: output names would collide with {seen[s.prefix]} "
                             f"(both are {s.prefix}; vaemap tells series apart by "
                             f"{', '.join(SERIES_ENTITIES)})")
        seen[s.prefix] = s.dwi
    return series


def _strip_ext(path: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


# ---- given masks -----------------------------------------------------------------------------

def find_derivative_mask(derivative_dirs, entities: dict) -> str | None:
    """The best ``desc-brain_mask`` for a series in the given derivative folders (QSIPrep style).

    A mask matches when its subject equals the series' and each of its other identifying entities
    (ses, acq, run, space) equals the series' value; a mask without an entity applies to every
    value of it. The mask matching the most entities wins; ``dwi/`` beats ``anat/``."""
    from bids.layout import parse_file_entities

    best, best_key = None, None
    for root in derivative_dirs or ():
        sub_dir = Path(root) / f"sub-{entities['subject']}"
        if not sub_dir.is_dir():
            continue
        for path in sorted(sub_dir.rglob(f"sub-{entities['subject']}*_desc-brain_mask.nii*")):
            ents = parse_file_entities(str(path))
            if ents.get("subject") != entities["subject"]:
                continue
            matched, ok = 0, True
            for key in SERIES_ENTITIES[1:]:
                value = ents.get(key)
                if value in (None, ""):
                    continue
                if str(value) != str(entities.get(key, "")) and not (
                        key == "run" and entities.get(key) and int(value) == int(entities[key])):
                    ok = False
                    break
                matched += 1
            if not ok:
                continue
            key = (matched, ents.get("datatype") == "dwi")
            if best_key is None or key > best_key:
                best, best_key = str(path), key
    return best


# ---- per-series plan -------------------------------------------------------------------------

@dataclass
class ModelDecision:
    runs: bool                  # the acquisition supports the model: it will be fitted
    reason: str | None          # why not, when it does not
    n_measurements: int


@dataclass
class SeriesPlan:
    """Everything checked about one series before the graph is built."""

    series: DwiSeries
    shape: tuple[int, ...]
    voxel_size_mm: tuple[float, ...]
    shells: list[dict]
    n_volumes: int
    mask_file: str | None
    models: dict[str, ModelDecision]
    arrays_file: str            # the brain mask and the volumes kept (npz), for the graph
    mask_source: str            # "given: <path>" or how the mask was computed
    excluded_volumes: dict = field(default_factory=dict)   # {"index": why}

    def models_to_run(self) -> list[str]:
        return [m for m, d in self.models.items() if d.runs]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prefix"] = self.series.prefix
        return out


def decide_models(acq: Acquisition, models, explicit: bool) -> dict[str, ModelDecision]:
    """Which models the acquisition supports. A model the user named explicitly and that cannot
    run is an error (ValueError); a default model that cannot run is skipped with its reason."""
    decisions = {}
    for name in models:
        cls = get_model_class(name)
        try:
            model = cls(acq)
        except ValueError as exc:
            if explicit:
                raise ValueError(f"--models {name} cannot run on this acquisition: {exc}") from None
            decisions[name] = ModelDecision(False, str(exc), 0)
            continue
        decisions[name] = ModelDecision(True, None, model.n_measurements)
    return decisions


#: A computed brain mask smaller than this fraction of the image is worth a look.
SMALL_MASK_FRACTION = 0.2


def plan_series(series: DwiSeries, models, explicit_models: bool, derivative_dirs=(), *,
                plan_dir) -> SeriesPlan:
    """Check one series end to end before any graph is built: the gradient table, the header
    and the whole image stream (one open), the brain mask (given, or median_otsu on the mean
    b0), dead or outlier volumes (left out, with a warning), and which models can run on what
    is left. The mask and the volumes kept are saved in ``plan_dir`` for the graph, so the image
    is decoded only once more. Raises FileNotFoundError / ValueError naming the file."""
    from .masking import brain_mask
    from .quality import find_bad_volumes

    for path, what in ((series.bval, "bval"), (series.bvec, "bvec")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: {what} file not found for {series.dwi}")
    acq = load_acquisition(series.bval, series.bvec)
    if acq.bvals.max() < acq.b0_threshold:
        raise ValueError(f"{series.bval}: all b-values are below {acq.b0_threshold * 1e3:.0f} "
                         f"s/mm^2 (the largest is {acq.bvals.max() * 1e3:g}): are they in "
                         "ms/um^2? BIDS .bval files are in s/mm^2")
    try:
        decide_models(acq, models, explicit_models)  # fail fast, before reading the image
    except ValueError as exc:
        raise ValueError(f"{series.dwi}: {exc}") from None
    scan = scan_image(series.dwi, acq)
    info = scan.info
    n_nonfinite = int(scan.nonfinite.sum())
    if n_nonfinite:
        log.warning("%s: %d voxels have NaN/Inf values; they are excluded from the fits",
                    series.dwi, n_nonfinite)
    mask_file = series.mask or find_derivative_mask(derivative_dirs, series.entities)
    if mask_file is not None:
        log.info("%s: using the given mask %s", series.prefix, mask_file)
    elif derivative_dirs:
        log.info("%s: no desc-brain_mask in %s; computing one with median_otsu",
                 series.prefix, ", ".join(str(d) for d in derivative_dirs))
    try:
        mask, mask_source = brain_mask(scan.mean_b0, info, mask_file)
    except ValueError as exc:
        where = mask_file or series.dwi
        raise ValueError(f"{where}: {str(exc).removeprefix(f'{where}: ')}") from None
    fraction = float(mask.mean())
    if mask_file is None and fraction < SMALL_MASK_FRACTION:
        log.warning("%s: the median_otsu brain mask covers only %.0f %% of the image; check it "
                    "in the report (or give a mask with --derivatives)", series.prefix,
                    100 * fraction)
    bad = find_bad_volumes(scan.thumbnails, scan.block, mask, acq)
    keep = np.ones(acq.n_volumes, dtype=bool)
    keep[list(bad)] = False
    for index, why in bad.items():
        log.warning("%s: volume %d (b = %g s/mm^2) left out: %s", series.dwi, index,
                    acq.bvals[index] * 1e3, why)
    if not keep[acq.b0_mask].any():
        raise ValueError(f"{series.dwi}: no usable b0 volume is left to normalise by (every "
                         "b0 volume is dead or an outlier)")
    kept = acq.subset(keep)
    try:
        decisions = decide_models(kept, models, explicit_models)
    except ValueError as exc:
        raise ValueError(f"{series.dwi}: {exc} (after leaving out {len(bad)} bad volumes)") \
            from None
    if not any(d.runs for d in decisions.values()):
        log.warning("%s: no model can run on this acquisition (%s)", series.prefix,
                    "; ".join(f"{m}: {d.reason}" for m, d in decisions.items()))
    arrays_file = str(Path(plan_dir) / f"{series.prefix}_plan.npz")
    write_npz_if_changed(arrays_file, mask=mask, keep=keep)
    return SeriesPlan(series, tuple(info.shape), tuple(info.zooms), kept.shell_table(),
                      kept.n_volumes, mask_file, decisions, arrays_file, mask_source,
                      {str(i): why for i, why in bad.items()})


__all__ = ["ValidationFailed", "NoMatchingData", "validate_dataset",
           "run_bids_validator", "pybids_validation", "DwiSeries", "collect_dwi_series",
           "find_derivative_mask", "ModelDecision", "SeriesPlan", "decide_models", "plan_series"]
