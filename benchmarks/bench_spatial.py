"""Spatial sharing against denoise-then-fit, on the structured phantom (issue 10).

For each model (MS-DKI, ball-stick) and SNR, one series of :mod:`vaemap_bids.simulate.spatial`
(the analytic folded brain by default; ``--layout mni`` for the other anatomy) is fitted with

- ``lsq``: voxelwise least squares on the input;
- ``mppca+lsq``, ``patch2self+lsq``: least squares after dipy's MP-PCA or Patch2Self
  (:mod:`vaemap_bids.dataset.denoise`, as ``vaemap --denoise`` runs them);
- ``vaegmm``: the voxelwise mixture VAE;
- ``svae``: the spatial VAE (:mod:`vaemap_bids.fitting.spatial`).

Every method reads the same noisy series, normalised by each voxel's own noisy mean b0 (as
``PrepareSeries`` does). Metrics per parameter, tissue (the dominant tissue of the voxel) and
region (interior / edge, :data:`vaemap_bids.simulate.spatial.REGION_LABELS`): RMSE, bias, the
coverage of mean +- 1.96 std where the method gives a std, and the fit's wall time (denoising
included for the denoise peers). Ratios to lsq and to the best denoise peer are computed for
the issue's targets. Writes one JSON and a Markdown table.

    nice -n 15 python benchmarks/bench_spatial.py --shape 32 36 28 --snr 10 20 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vaemap_bids.dataset.denoise import denoise
from vaemap_bids.fitting import fit
from vaemap_bids.physics import get_model_class, make_model, normalise_by_b0
from vaemap_bids.simulate.phantom import TISSUE_LABELS
from vaemap_bids.simulate.spatial import REGION_LABELS, simulate_spatial
from _nodes import machine  # the script's folder is on sys.path

METHODS = ("lsq", "mppca+lsq", "patch2self+lsq", "vaegmm", "svae")
TARGET_PARAMS = {"msdki": ("msd",), "ballstick": ("stickfrac", "dpar")}


def run_method(method: str, phantom, model, device: str, seed: int, epochs: int | None) -> dict:
    """Fit one method; returns params, std (or None) and wall seconds."""
    mask = phantom.mask
    t0 = time.perf_counter()
    series = phantom.signal
    base = method.split("+")[0] if "+" in method else "none"
    if base != "none":
        series, _ = denoise(phantom.signal, phantom.acquisition.bvals * 1e3, mask, base)
    y, s0, valid = normalise_by_b0(series[mask], phantom.acquisition)
    y[~valid] = np.nan
    name = "lsq" if "+" in method else method
    options = {"epochs": epochs} if epochs is not None and name != "lsq" else None
    result = fit(model, y, name, device=device, seed=seed, options=options, progress=False,
                 voxel_coords=phantom.voxel_coords(), s0=s0)
    return {"params": result.params, "std": result.std, "seconds": time.perf_counter() - t0,
            "hyperparameters": {k: v for k, v in result.hyperparameters.items()
                                if k in ("epochs_run", "best_epoch", "sigma_used",
                                         "borrow_weight", "batch_size_used")}}


def metrics(phantom, est: np.ndarray, std: np.ndarray | None) -> dict:
    """{param: {tissue: {region: {rmse, bias, n, coverage}}}} over scalar parameters."""
    cls = get_model_class(phantom.model)
    truth = phantom.params()
    labels = phantom.labels[phantom.mask]
    region = phantom.region[phantom.mask]
    out = {}
    for p, sl in zip(cls.parameters, cls.param_slices().values()):
        if p.is_direction:
            continue
        e, t = est[:, sl.start], truth[:, sl.start]
        s = None if std is None else std[:, sl.start]
        out[p.label] = {}
        for tissue, lab in TISSUE_LABELS.items():
            out[p.label][tissue] = {}
            for rname in ("interior", "edge", "all"):
                sel = labels == lab
                if rname != "all":
                    sel &= region == REGION_LABELS[rname]
                sel &= np.isfinite(e)
                if not sel.any():
                    continue
                d = e[sel] - t[sel]
                row = {"n": int(sel.sum()), "rmse": float(np.sqrt(np.mean(d ** 2))),
                       "bias": float(np.mean(d))}
                if s is not None:
                    row["coverage"] = float(np.mean(np.abs(d) <= 1.96 * s[sel]))
                out[p.label][tissue][rname] = row
    return out


def run_case(model_name: str, snr: float, *, shape, layout: str, seed: int, methods, device: str,
             epochs: int | None) -> dict:
    phantom = simulate_spatial(model_name, shape, layout=layout, snr=snr, seed=seed)
    model = make_model(model_name, phantom.acquisition)
    case = {"model": model_name, "snr": snr, "n_voxels": int(phantom.mask.sum()),
            "n_edge": int((phantom.region == REGION_LABELS["edge"]).sum()), "methods": {}}
    for method in methods:
        fitted = run_method(method, phantom, model, device, seed, epochs)
        case["methods"][method] = {"seconds": fitted["seconds"],
                                   "hyperparameters": fitted["hyperparameters"],
                                   "metrics": metrics(phantom, fitted["params"], fitted["std"])}
        print(f"  {model_name} SNR {snr:g} {method}: {fitted['seconds']:.1f} s", flush=True)
    case["targets"] = targets(case)
    return case


def _rmse(case, method, param, tissue, region):
    row = case["methods"].get(method, {}).get("metrics", {}).get(param, {}).get(tissue, {})
    return row.get(region, {}).get("rmse")


def targets(case: dict) -> dict:
    """The issue's targets for svae, where the methods they compare with ran."""
    if "svae" not in case["methods"]:
        return {}
    out = {}
    denoisers = [m for m in ("mppca+lsq", "patch2self+lsq") if m in case["methods"]]
    for param in TARGET_PARAMS[case["model"]]:
        for tissue in ("WM", "GM"):
            sv = _rmse(case, "svae", param, tissue, "all")
            row = {}
            lsq = _rmse(case, "lsq", param, tissue, "all")
            if lsq:
                row["svae/lsq"] = sv / lsq
            if denoisers:
                best = min(_rmse(case, m, param, tissue, "all") for m in denoisers)
                row["svae/best_denoise"] = sv / best
            edge_sv, edge_lsq = (_rmse(case, m, param, tissue, "edge") for m in ("svae", "lsq"))
            if edge_sv and edge_lsq:
                row["edge svae/lsq"] = edge_sv / edge_lsq
            cov = case["methods"]["svae"]["metrics"][param][tissue]["all"].get("coverage")
            row["svae coverage"] = cov
            out[f"{param} {tissue}"] = row
    if "vaegmm" in case["methods"]:
        out["time svae/vaegmm"] = (case["methods"]["svae"]["seconds"]
                                   / case["methods"]["vaegmm"]["seconds"])
    return out


