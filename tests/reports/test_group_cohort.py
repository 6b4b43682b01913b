"""The group level on a cohort: 50 subjects' outputs written to the derivatives table's contract
(no fits), every point labelled in the page, one tidy TSV across models and methods."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from vaemap_bids import naming
from vaemap_bids.config import ExitCode
from vaemap_bids.outputs.table import fit_outputs, output
from vaemap_bids.reports.group import TIDY_COLUMNS, TIDY_TABLE, run_group

N_SUBJECTS = 50
SHAPE = (6, 7, 5)
METHODS = ("lsq", "vaegmm")
OUTLIER = "050"
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _save(path: Path, data, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), AFFINE), str(path))


def write_subject(out: Path, subject: str, rng: np.random.Generator) -> dict:
    """Every required file of one MS-DKI series (lsq and vaegmm), as the participant level
    writes them; returns the msd maps written, by method."""
    ent = {"subject": subject, "session": "a"}
    mask = np.zeros(SHAPE, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    tissue = np.where(mask, 1 + (np.indices(SHAPE)[0] % 3), 0)
    _save(out / output("mask", ent).path, mask, np.uint8)
    _save(out / output("valid_mask", ent).path, mask, np.uint8)
    shift = 0.9 if subject == OUTLIER else 0.0
    # a cohort's spread between subjects (evenly spaced, so no regular subject lies beyond
    # |robust z| = 3; the within-map noise alone would put one there by chance now and then)
    spread = 0.1 * (int(subject) / N_SUBJECTS - 0.5)
    written = {}
    for method in METHODS:
        truth = {"msd": 0.8 + 0.2 * tissue + shift + spread, "msk": 1.0 - 0.1 * tissue + spread}
        for o in fit_outputs(ent, "msdki", method):
            path = out / o.path
            param = o.entities.get("param")
            if o.kind == "param":
                data = np.where(mask, truth[param] + rng.normal(0, 0.05, SHAPE), 0)
                written.setdefault(method, {})[param] = data
                _save(path, data)
            elif o.kind in ("std", "nrmse"):
                # their own generator: which methods write std maps must not change the
                # parameter maps' draws (and so which subjects sit beyond |z| = 3 by chance)
                aux = np.random.default_rng([int(subject), len(path.name)])
                _save(path, np.where(mask, np.abs(aux.normal(0.03, 0.01, SHAPE)), 0))
            elif o.kind == "dseg":
                _save(path, tissue, np.int16)
            elif o.kind == "probseg":
                _save(path, np.stack([tissue == k for k in (1, 2, 3)], -1), np.float32)
            elif o.kind == "dseg_tsv":
                path.write_text("index\tname\n1\tcomponent1\n2\tcomponent2\n3\tcomponent3\n")
            elif o.kind == "fit_record":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({
                    "model": "msdki", "method": method, "device": "cpu", "seed": 0,
                    "timings": {"fit_seconds": 1.5}, "n_voxels": int(mask.sum()),
                    "n_invalid": 0, "n_at_bound": 2, "nrmse_mean": 0.03}))
            elif o.kind == "latent":
                continue  # not required by the group level
            else:
                raise AssertionError(f"unexpected output kind {o.kind}")
    summary = {"subject": subject, "session": "a", "entities": ent, "prefix": naming.prefix(ent),
               "acquisition": {"n_volumes": 46, "shells": []}, "mask": {"n_voxels": int(mask.sum())},
               "models": {"msdki": {"status": "ran", "reason": None, "methods": list(METHODS)}},
               "versions": {"vaemap": "0.1.0"}}
    (out / output("summary", ent).path).write_text(json.dumps(summary))
    return written


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort") / "out"
    rng = np.random.default_rng(0)
    maps = {f"{i:03d}": write_subject(out, f"{i:03d}", rng) for i in range(1, N_SUBJECTS + 1)}
    start = time.perf_counter()
    code = run_group(out)
    return {"out": out, "maps": maps, "code": code, "seconds": time.perf_counter() - start}


def test_tidy_table_reads_in_pandas_with_every_row(cohort):
    assert cohort["code"] == ExitCode.OK
    assert cohort["seconds"] < 120, cohort["seconds"]
    df = pd.read_csv(cohort["out"] / TIDY_TABLE, sep="\t", dtype={"subject": str})
    assert list(df.columns) == list(TIDY_COLUMNS)
    # per subject: 2 methods x 2 parameters x (brain + 3 clusters) x 3 statistics, then
    # 2 fits x (nrmse mean + 3 fit numbers)
    assert len(df) == N_SUBJECTS * (2 * 2 * 4 * 3 + 2 * 4)
    assert df["value"].dtype.kind == "f" and df["value"].notna().all()
    assert df[["acquisition", "run", "space"]].isna().all().all()  # n/a -> NaN
    assert set(df["region"]) == {"brain", "cluster1", "cluster2", "cluster3"}
    assert set(df["statistic"]) == {"n_voxels", "median", "iqr", "mean", "seconds",
                                    "n_invalid", "n_at_bound"}
    med = df.query("parameter == 'msd' and region == 'brain' and statistic == 'median'")
    wide = med.pivot(index="subject", columns="method", values="value")
    assert wide.shape == (N_SUBJECTS, 2)
    mask = np.zeros(SHAPE, bool)
    mask[1:-1, 1:-1, 1:-1] = True
    for subject in ("001", "027", OUTLIER):
        assert wide.loc[subject, "lsq"] == pytest.approx(
            np.median(cohort["maps"][subject]["lsq"]["msd"][mask]), rel=1e-5)
    n = df.query("parameter == 'msd' and region == 'cluster2' and statistic == 'n_voxels'")
    assert (n["value"] == (np.indices(SHAPE)[0][mask] % 3 == 1).sum()).all()
    assert (df.query("parameter == 'fit' and statistic == 'seconds'")["units"] == "s").all()
    side = json.loads((cohort["out"] / TIDY_TABLE.replace(".tsv", ".json")).read_text())
    assert list(side) == list(TIDY_COLUMNS)
    ignored = (cohort["out"] / ".bidsignore").read_text().splitlines()
    assert {"group_*.tsv", "group.tsv", "group.json"} <= set(ignored)


def test_every_point_is_labelled_in_the_page(cohort):
    text = (cohort["out"] / "group.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    titles = re.findall(r"<title>(sub-\d+_ses-a) · (\w+) · (ms[dk]) = ([-\d.e+]+)", text)
    # msd and msk charts, each with 50 subjects x 2 methods
    assert len(titles) == 2 * N_SUBJECTS * 2
    assert {t[0] for t in titles} == {f"sub-{i:03d}_ses-a" for i in range(1, N_SUBJECTS + 1)}
    outlier = re.findall(rf'class="out-label">(sub-{OUTLIER}_ses-a)<', text)
    assert outlier and set(outlier) == {f"sub-{OUTLIER}_ses-a"}
    flagged = re.findall(r"<title>(sub-\d+)_ses-a · (\w+) · msd = [^<]* · outlier</title>", text)
    assert sorted(flagged) == [(f"sub-{OUTLIER}", m) for m in METHODS]  # only it, both methods
