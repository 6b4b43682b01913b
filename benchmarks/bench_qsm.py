"""QSM benchmark on vaemap's own phantom (vaemap_bids/qsm/phantom.py): TKD, TV and DIP on the
local field the pipeline estimates (mask from the magnitude, multi-echo fit, background
removal), and TKD and TV on the true local field; RMSE, NRMSE, HFEN, SSIM, the slope against the
truth, the per-nucleus mean error (both sides pooled) and the run time of every method; plus an
oblique acquisition (the same chi, B0 tilted in the voxel axes) with TKD and TV.

Metrics are computed inside the pipeline's final mask (intersected with the phantom's brain),
with the truth and every map referenced to their mean over that mask.

    nice -n 15 python benchmarks/bench_qsm.py --shape 40 44 36 --voxel-mm 3.6 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vaemap_bids.qsm import metrics as M  # noqa: E402
from vaemap_bids.qsm.inversion import reference  # noqa: E402
from vaemap_bids.qsm.options import qsm_options  # noqa: E402
from vaemap_bids.qsm.phantom import NUCLEI, make_qsm_phantom  # noqa: E402
from vaemap_bids.qsm.pipeline import brain_mask, invert, local_field  # noqa: E402


def nucleus_errors(chi, truth, labels, ev):
    out = {}
    for name, *_ in NUCLEI:
        region = (labels[f"{name}L"] | labels[f"{name}R"]) & ev
        if region.any():
            out[name] = float(chi[region].mean() - truth[region].mean())
    for name in ("veins", "calcification"):
        region = labels[name] & ev
        if region.any():
            out[name] = float(chi[region].mean() - truth[region].mean())
    return out


def score(chi, truth, ev, labels):
    c, t = reference(chi, ev), reference(truth, ev)
    return {**M.all_metrics(c, t, ev), "nucleus_error_ppm": nucleus_errors(c, t, labels, ev)}


def run_case(args, opts, oblique_deg, methods, on_truth, device):
    p = make_qsm_phantom(shape=tuple(args.shape), voxel_mm=args.voxel_mm, snr=args.snr,
                         seed=args.seed, oblique_deg=oblique_deg)
    mask, _ = brain_mask(p.magnitude, erode=opts["qsm"]["mask_erode"])
    t0 = time.perf_counter()
    lf = local_field(p.magnitude, p.phase, p.echo_times_s, p.b0_tesla, p.affine, mask, opts)
    field_s = time.perf_counter() - t0
    ev = lf["mask"] & p.brain_mask
    rows = {}
    for method in methods:
        progress = None
        if method == "dip" and args.verbose:
            progress = lambda it, tl, hl: print(f"  dip {it}: train {tl:.3g} held-out {hl:.3g}",  # noqa: E731
                                                file=sys.stderr, flush=True)
        chi, rec = invert(method, lf["local"], lf["mask"], p.affine, lf["sigma"], opts,
                          seed=args.seed, device=device, progress=progress)
        row = {**score(chi, p.chi_local, ev, p.labels), "seconds": rec["seconds"]}
        if method == "dip":
            row.update(best_iteration=rec["best_iteration"], stopped_by=rec["stopped_by"],
                       iterations_run=rec["iterations_run"])
        rows[method] = row
        print(f"oblique {oblique_deg:g}: {method} on the estimated field: NRMSE "
              f"{row['nrmse']:.3f} slope {row['slope']:.3f} ({row['seconds']:.1f} s)",
              file=sys.stderr, flush=True)
    truth_rows = {}
    true_local = np.where(ev, p.local_field, 0.0)
    for method in on_truth:
        chi, rec = invert(method, true_local, ev, p.affine, None, opts, seed=args.seed,
                          device=device)
        truth_rows[method] = {**score(chi, p.chi_local, ev, p.labels), "seconds": rec["seconds"]}
    return {"oblique_deg": oblique_deg, "field_seconds": field_s, "n_eval_voxels": int(ev.sum()),
            "n_brain_voxels": int(p.brain_mask.sum()), "estimated_field": rows,
            "true_field": truth_rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(40, 44, 36))
    ap.add_argument("--voxel-mm", type=float, default=3.6)
    ap.add_argument("--snr", type=float, default=100.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=["tkd", "tv", "dip"])
    ap.add_argument("--oblique-deg", type=float, default=20.0)
    ap.add_argument("--dip-max-iter", type=int, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    import torch
    from vaemap_bids.fitting.base import resolve_device
    torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    over = {}
    if args.dip_max_iter:
        over["dip"] = {"max_iter": args.dip_max_iter}
    opts = qsm_options(over)
    t0 = time.perf_counter()
    axial = run_case(args, opts, 0.0, args.methods, ["tkd", "tv"], device)
    oblique = run_case(args, opts, args.oblique_deg, [m for m in args.methods if m != "dip"],
                       [], device) if args.oblique_deg else None
    try:
        import qsm_forward  # noqa: F401
        qf = "installed (not used by this script)"
    except ImportError:
        qf = "not installed: no cross-check against qsm-forward in this run"
    report = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                       if k != "json"} | {"json": str(args.json)},
              "options": opts, "device": device, "axial": axial, "oblique": oblique,
              "qsm_forward": qf, "total_seconds": time.perf_counter() - t0,
              "machine": {"nproc": os.cpu_count(), "load_avg": os.getloadavg(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "numpy": np.__version__}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({m: {k: round(v, 4) for k, v in r.items() if isinstance(v, float)}
                      for m, r in axial["estimated_field"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