def markdown(results: dict) -> str:
    lines = []
    for case in results["cases"]:
        lines.append(f"\n#### {case['model']}, SNR {case['snr']:g} ({case['n_voxels']} brain "
                     f"voxels, {case['n_edge']} edge)\n")
        params = [p for p in next(iter(case["methods"].values()))["metrics"]]
        head = "| method | time s | " + " | ".join(
            f"{p} {t} int / edge" for p in params for t in ("WM", "GM", "CSF")) + " |"
        lines += [head, "|" + "---|" * (2 + 3 * len(params))]
        for method, res in case["methods"].items():
            cells = []
            for p in params:
                for t in ("WM", "GM", "CSF"):
                    m = res["metrics"][p].get(t, {})
                    fmt = lambda r: f"{r['rmse']:.3f}" if r else "-"  # noqa: E731
                    cells.append(f"{fmt(m.get('interior'))} / {fmt(m.get('edge'))}")
            lines.append(f"| {method} | {res['seconds']:.1f} | " + " | ".join(cells) + " |")
        if case["targets"]:
            lines.append("")
            lines.append("| svae target | " + " | ".join(
                k for k in next(v for v in case["targets"].values() if isinstance(v, dict))) + " |")
            lines.append("|---|---|---|---|---|")
            for key, row in case["targets"].items():
                if isinstance(row, dict):
                    lines.append(f"| {key} | " + " | ".join(
                        "-" if v is None else f"{v:.3f}" for v in row.values()) + " |")
            if "time svae/vaegmm" in case["targets"]:
                lines.append(f"\nfit time svae / vaegmm: {case['targets']['time svae/vaegmm']:.2f}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["msdki", "ballstick"],
                   choices=["msdki", "ballstick"])
    p.add_argument("--snr", type=float, nargs="+", default=[10.0, 20.0, 50.0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 36, 28])
    p.add_argument("--layout", default="brain", choices=["brain", "mni", "slab"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None,
                   help="cap the networks' epochs (default: their packaged defaults)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/out/bench_spatial.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
               "machine": machine(), "shape": args.shape, "layout": args.layout,
               "seed": args.seed, "epochs": args.epochs, "cases": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for model_name in args.models:
        for snr in args.snr:
            results["cases"].append(run_case(model_name, snr, shape=tuple(args.shape),
                                             layout=args.layout, seed=args.seed,
                                             methods=args.methods, device=args.device,
                                             epochs=args.epochs))
            out.write_text(json.dumps(results, indent=2))
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["wall_seconds"] = time.perf_counter() - t0
    out.write_text(json.dumps(results, indent=2))
    md = markdown(results)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
