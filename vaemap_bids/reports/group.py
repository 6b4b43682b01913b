"""The group level: ``OUTPUT_DIR/group_<model>.tsv`` and ``OUTPUT_DIR/group.html``.

It reads the participant outputs already in OUTPUT_DIR and never fits anything. One TSV per model,
one row per subject x session (x acq x run) x method x scalar parameter:

==========================  =====================================================================
column                      meaning
==========================  =====================================================================
subject, session            labels (``n/a`` when the dataset has no sessions)
acquisition, run            only when some series has them
model, method, param        what the row describes (``dir`` is a direction and has no median)
n_voxels                    finite voxels of the map inside the brain mask
median, iqr                 median and inter-quartile range of the map inside the mask
clusterK_n/_median/_iqr     the same inside vaegmm cluster K (K = 1..max over subjects) of the
                            same model; cluster numbers are per subject (label switching), so
                            compare clusters across subjects only after checking them
nrmse_mean                  mean voxelwise NRMSE of the fit (from the fit record)
n_invalid, n_at_bound       voxels outside the physical domain / at a bound (fit record)
fit_seconds, device, seed   the fit node's run time, device and seed
<package>_version           every version in the run's summary (``vaemap_version`` first)
==========================  =====================================================================

Missing values are ``n/a``.

``OUTPUT_DIR/group.tsv`` holds the same numbers for every model and method in one tidy
(long) table, one value per row, for pandas (``pd.read_csv(path, sep="\t")``; ``n/a`` reads as
NaN), R (``read.delim(path, na.strings = "n/a")``) or seaborn directly; ``group.json``
describes its columns (:data:`TIDY_COLUMNS`):

==========================  =====================================================================
column                      meaning
==========================  =====================================================================
subject .. space            the series' entities (``n/a`` where the series has none)
model, method               the fit
parameter                   a scalar parameter (msd, msk, stickfrac, ...); ``nrmse`` for the fit's
                            residual map; ``fit`` for numbers of the fit itself
region                      ``brain`` (the valid voxels of the brain mask) or ``cluster<K>``
                            (vaegmm cluster K of the same model and series)
statistic                   ``n_voxels``, ``median``, ``iqr`` of a parameter map in the region;
                            ``mean`` of ``nrmse``; ``seconds``, ``n_invalid``, ``n_at_bound`` of
                            ``fit``
value                       the number
units                       the parameter's units (``n/a`` for counts, NRMSE and seconds: s)
==========================  =====================================================================

Return codes (BIDS-Apps, ARCHITECTURE.md section 3): 0 when every
expected subject is complete, 66 (missing input) when any subject's outputs are missing or
incomplete, 18 when there is no subject at all.
"""
from __future__ import annotations

import base64
import csv
import io
import logging
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from markupsafe import Markup

from .. import __version__, naming
from ..config import ExitCode
from ..fitting.base import METHODS
from . import figures as F
from .collect import (Series, expected_prefixes, find_series, sort_methods,
                      subjects_in_bids, subjects_in_output)
from .metrics import OUTLIER_Z, finite, median_iqr, per_label_median_iqr, robust_z
from ..atomic import write_text_atomic as write_text
from .render import render
from .svg import strip_chart

log = logging.getLogger("vaemap.reports")

NA = "n/a"


def _series_key(s: Series) -> tuple:
    return (s.subject, s.session or "", str(s.entity_value("acquisition") or ""),
            str(s.entity_value("run") or ""))


def series_rows(s: Series) -> dict[str, list[dict]]:
    """{model: rows} of one series (scalar parameters of every method that has a fit record)."""
    out: dict[str, list[dict]] = {}
    mask = s.mask()
    if mask is None:
        return out
    versions = {str(k): str(v) for k, v in (s.summary.get("versions") or {}).items()}
    for model, methods in s.ran().items():
        dseg = s.dseg(model) if "vaegmm" in methods else None
        labels = np.where(mask, dseg, 0) if dseg is not None else None
        for method in methods:
            rec = s.fit_record(model, method)
            if rec is None:
                continue
            seconds, _ = s.fit_timing(model, method)
            nrmse_mean = rec.get("nrmse_mean")
            if nrmse_mean is None and (vol := s.nrmse(model, method)) is not None:
                v = finite(vol[mask])
                nrmse_mean = float(v.mean()) if v.size else None
            for spec in s.param_specs(model):
                if spec.is_direction:
                    continue
                vol = s.map(model, method, spec.label)
                if vol is None:
                    continue
                inside = vol[mask]
                med, iqr = median_iqr(inside)
                row = {"subject": s.subject, "session": s.session,
                       "acquisition": s.entity_value("acquisition"), "run": s.entity_value("run"),
                       "space": s.entity_value("space"),
                       "model": model, "method": method, "param": spec.label,
                       "n_voxels": int(np.isfinite(inside).sum()), "median": med, "iqr": iqr,
                       "clusters": {}, "nrmse_mean": nrmse_mean,
                       "n_invalid": rec.get("n_invalid"), "n_at_bound": rec.get("n_at_bound"),
                       "fit_seconds": seconds, "device": rec.get("device"),
                       "seed": rec.get("seed"), "versions": versions, "units": spec.units}
                if labels is not None:
                    row["clusters"] = per_label_median_iqr(vol, labels)
                out.setdefault(model, []).append(row)
            s.drop_images()  # one method's maps in memory at a time (whole-brain maps are large)
    s.drop_images()
    return out


