"""Our batched torch LSQ against its peers, side by side in one run on the same data.

(a) MS-DKI: vaemap lsq vs dipy's MeanDiffusionKurtosisModel on the paper's three clusters
    (vaemap_bids.simulate.clusters, HCP table restricted to b <= 2 ms/um^2).
(b) Ball-stick: vaemap lsq vs classic dmipy G1Ball + C1Stick (brute2fine, serial) on the full HCP
    table, plausible tissue truths with uniformly random fibre directions.

Both at Rician SNR 20 (and 50 by default), signals renormalised by their own noisy mean b0.
Throughput is voxels per second of the whole fit call (data in, parameters out); the peers are
serial, and by default ours runs on one CPU thread too (``--threads``), so the ratio compares
single cores. Prints a table and writes every number to ``--out`` (JSON).

    python benchmarks/bench_lsq.py --n-msdki 100000 --n-ballstick 2000 --device auto
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n-msdki", type=int, default=100_000, help="MS-DKI voxels (a)")
    p.add_argument("--n-ballstick", type=int, default=2000, help="ball-stick voxels (b)")
    p.add_argument("--snr", type=float, nargs="+", default=[20.0, 50.0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (ours; the peers are CPU)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and the BLAS of numpy (peers run serially)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-dmipy", action="store_true", help="(b) without the dmipy peer")
    p.add_argument("--out", default="benchmarks/out/bench_lsq.json")
    args = p.parse_args(argv)
    if args.n_msdki < 0 or args.n_ballstick < 0 or args.threads < 1:
        p.error("voxel counts must be >= 0 and --threads >= 1")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread counts must be set before numpy / torch load their BLAS
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vaemap_bids.fitting import resolve_device  # noqa: E402
from vaemap_bids.fitting.lsq import solve_lsq  # noqa: E402
from vaemap_bids.fitting.options import method_options  # noqa: E402
from vaemap_bids.fitting.reference import fit_ballstick_dmipy, fit_msdki_dipy  # noqa: E402
from vaemap_bids.physics import make_model  # noqa: E402
from vaemap_bids.simulate.acquisitions import hcp_acquisition  # noqa: E402
from vaemap_bids.simulate.clusters import simulate_clusters  # noqa: E402
from vaemap_bids.simulate.noise import add_rician_noise  # noqa: E402
from _nodes import machine  # noqa: E402  (the script's folder is on sys.path)

#: Ball-stick truths: plausible tissue, inside both our bounds and dmipy's (0.1-3 um^2/ms).
BALLSTICK_TRUTH = {"stickfrac": (0.1, 0.8), "dpar": (1.0, 2.5), "diso": (0.5, 2.5)}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def rmse(est, truth):
    return float(np.sqrt(np.mean((est - truth) ** 2)))


def angle_deg(a, b):
    """Fibre angle, antipodally symmetric."""
    cos = np.abs(np.sum(a * b, 1)) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def lsq_settings(model_name: str) -> dict:
    """The packaged lsq defaults, so that the benchmark measures what users get."""
    opts = method_options("lsq", None, model_name)
    return {k: opts[k] for k in ("max_iter", "tolerance", "n_starts", "batch_size", "dtype",
                                 "grid_dpar", "grid_diso")}


def bench_msdki(n: int, snr: float, seed: int, device: torch.device) -> dict:
    sim = simulate_clusters(hcp_acquisition(), n_voxels=n, snr=snr, seed=seed)
    model, truth = sim.model, sim.params
    lo, hi = model.bounds()
    y = sim.noisy.astype(np.float32)
    settings = lsq_settings(model.name)
    solve_lsq(model, y[:256], device=device, **settings)        # warm-up (allocator, caches)
    fit_msdki_dipy(model.acquisition, y[:256])
    ours, t_ours = timed(solve_lsq, model, y, device=device, **settings)
    peer, t_peer = timed(fit_msdki_dipy, model.acquisition, y)
    out = {"snr": snr, "n_voxels": n, "n_volumes": int(y.shape[1]),
           "shells_smm2": [r["bval_smm2"] for r in model.acquisition.shell_table()],
           "ours": {"seconds": t_ours, "voxels_per_second": n / t_ours},
           "dipy": {"seconds": t_peer, "voxels_per_second": n / t_peer}}
    for name, est in (("ours", ours), ("dipy", peer)):
        out[name]["rmse"] = {"msd": rmse(est[:, 0], truth[:, 0]), "msk": rmse(est[:, 1], truth[:, 1])}
        out[name]["rmse_by_cluster"] = {
            cname: {"msd": rmse(est[sim.labels == c, 0], truth[sim.labels == c, 0]),
                    "msk": rmse(est[sim.labels == c, 1], truth[sim.labels == c, 1])}
            for c, cname in enumerate(sim.cluster_names) if np.any(sim.labels == c)}
        out[name]["n_unphysical"] = int(np.count_nonzero(model.invalid_mask(est)))
    out["throughput_ratio"] = out["ours"]["voxels_per_second"] / out["dipy"]["voxels_per_second"]
    out["rmse_ratio"] = {k: out["ours"]["rmse"][k] / out["dipy"]["rmse"][k] for k in ("msd", "msk")}
    out["pearson_r_ours_vs_dipy"] = {k: float(np.corrcoef(ours[:, i], peer[:, i])[0, 1])
                                     for i, k in enumerate(("msd", "msk"))}
    # dipy is unconstrained: its unphysical estimates (K far outside [0, 3]) dominate r above
    both = ~model.invalid_mask(peer) & np.all((peer >= lo) & (peer <= hi), axis=1)
    out["n_dipy_physical_in_bounds"] = int(both.sum())
    out["pearson_r_ours_vs_dipy_where_dipy_physical"] = {
        k: float(np.corrcoef(ours[both, i], peer[both, i])[0, 1]) for i, k in enumerate(("msd", "msk"))}
    out["target_met"] = bool(out["throughput_ratio"] >= 1.0
                             and all(v <= 1.02 for v in out["rmse_ratio"].values()))
    return out


def ballstick_data(n: int, snr: float, seed: int):
    model = make_model("ballstick", hcp_acquisition())
    truth_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    v = truth_rng.standard_normal((n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cols = [truth_rng.uniform(*BALLSTICK_TRUTH[k], n) for k in ("stickfrac", "dpar", "diso")]
    truth = np.column_stack(cols + [v])
    noisy = add_rician_noise(model.forward_numpy(truth), snr, noise_rng)
    noisy /= noisy[:, model.acquisition.b0_mask].mean(axis=1, keepdims=True)
    return model, truth, noisy.astype(np.float32)


def ballstick_errors(est, truth) -> dict:
    err = np.abs(est[:, :3] - truth[:, :3])
    return {"median_abs_error": {"stickfrac": float(np.median(err[:, 0])),
                                 "dpar": float(np.median(err[:, 1])),
                                 "diso": float(np.median(err[:, 2]))},
            "median_angle_deg": float(np.median(angle_deg(est[:, 3:], truth[:, 3:])))}


def bench_ballstick(n: int, snr: float, seed: int, device: torch.device, with_dmipy: bool) -> dict:
    model, truth, y = ballstick_data(n, snr, seed)
    settings = lsq_settings(model.name)
    solve_lsq(model, y[:64], device=device, **settings)
    ours, t_ours = timed(solve_lsq, model, y, device=device, **settings)
    out = {"snr": snr, "n_voxels": n, "n_volumes": int(y.shape[1]), "truth_ranges": BALLSTICK_TRUTH,
           "ours": {"seconds": t_ours, "voxels_per_second": n / t_ours, **ballstick_errors(ours, truth)}}
    if with_dmipy:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer, t_peer = timed(fit_ballstick_dmipy, model.acquisition, y, solver="brute2fine",
                                 use_parallel_processing=False)
        out["dmipy"] = {"seconds": t_peer, "voxels_per_second": n / t_peer,
                        **ballstick_errors(peer, truth)}
        out["throughput_ratio"] = t_peer / t_ours
        e_ours, e_peer = out["ours"], out["dmipy"]
        out["error_ratio"] = {k: e_ours["median_abs_error"][k] / e_peer["median_abs_error"][k]
                              for k in e_ours["median_abs_error"]}
        out["error_ratio"]["angle"] = e_ours["median_angle_deg"] / e_peer["median_angle_deg"]
        out["target_met"] = bool(out["throughput_ratio"] >= 50
                                 and all(v <= 1.10 for v in out["error_ratio"].values()))
    return out


def print_table(results: dict) -> None:
    print(f"\nmachine: {results['machine']['cpu']} ({results['machine']['nproc']} CPUs), "
          f"ours on {results['device']}, {results['threads']} thread(s)")
    for row in results["msdki"]:
        o, d = row["ours"], row["dipy"]
        print(f"\n(a) MS-DKI, {row['n_voxels']} voxels x {row['n_volumes']} volumes, SNR {row['snr']:g}")
        print(f"  {'':6} {'voxels/s':>12} {'RMSE D':>9} {'RMSE K':>9} {'unphysical':>11}")
        for name, r in (("ours", o), ("dipy", d)):
            print(f"  {name:6} {r['voxels_per_second']:12.0f} {r['rmse']['msd']:9.4f} "
                  f"{r['rmse']['msk']:9.4f} {r['n_unphysical']:11d}   by cluster (D, K): " + ", ".join(
                      f"{c} {v['msd']:.3f} {v['msk']:.3f}" for c, v in r["rmse_by_cluster"].items()))
        print(f"  throughput ratio {row['throughput_ratio']:.1f}x; RMSE ratio D "
              f"{row['rmse_ratio']['msd']:.3f}, K {row['rmse_ratio']['msk']:.3f}; r(ours, dipy) "
              f"D {row['pearson_r_ours_vs_dipy']['msd']:.4f}, K {row['pearson_r_ours_vs_dipy']['msk']:.4f}"
              f"; target {'met' if row['target_met'] else 'MISSED'}")
        rp = row["pearson_r_ours_vs_dipy_where_dipy_physical"]
        print(f"  r(ours, dipy) on the {row['n_dipy_physical_in_bounds']} voxels where dipy is physical "
              f"and in bounds: D {rp['msd']:.4f}, K {rp['msk']:.4f}")
    for row in results["ballstick"]:
        print(f"\n(b) ball-stick, {row['n_voxels']} voxels x {row['n_volumes']} volumes, SNR {row['snr']:g}")
        print(f"  {'':6} {'voxels/s':>10} {'|df|':>8} {'|dDpar|':>8} {'|dDiso|':>8} {'angle deg':>10}"
              "   (medians)")
        for name in ("ours", "dmipy"):
            if name not in row:
                continue
            r = row[name]
            e = r["median_abs_error"]
            print(f"  {name:6} {r['voxels_per_second']:10.1f} {e['stickfrac']:8.4f} {e['dpar']:8.4f} "
                  f"{e['diso']:8.4f} {r['median_angle_deg']:10.3f}")
        if "dmipy" in row:
            er = row["error_ratio"]
            print(f"  throughput ratio {row['throughput_ratio']:.0f}x; error ratio f {er['stickfrac']:.3f}"
                  f", Dpar {er['dpar']:.3f}, Diso {er['diso']:.3f}, angle {er['angle']:.3f}; "
                  f"target {'met' if row['target_met'] else 'MISSED'}")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(data, tmp, indent=2)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def main(args) -> int:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    results = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
               "machine": machine(), "device": str(device), "threads": args.threads,
               "seed": args.seed, "msdki": [], "ballstick": []}
    with_dmipy = not args.skip_dmipy
    if with_dmipy:
        try:
            import dmipy  # noqa: F401
        except ImportError:
            print("dmipy is not installed: (b) runs without its peer", file=sys.stderr)
            with_dmipy = False
    for snr in args.snr:
        if args.n_msdki:
            results["msdki"].append(bench_msdki(args.n_msdki, snr, args.seed, device))
        if args.n_ballstick:
            results["ballstick"].append(bench_ballstick(args.n_ballstick, snr, args.seed, device,
                                                        with_dmipy))
        write_json(Path(args.out), results)  # keep what is done if a later SNR is interrupted
    results["machine"]["load_average_end"] = list(os.getloadavg())
    write_json(Path(args.out), results)
    print_table(results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
