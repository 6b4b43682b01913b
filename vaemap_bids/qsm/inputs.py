"""BIDS MEGRE input for QSM: finding the series and checking them up front.

A series is every ``sub-<L>[_ses-<S>][_acq-<A>][_run-<R>]_echo-<N>_part-{mag,phase}_MEGRE.nii[.gz]``
of one ``anat/`` folder that shares the other entities. Before any graph is built,
:func:`plan_qsm_series` checks it: every echo has a magnitude and a phase image (a missing one is
a missing input, exit 66), all are 3-D with one shape and one affine, every sidecar has
``EchoTime`` (s) and ``MagneticFieldStrength`` (T), echo times increase, data are finite (bad
data, exit 65); a single echo is allowed with a warning (no receiver-phase removal). The phase
units are detected per image (radians, or scanner integers rescaled onto [-pi, pi): see
:func:`vaemap_bids.qsm.field.phase_scale`) and recorded in the plan.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import naming

log = logging.getLogger("vaemap.qsm")

_MEGRE = re.compile(r"^(?P<stem>sub-[A-Za-z0-9]+(?:_ses-[A-Za-z0-9]+)?(?:_acq-[A-Za-z0-9]+)?"
                    r"(?:_run-[0-9]+)?)_echo-(?P<echo>[0-9]+)_part-(?P<part>mag|phase)"
                    r"_MEGRE\.nii(?:\.gz)?$")


@dataclass
class QsmSeries:
    """One MEGRE series: magnitude and phase files per echo (echo 1 first) and sidecars."""

    entities: dict
    magnitude: list[str]
    phase: list[str]
    sidecars: list[str]

    @property
    def prefix(self) -> str:
        return naming.prefix(self.entities)

    @property
    def dwi(self) -> str:   # the file that messages name (the DWI plans' attribute)
        return self.phase[0] if self.phase else self.magnitude[0]


@dataclass
class QsmDecision:
    runs: bool
    reason: str | None
    n_measurements: int


@dataclass
class QsmPlan:
    """Everything checked about one MEGRE series before the graph is built."""

    series: QsmSeries
    shape: tuple
    voxel_size_mm: tuple
    echo_times_s: list[float]
    b0_tesla: float
    phase_units: list[str]
    mask_file: str | None
    models: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def models_to_run(self) -> list[str]:
        return ["qsm"]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["prefix"] = self.series.prefix
        return out


def _entities(stem: str) -> dict:
    keys = dict(p.split("-", 1) for p in stem.split("_"))
    out = {"subject": keys["sub"]}
    for key, entity in (("ses", "session"), ("acq", "acquisition"), ("run", "run")):
        if key in keys:
            out[entity] = keys[key]
    return out


def collect_megre_series(bids_dir, participant_labels=None, session_labels=None) -> list[QsmSeries]:
    """Every MEGRE series of the selected participants and sessions (possibly none)."""
    root = Path(bids_dir)
    groups: dict[tuple, dict] = {}
    for sub_dir in sorted(root.glob("sub-*")):
        label = sub_dir.name[4:]
        if participant_labels and label not in participant_labels:
            continue
        for path in sorted(sub_dir.glob("**/anat/*_MEGRE.nii*")):
            match = _MEGRE.match(path.name)
            if not match:
                log.warning("%s: not a BIDS MEGRE name (sub-, ses-, acq-, run-, echo-, part-"
                            "mag|phase): ignored", path)
                continue
            ents = _entities(match["stem"])
            if session_labels and ents.get("session") not in session_labels:
                continue
            key = (str(path.parent), match["stem"])
            g = groups.setdefault(key, {"entities": ents, "files": {}})
            g["files"][(int(match["echo"]), match["part"])] = str(path)
    series = []
    for (_, _), g in sorted(groups.items()):
        echoes = sorted({e for e, _ in g["files"]})
        mag = [g["files"].get((e, "mag"), "") for e in echoes]
        pha = [g["files"].get((e, "phase"), "") for e in echoes]
        side = [re.sub(r"\.nii(\.gz)?$", ".json", p or m) for p, m in zip(pha, mag)]
        s = QsmSeries(g["entities"], mag, pha, side)
        s.echoes = echoes  # type: ignore[attr-defined]
        series.append(s)
    return series


def _read_sidecar(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None


def plan_qsm_series(series: QsmSeries, derivative_dirs=()) -> QsmPlan:
    """Check one MEGRE series end to end (see the module docstring). Raises FileNotFoundError
    (missing input) or ValueError (bad data), naming the file."""
    import nibabel as nib
    from ..dataset.bids import find_derivative_mask
    from .field import phase_scale

    echoes = getattr(series, "echoes", list(range(1, len(series.phase) + 1)))
    where = series.phase[0] or series.magnitude[0]
    expected = list(range(1, len(echoes) + 1))
    if echoes != expected:
        missing = sorted(set(range(1, max(echoes) + 1)) - set(echoes))
        raise FileNotFoundError(f"{where}: echo(es) {', '.join(map(str, missing))} of "
                                f"{series.prefix} are missing (echoes found: "
                                f"{', '.join(map(str, echoes))})")
    for n, (m, p) in enumerate(zip(series.magnitude, series.phase), start=1):
        if not m or not p:
            have = p or m
            part = "mag" if not m else "phase"
            raise FileNotFoundError(f"{have}: echo {n} has no part-{part} image")
    shape, affine, zooms = None, None, None
    units, tes, b0s = [], [], []
    for n, (m, p, side) in enumerate(zip(series.magnitude, series.phase, series.sidecars), 1):
        meta = {**_read_sidecar(re.sub(r"\.nii(\.gz)?$", ".json", m)), **_read_sidecar(side)}
        te = meta.get("EchoTime")
        if not isinstance(te, (int, float)) or isinstance(te, bool) or not np.isfinite(te) \
                or te <= 0:
            raise ValueError(f"{side}: EchoTime (s) is missing or not a positive number "
                             f"(echo {n})")
        if te > 1.0:
            raise ValueError(f"{side}: EchoTime {te} is not in seconds (BIDS: s, e.g. 0.004)")
        tes.append(float(te))
        b0 = meta.get("MagneticFieldStrength")
        if not isinstance(b0, (int, float)) or isinstance(b0, bool) or not b0 > 0:
            raise ValueError(f"{side}: MagneticFieldStrength (T) is missing or not positive")
        b0s.append(float(b0))
        for path in (m, p):
            try:
                img = nib.load(path)
            except Exception as exc:  # nibabel raises several kinds
                raise ValueError(f"{path}: not a readable NIfTI image ({exc})") from None
            if len(img.shape) != 3:
                raise ValueError(f"{path}: expected a 3-D image (one echo), not shape "
                                 f"{img.shape}")
            if shape is None:
                shape, affine = tuple(img.shape), img.affine
                zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
            elif tuple(img.shape) != shape:
                raise ValueError(f"{path}: shape {tuple(img.shape)} does not match the "
                                 f"magnitude/phase shape {shape} of {series.magnitude[0]}")
            elif not np.allclose(img.affine, affine, atol=1e-3):
                raise ValueError(f"{path}: its affine differs from {series.magnitude[0]}'s")
            data = np.asanyarray(img.dataobj)
            if not np.isfinite(data).all():
                raise ValueError(f"{path}: has {int((~np.isfinite(data)).sum())} NaN/Inf "
                                 "values")
            if path == p:
                try:
                    units.append(phase_scale(data)[2])
                except ValueError as exc:
                    raise ValueError(f"{path}: {exc}") from None
            elif data.min() < 0:
                raise ValueError(f"{path}: a magnitude image has negative values (is it a "
                                 "phase image?)")
    if any(b != b0s[0] for b in b0s):
        raise ValueError(f"{where}: MagneticFieldStrength differs between echoes")
    if any(b <= a for a, b in zip(tes, tes[1:])):
        raise ValueError(f"{where}: echo times {tes} do not increase with the echo number")
    warnings = []
    if len(tes) == 1:
        warnings.append("a single echo: the receiver phase cannot be separated from the field "
                        "(it is taken as 0) and the noise level is estimated from the background")
        log.warning("%s: %s", series.prefix, warnings[-1])
    if "integer" in units:
        log.info("%s: phase in scanner integer units, rescaled to radians", series.prefix)
    mask = find_derivative_mask(derivative_dirs, series.entities)
    return QsmPlan(series, shape, zooms, tes, b0s[0], units, mask,
                   {"qsm": QsmDecision(True, None, len(tes))}, warnings)


__all__ = ["QsmSeries", "QsmPlan", "collect_megre_series", "plan_qsm_series"]