def _cell(value) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return NA if not np.isfinite(value) else f"{value:.6g}"
    return str(value)


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """One model's group table (columns documented in the module docstring)."""
    entity_cols = [c for c in ("acquisition", "run") if any(r.get(c) not in (None, "") for r in rows)]
    k_max = max((max(r["clusters"]) for r in rows if r["clusters"]), default=0)
    version_keys = sorted({k for r in rows for k in r["versions"]}, key=lambda k: (k != "vaemap", k))
    header = (["subject", "session"] + entity_cols
              + ["model", "method", "param", "n_voxels", "median", "iqr"]
              + [f"cluster{k}_{x}" for k in range(1, k_max + 1) for x in ("n", "median", "iqr")]
              + ["nrmse_mean", "n_invalid", "n_at_bound", "fit_seconds", "device", "seed"]
              + [f"{k}_version" for k in version_keys])
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line = [r["subject"], r["session"]] + [r.get(c) for c in entity_cols]
        line += [r["model"], r["method"], r["param"], r["n_voxels"], r["median"], r["iqr"]]
        for k in range(1, k_max + 1):
            line += list(r["clusters"].get(k, (None, None, None)))
        line += [r["nrmse_mean"], r["n_invalid"], r["n_at_bound"], r["fit_seconds"], r["device"],
                 r["seed"]]
        line += [r["versions"].get(k) for k in version_keys]
        writer.writerow([_cell(x) for x in line])
    return write_text(path, buf.getvalue())


#: The columns of ``group.tsv`` and what they hold (also written as ``group.json``).
TIDY_COLUMNS = {
    "subject": "Participant label (without sub-).",
    "session": "Session label (without ses-); n/a when the series has none.",
    "acquisition": "acq- label of the series; n/a when it has none.",
    "run": "Run index of the series; n/a when it has none.",
    "space": "space- label of the series (e.g. ACPC for QSIPrep input); n/a when it has none.",
    "model": "Signal model (msdki, ballstick, ...).",
    "method": "Estimator (lsq, ssl, vaeunig, vaegmm, ...).",
    "parameter": ("Scalar parameter of the model; 'nrmse' for the fit's residual map; 'fit' for "
                  "numbers of the fit itself."),
    "region": ("'brain': the brain-mask voxels with an estimate; 'cluster<K>': those of vaegmm "
               "cluster K of the same model and series (numbered per series)."),
    "statistic": ("n_voxels, median or iqr of the parameter map in the region; mean of nrmse; "
                  "seconds, n_invalid or n_at_bound of fit."),
    "value": "The number (n/a when it could not be computed).",
    "units": "Units of the value: the parameter's for median and iqr, s for seconds, else n/a.",
}
TIDY_TABLE = "group.tsv"


def tidy_rows(rows: list[dict]) -> list[list]:
    """The long-format rows (:data:`TIDY_COLUMNS` order) of one model's group rows, in their
    order; one fit's 'nrmse' and 'fit' rows follow its first parameter's rows."""
    out, seen_fits = [], set()
    for r in rows:
        ident = [r["subject"], r["session"], r.get("acquisition"), r.get("run"), r.get("space"),
                 r["model"], r["method"]]
        units = r.get("units")
        regions = [("brain", (r["n_voxels"], r["median"], r["iqr"]))]
        regions += [(f"cluster{k}", r["clusters"][k]) for k in sorted(r["clusters"])]
        for region, (n, med, iqr) in regions:
            out += [ident + [r["param"], region, "n_voxels", n, None],
                    ident + [r["param"], region, "median", med, units],
                    ident + [r["param"], region, "iqr", iqr, units]]
        fit_key = tuple(str(x) for x in ident)
        if fit_key not in seen_fits:
            seen_fits.add(fit_key)
            out += [ident + ["nrmse", "brain", "mean", r["nrmse_mean"], None],
                    ident + ["fit", "brain", "seconds", r["fit_seconds"], "s"],
                    ident + ["fit", "brain", "n_invalid", r["n_invalid"], None],
                    ident + ["fit", "brain", "n_at_bound", r["n_at_bound"], None]]
    return out


