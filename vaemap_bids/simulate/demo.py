"""The demo dataset of ``vaemap-demo`` (:mod:`vaemap_bids.cli.demo`) and its comparison with
the truth.

The demo dataset (``DEMO/bids``) holds two subjects:

- ``sub-phantom``: the synthetic brain of :mod:`vaemap_bids.simulate.phantom`, simulated with
  ball-stick on a two-shell table (6 b0 interleaved among 20 directions at b = 1000 and 2000
  s/mm^2), so that both MS-DKI and ball-stick run; its ground truth is in ``DEMO/truth``;
- ``sub-small101d``: dipy's bundled real crop ``small_101D`` (:mod:`vaemap_bids.simulate.dipy_small`),
  with its whole-crop brain mask given as a derivative (``DEMO/masks``, ``--derivatives``): the
  crop lies inside the brain, where median_otsu's brain-versus-air threshold does not apply.

The command runs ``vaemap DEMO/bids DEMO/out participant`` with every model and method, a work dir
``DEMO/work`` and a hyper-parameter file ``DEMO/demo_hyperparameters.yaml`` that REDUCES the
training epochs so that the demo finishes in minutes on a laptop CPU (the maps are therefore
rougher than a full run's). At the end it prints where the maps and reports are and, for the
phantom, the median error of every map against the truth.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .. import naming
from ..fitting.base import METHODS
from ..outputs.table import output

#: Epoch budget of the demo (full runs use vaemap_bids/data/hyperparameters.yaml).
DEMO_HYPERPARAMETERS = {
    "ssl": {"epochs": 30, "patience": 5},
    "vaeunig": {"epochs": 30, "patience": 5, "warmup_epochs": 3, "ramp_epochs": 6,
                "n_posterior_samples": 10},
    "vaegmm": {"epochs": 30, "patience": 5, "warmup_epochs": 3, "ramp_epochs": 6,
               "n_posterior_samples": 10},
}
DEMO_SUBJECTS = ("phantom", "small101d")
#: The phantom: small enough for a laptop (about 5,600 brain voxels of 7.1 mm), large enough to
#: look like a brain.
PHANTOM_SHAPE = (28, 34, 24)
PHANTOM_SNR = 30.0
PHANTOM_MODEL = "ballstick"
MARKER = ".vaemap-demo.json"
MODELS = ("msdki", "ballstick")


def build_demo_dataset(demo_dir, subjects=DEMO_SUBJECTS, *, seed: int = 0) -> dict:
    """Write ``demo_dir/bids`` (and ``demo_dir/truth`` for the phantom); returns their paths."""
    from .dipy_small import convert_small_101d
    from .phantom import write_phantom_dataset

    demo_dir = Path(demo_dir)
    unknown = set(subjects) - set(DEMO_SUBJECTS)
    if unknown or not subjects:
        raise ValueError(f"demo subjects are {', '.join(DEMO_SUBJECTS)}; got {sorted(subjects)}")
    bids, truth = demo_dir / "bids", demo_dir / "truth"
    built = {"bids_dir": bids, "truth_dir": truth, "subjects": list(subjects)}
    if "phantom" in subjects:
        built["phantom"] = write_phantom_dataset(
            bids, truth, subjects=("phantom",), model=PHANTOM_MODEL, shape=PHANTOM_SHAPE,
            snr=PHANTOM_SNR, seed=seed)
    if "small101d" in subjects:
        # The crop lies inside the brain: its whole-crop mask is given as a derivative.
        built["small101d"] = convert_small_101d(bids, subject="small101d",
                                                mask_dir=demo_dir / "masks")
    return built


def write_demo_config(path) -> Path:
    import yaml

    from ..atomic import write_text_atomic

    header = ("# vaemap demo: REDUCED epoch budget so that the demo runs in minutes on a CPU.\n"
              "# Full runs use the defaults in vaemap_bids/data/hyperparameters.yaml.\n")
    text = header + yaml.safe_dump(DEMO_HYPERPARAMETERS, sort_keys=True)
    path = Path(path)
    # An unchanged file is left alone: a new mtime would make Nipype rerun every fit on --keep.
    if path.is_file() and path.read_text() == text:
        return path
    return write_text_atomic(path, text)


def _load(path):
    import nibabel as nib

    return np.asanyarray(nib.load(path).dataobj, dtype=np.float64)


def compare_with_truth(out_dir, phantom: dict) -> list[dict]:
    """Median absolute error of every written phantom map against the truth, inside the
    phantom's brain mask. Directions: median angle (degrees, sign-free) where the true stick
    fraction is at least 0.4, since a direction means little where there is hardly a stick.
    MS-DKI is compared with the small-b cumulant limit of the ball-stick signal, a reference,
    not the exact truth (MS-DKI fitted at b = 1000/2000 differs from it by design)."""
    rows = []
    out_dir = Path(out_dir)
    for series in phantom["series"]:
        entities = series["entities"]
        mask = _load(series["mask"]) > 0
        truth = {("ballstick", p): path for p, path in series["truth"].items()}
        truth.update({("msdki", p): path for p, path in series.get("cumulant", {}).items()})
        stick = _load(series["truth"]["stickfrac"]) if "stickfrac" in series["truth"] else None
        for (model, param), truth_path in truth.items():
            ref = _load(truth_path)
            for method in METHODS:
                est_path = out_dir / output("param", entities, model=model, method=method,
                                            param=param).path
                if not est_path.exists():
                    continue
                est = _load(est_path)
                if param == "dir":
                    sel = mask & (stick >= 0.4) if stick is not None else mask
                    cos = np.abs(np.sum(est[sel] * ref[sel], axis=-1))
                    cos /= np.maximum(np.linalg.norm(est[sel], axis=-1), 1e-12)
                    ok = np.isfinite(cos)
                    err = float(np.degrees(np.median(np.arccos(np.clip(cos[ok], 0, 1)))))
                    unit = "deg"
                else:
                    ok = mask & np.isfinite(est)
                    err = float(np.median(np.abs(est[ok] - ref[ok])))
                    sel = ok
                    unit = "um^2/ms" if param in ("msd", "dpar", "diso") else ""
                rows.append({"model": model, "method": method, "param": param,
                             "median_abs_error": err, "unit": unit,
                             "reference": "cumulant" if model == "msdki" else "truth",
                             "median_truth": float(np.median(np.abs(ref[mask]))) if param != "dir"
                             else None, "n_voxels": int(np.count_nonzero(sel))})
    return rows


def format_rows(rows: list[dict]) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [f"  {'model':<10}{'param':<10}" + "".join(f"{m:>10}" for m in methods)
             + "   (median |estimate - truth|)"]
    keys = sorted({(r["model"], r["param"]) for r in rows}, key=lambda k: (k[0] != "ballstick", k))
    for model, param in keys:
        vals = {r["method"]: r for r in rows if r["model"] == model and r["param"] == param}
        any_row = next(iter(vals.values()))
        cells = "".join(f"{vals[m]['median_abs_error']:>10.3f}" if m in vals else f"{'-':>10}"
                        for m in methods)
        note = any_row["unit"]
        if any_row["median_truth"] is not None:
            note += f" (truth median {any_row['median_truth']:.2f})"
        if any_row["reference"] == "cumulant":
            note += ", vs the small-b cumulant limit"
        lines.append(f"  {model:<10}{param:<10}{cells}   {note.strip()}")
    return "\n".join(lines)


def prepare_folder(demo_dir: Path, keep: bool) -> None:
    marker = demo_dir / MARKER
    if demo_dir.exists() and any(demo_dir.iterdir()) and not marker.exists():
        raise ValueError(f"{demo_dir} exists and is not a vaemap demo folder; choose another "
                         "--out-dir or empty it")
    if not keep:
        for sub in ("bids", "truth", "masks", "out", "work"):
            shutil.rmtree(demo_dir / sub, ignore_errors=True)
    demo_dir.mkdir(parents=True, exist_ok=True)


def phantom_record(bids: Path, truth: Path) -> dict:
    """The series of an existing demo phantom, from its truth.json."""
    record = json.loads((truth / "truth.json").read_text())
    series = []
    for s in record["series"]:
        folder = truth / naming.subject_dir(s["entities"]) / "dwi"
        entry = {"entities": s["entities"], "mask": folder / s["mask"],
                 "truth": {p: folder / name for p, name in s["truth"].items()}}
        if record["model"] == "ballstick":
            entry["cumulant"] = {p: folder / output("param", s["entities"], model="msdki",
                                                    method="cumulant", param=p).name
                                 for p in ("msd", "msk")}
        series.append(entry)
    return {"series": series}