def write_tidy_tsv(output_dir: Path, rows_by_model: dict[str, list[dict]]) -> Path:
    """``group.tsv`` (every model, sorted as the per-model tables) and its JSON sidecar
    describing the columns, each written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(list(TIDY_COLUMNS))
    for model in sorted(rows_by_model):
        for line in tidy_rows(rows_by_model[model]):
            writer.writerow([_cell(x) for x in line])
    from ..atomic import write_json_atomic
    write_json_atomic(Path(output_dir) / TIDY_TABLE.replace(".tsv", ".json"),
                      {col: {"Description": text} for col, text in TIDY_COLUMNS.items()})
    return write_text(Path(output_dir) / TIDY_TABLE, buf.getvalue())


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _model_block(model: str, rows: list[dict], output_dir: Path, tmp_dir: Path) -> dict:
    """Figure and outlier table of one model."""
    methods = sort_methods({r["method"] for r in rows})
    prank = {p.label: i for i, p in enumerate(Series.param_specs(model))}
    params = sorted(dict.fromkeys(r["param"] for r in rows), key=lambda p: (prank.get(p, 99), p))
    units = {r["param"]: r["units"] for r in rows}
    series = sorted({(r["subject"], r["session"] or "", str(r.get("acquisition") or ""),
                      str(r.get("run") or "")) for r in rows})
    cols = [(m, p) for p in params for m in methods if any(r["method"] == m and r["param"] == p for r in rows)]
    value = {(r["subject"], r["session"] or "", str(r.get("acquisition") or ""),
              str(r.get("run") or ""), r["method"], r["param"]): r["median"] for r in rows}
    z = {}
    values, labels, flagged = {}, {}, {}
    for m, p in cols:
        x = np.array([value.get(key + (m, p), np.nan) for key in series], dtype=np.float64)
        zz = robust_z(x)
        with np.errstate(invalid="ignore"):
            flags = np.abs(zz) > OUTLIER_Z
        for key, zi in zip(series, zz):
            z[key + (m, p)] = zi
        ok = np.isfinite(x)
        values[(p, m)] = x[ok]
        labels[(p, m)] = [_series_label(key) for key, o in zip(series, ok) if o]
        flagged[(p, m)] = flags[ok]
    fig_path = F.group_figure(tmp_dir / f"group_{model}.png", params, methods, values, labels,
                              flagged, units)
    charts = []
    for p in params:
        points = {}
        for m in methods:
            if (m, p) not in cols:
                continue
            pts = []
            for key in series:
                v = value.get(key + (m, p))
                if v is None or not np.isfinite(v):
                    continue
                zi = z.get(key + (m, p), np.nan)
                pts.append((_series_label(key), float(v), bool(abs(zi) > OUTLIER_Z), zi))
            points[m] = pts
        u = F.pretty_units(units.get(p))
        charts.append(Markup(strip_chart(f"{p}" + (f" ({u})" if u else ""), list(points), points,
                                         quantity=p)))
    table = []
    n_flags = 0
    for key in series:
        cells = []
        for m, p in cols:
            v = value.get(key + (m, p))
            zi = z.get(key + (m, p), np.nan)
            flag = bool(np.isfinite(v)) if v is not None else False
            flag = flag and abs(zi) > OUTLIER_Z
            n_flags += flag
            cells.append({"text": NA if v is None or not np.isfinite(v) else f"{v:.4g}",
                          "z": NA if not np.isfinite(zi) and not np.isinf(zi) else f"{zi:+.1f}",
                          "flag": flag})
        report = f"sub-{key[0]}.html"
        table.append({"label": _series_label(key), "subject": key[0],
                      "report": report if (output_dir / report).is_file() else None,
                      "cells": cells})
    return {"name": model, "figure": _png_data_uri(fig_path), "charts": charts,
            "columns": cols, "table": table,
            "n_flags": n_flags, "n_series": len(series), "methods": methods, "params": params,
            "tsv": f"group_{model}.tsv"}


def _series_label(key: tuple) -> str:
    sub, ses, acq, run = key
    return "_".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ([f"acq-{acq}"] if acq else [])
                    + ([f"run-{run}"] if run else []))


GROUP_TABLE_PATTERN = "group_*.tsv"
#: The tidy table and its column descriptions (the validator does not know them either).
GROUP_TIDY_FILES = ("group.tsv", "group.json")


def ensure_bidsignore(output_dir: Path) -> None:
    """Add the group tables to OUTPUT_DIR/.bidsignore (the validator does not know them)."""
    path = Path(output_dir) / ".bidsignore"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    present = {line.strip() for line in lines}
    missing = [p for p in (GROUP_TABLE_PATTERN, *GROUP_TIDY_FILES) if p not in present]
    if missing:
        if GROUP_TABLE_PATTERN not in present:
            lines.append("# vaemap group level tables")
        write_text(path, "\n".join(lines + missing) + "\n")


def run_group(output_dir, *, bids_dir=None, participant_labels=None) -> int:
    """Write the group tables and ``group.html`` from the participant outputs in ``output_dir``.

    Expected subjects: ``participant_labels`` when given, else the subjects of ``bids_dir`` that
    have a DWI series when given, else every subject with anything in ``output_dir``. Returns 0 when all of them are
    complete, 66 when any is missing or incomplete (they are listed in the report) and 18 when
    there is no subject at all.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        log.error("group level: output directory %s does not exist", output_dir)
        return ExitCode.NOINPUT
    if participant_labels:
        expected = sorted({naming.clean_label(x, 'sub') for x in participant_labels})
    elif bids_dir is not None:  # subjects without a DWI series have nothing to map
        expected = [sub for sub in subjects_in_bids(bids_dir) if expected_prefixes(bids_dir, sub)]
    else:
        expected = subjects_in_output(output_dir)
    problems: dict[str, list[str]] = {}
    rows_by_model: dict[str, list[dict]] = {}
    complete = []
    for subject in expected:
        series = find_series(output_dir, subject)
        if not series:
            problems[subject] = [f"no outputs (no sub-{subject}[/ses-*]/log/*_summary.json)"]
            continue
        issues = []
        if bids_dir is not None:
            have = {s.prefix for s in series}
            issues += [f"series {p}: no outputs" for p in expected_prefixes(bids_dir, subject)
                       if p not in have]
        for s in series:
            issues += [f"{s.prefix}: {p}" for p in s.problems()]
            try:
                for model, rows in series_rows(s).items():
                    rows_by_model.setdefault(model, []).extend(rows)
            except Exception as exc:  # a corrupt file of one subject must not stop the group
                log.exception("group level: reading %s failed", s.prefix)
                issues.append(f"{s.prefix}: could not be read ({type(exc).__name__}: {exc})")
        if issues:
            problems[subject] = issues
        else:
            complete.append(subject)
    for model, rows in sorted(rows_by_model.items()):
        rank = {m: i for i, m in enumerate(METHODS)}
        prank = {p.label: i for i, p in enumerate(Series.param_specs(model))}
        rows.sort(key=lambda r: (r["subject"], r["session"] or "", str(r.get("acquisition") or ""),
                                 str(r.get("run") or ""), rank.get(r["method"], len(rank)),
                                 r["method"], prank.get(r["param"], len(prank)), r["param"]))
        write_tsv(output_dir / f"group_{model}.tsv", rows)
    if rows_by_model:
        write_tidy_tsv(output_dir, rows_by_model)
        ensure_bidsignore(output_dir)
    with tempfile.TemporaryDirectory(prefix=".vaemap-group-", dir=output_dir) as tmp:
        blocks = [_model_block(model, rows, output_dir, Path(tmp))
                  for model, rows in sorted(rows_by_model.items())]
    from .qsm import group_qsm_html, group_qsm_rows, write_group_qsm_tsv
    qsm_rows = group_qsm_rows(output_dir)   # QSM (MEGRE) outputs: group_qsm.tsv, a table
    if qsm_rows:
        write_group_qsm_tsv(output_dir / "group_qsm.tsv", qsm_rows)
    reports = {s: f"sub-{s}.html" for s in expected if (output_dir / f"sub-{s}.html").is_file()}
    if not expected and not qsm_rows:
        code = ExitCode.NO_DATA
    elif problems:
        code = ExitCode.NOINPUT
    else:
        code = ExitCode.OK
    ctx = {"title": "vaemap group report", "expected": expected, "complete": complete,
           "problems": sorted(problems.items()), "models": blocks, "reports": reports,
           "outlier_z": OUTLIER_Z, "exit_code": code,
           "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "vaemap_version": __version__,
           "source": ("participant labels given" if participant_labels else
                      "subjects of the BIDS dataset" if bids_dir is not None else
                      "subjects found in the output directory")}
    page = render("group.html", ctx)
    if qsm_rows:
        page = page.replace("</main>", group_qsm_html(qsm_rows) + "\n</main>", 1)
    write_text(output_dir / "group.html", page)
    if problems:
        for subject, issues in sorted(problems.items()):
            log.error("group level: sub-%s is missing or incomplete: %s", subject, "; ".join(issues))
    if not expected:
        log.error("group level: no participant to summarise in %s", output_dir)
    return code
