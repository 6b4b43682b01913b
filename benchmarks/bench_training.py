"""Training benchmarks of the network estimators (issue 2, items 6c, 6d and the science target).

    python benchmarks/bench_training.py loop     # (c) our vaegmm trainer vs a paper-style loop
    python benchmarks/bench_training.py memory   # (d) peak RSS of training and inference, HCP size
    python benchmarks/bench_training.py science  # SNR-20 cluster simulation: lsq/ssl/vaeunig/vaegmm
    python benchmarks/bench_training.py roofline # achieved FLOP/s of the trainer vs measured matmul peak
    python benchmarks/bench_training.py subsample # amortised training on a subsample vs on all voxels

(c) Same network (vaegmm, MS-DKI, HCP shells b <= 2: 198 volumes), same initial weights, same
    loss, KL and temperature schedules and epochs, on the same 100k simulated voxels. The
    paper-style loop is a torch DataLoader over a TensorDataset with batch 128 and shuffling, one
    Python iteration per batch and ``loss.item()`` after each step, as in the paper's code. Ours is
    :func:`vaemap_bids.fitting.train.train_network` (data on the device, randperm batches, default
    batch size). Both are scored with the same deterministic loss on all voxels at the end.
(d) One subprocess per measurement, so that each peak (``ru_maxrss``) is its own: ball-stick on
    all 288 HCP volumes, 0.9M voxels float32 (1.04 GB of signal). "train" runs the trainer's path
    (prepare_signals -> tensor -> train_network); "infer" runs the chunked posterior-mean inference
    with posterior samples (predict). The RSS after building the input is reported too.
(roofline) The fp32 matrix-product peak of this machine, measured in the same run with the same
    threads (square products of 2048, best of several), and the trainer's achieved FLOP/s: the
    floating-point work of one epoch is counted by ``torch.utils.flop_counter.FlopCounterMode``
    (every matrix product of forward, backward and the validation pass), the epochs are then timed
    without the counter, at each batch size asked for.
Results are printed as Markdown and written as JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from vaemap_bids.fitting.base import prepare_signals, resolve_device
from vaemap_bids.fitting.networks import build_network
from vaemap_bids.fitting.options import method_options
from vaemap_bids.fitting.train import (beta_at, predict, resolve_batch_size, train_network,
                                       validation_loss)
from vaemap_bids.physics import make_model
from vaemap_bids.simulate.acquisitions import hcp_acquisition
from vaemap_bids.simulate.clusters import simulate_clusters
from vaemap_bids.simulate.noise import add_rician_noise


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu"] = names[0] if names else info["cpu"]
    except OSError:
        pass
    try:
        info["load_avg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- (c) trainer vs a paper-style loop --------------------------------------------------------
def paper_style_train(net, y: np.ndarray, opts: dict, epochs: int, device, seed: int,
                      batch_size: int = 128) -> None:
    """The paper's way: DataLoader(TensorDataset), small batches, a Python step per batch."""
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.from_numpy(y)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimiser = torch.optim.Adam(net.parameters(), lr=float(opts["lr"]))
    net.train()
    for epoch in range(epochs):
        beta = beta_at(epoch, opts)
        running = 0.0
        for (s,) in loader:
            s = s.to(device)
            out = net(s)
            loss = net.loss(s, out, beta)["loss"]
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            running += loss.item()
    net.eval()


def bench_loop(args) -> dict:
    device = resolve_device(args.device)
    sim = simulate_clusters(hcp_acquisition(), args.n, snr=20.0, seed=args.seed)
    model = sim.model
    y, _ = prepare_signals(model, sim.noisy)
    # Schedules compressed into the few epochs of the benchmark, identical for both loops; the
    # KL weight of the ELBO (beta: auto = 1 on the NLL) so both see the same loss.
    beta = 1.0
    opts = method_options("vaegmm", {"epochs": args.epochs, "warmup_epochs": 0, "beta": beta,
                                     "ramp_epochs": max(1, args.epochs - 1),
                                     "validation_fraction": 0.0, "refine_steps": 0},
                          model.name)
    data = torch.from_numpy(y).to(device)
    everyone = torch.arange(len(y), device=device)
    final_beta = float(opts["beta"])
    rows = {}
    for name in ("paper_style", "vaemap"):
        torch.manual_seed(args.seed)
        net = build_network("vaegmm", model, opts).to(device)
        _sync(device)
        t0 = time.perf_counter()
        if name == "paper_style":
            paper_style_train(net, y, opts, args.epochs, device, args.seed)
            batch = 128
        else:
            info = train_network(net, data, opts, progress=False,
                                 generator=torch.Generator(device=device).manual_seed(args.seed))
            batch = info["batch_size"]
        _sync(device)
        seconds = time.perf_counter() - t0
        loss = validation_loss(net, data, everyone, final_beta, int(opts["inference_batch_size"]))
        with torch.no_grad():
            params = predict(net, data, chunk=int(opts["inference_batch_size"]))["params"]
        rmse = np.sqrt(np.mean((params - sim.params) ** 2, axis=0))
        rows[name] = {"seconds": seconds, "voxels_per_s": len(y) * args.epochs / seconds,
                      "batch_size": batch, "final_loss": loss,
                      "rmse_D": float(rmse[0]), "rmse_K": float(rmse[1])}
        print(f"  {name}: {seconds:.1f} s, {rows[name]['voxels_per_s']:.0f} voxels/s, "
              f"final loss {loss:.6f}", flush=True)
    ratio = rows["vaemap"]["voxels_per_s"] / rows["paper_style"]["voxels_per_s"]
    return {"n_voxels": len(y), "n_volumes": int(y.shape[1]), "epochs": args.epochs,
            "device": str(device), "runs": rows, "speedup": ratio, "target_speedup": 20.0,
            "options": {k: v for k, v in opts.items()}}


# ---- (d) peak memory ---------------------------------------------------------------------------
def hcp_sized_signals(n: int, seed: int, chunk: int = 50_000):
    """Ball-stick signals of ``n`` random voxels on all 288 HCP volumes, float32, SNR 20."""
    model = make_model("ballstick", hcp_acquisition())
    rng = np.random.default_rng(seed)
    out = np.empty((n, model.n_measurements), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        dirs = rng.normal(size=(m, 3))
        truth = np.column_stack([rng.uniform(0.1, 0.9, m), rng.uniform(1.0, 3.0, m),
                                 rng.uniform(0.5, 3.0, m),
                                 dirs / np.linalg.norm(dirs, axis=1, keepdims=True)])
        out[start:start + m] = add_rician_noise(model.forward_numpy(truth), 20.0, rng)
    return model, out


def memory_child(args) -> dict:
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model, signals = hcp_sized_signals(args.n, args.seed)
    rss_input = peak_rss_gib()
    opts = method_options("vaegmm", {"epochs": args.epochs, "n_posterior_samples": args.samples},
                          model.name)
    torch.manual_seed(args.seed)
    y, valid = prepare_signals(model, signals)           # as fit() does
    data = torch.from_numpy(y).to(device)
    net = build_network("vaegmm", model, opts).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t1 = time.perf_counter()
    if args.phase == "train":
        info = train_network(net, data, opts, generator=gen, progress=False)
        extra = {"epochs_run": info["epochs_run"], "batch_size": info["batch_size"]}
    else:
        out = predict(net, data, chunk=int(opts["inference_batch_size"]), n_samples=args.samples,
                      generator=gen)
        extra = {"n_posterior_samples": args.samples, "outputs": sorted(out)}
    _sync(device)
    result = {"phase": args.phase, "n_voxels": args.n, "n_volumes": int(signals.shape[1]),
              "input_gib": signals.nbytes / 2**30, "rss_after_input_gib": rss_input,
              "peak_rss_gib": peak_rss_gib(), "seconds": time.perf_counter() - t1,
              "setup_seconds": t1 - t0, "device": str(device), **extra}
    if device.type == "cuda":
        result["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def bench_memory(args) -> dict:
    results = {}
    for phase in ("train", "infer"):
        cmd = [sys.executable, __file__, "_memory-child", "--phase", phase, "--n", str(args.n),
               "--epochs", str(args.epochs), "--samples", str(args.samples), "--device",
               args.device, "--seed", str(args.seed), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"memory child {phase} failed:\n{proc.stderr[-3000:]}")
        results[phase] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[phase]
        print(f"  {phase}: peak RSS {r['peak_rss_gib']:.2f} GiB (input {r['input_gib']:.2f} GiB, "
              f"after input {r['rss_after_input_gib']:.2f} GiB), {r['seconds']:.0f} s", flush=True)
    return {"runs": results, "target_gib": 8.0}


# ---- roofline: achieved FLOP/s against the measured matmul peak ---------------------------------
def matmul_peak_flops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of a square matrix product on ``device`` (the machine's roofline)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up: thread pool, kernels
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def bench_roofline(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    device = resolve_device(args.device)
    peak = matmul_peak_flops(device)
    print(f"  matmul fp32 peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    sim = simulate_clusters(hcp_acquisition(), args.n, snr=20.0, seed=args.seed)
    y, _ = prepare_signals(sim.model, sim.noisy)
    data = torch.from_numpy(y).to(device)
    rows = []
    for batch in args.batch_sizes:
        opts = method_options(args.method, {"epochs": args.epochs, "batch_size": batch,
                                            "patience": args.epochs + 1}, sim.model.name)
        torch.manual_seed(args.seed)
        net = build_network(args.method, sim.model, opts).to(device)
        one = dict(opts, epochs=1)
        with FlopCounterMode(display=False) as counter:
            train_network(net, data, one, progress=False,
                          generator=torch.Generator(device=device).manual_seed(args.seed))
        flops_per_epoch = counter.get_total_flops()
        torch.manual_seed(args.seed)
        net = build_network(args.method, sim.model, opts).to(device)
        _sync(device)
        t0 = time.perf_counter()
        info = train_network(net, data, opts, progress=False,
                             generator=torch.Generator(device=device).manual_seed(args.seed))
        _sync(device)
        seconds = time.perf_counter() - t0
        epochs = int(info["epochs_run"])
        achieved = flops_per_epoch * epochs / seconds
        rows.append({"batch_size": batch, "epochs": epochs, "seconds": seconds,
                     "voxel_epochs_per_s": len(y) * epochs / seconds,
                     "flop_per_voxel_epoch": flops_per_epoch / len(y),
                     "achieved_flops": achieved, "fraction_of_peak": achieved / peak})
        print(f"  batch {batch}: {rows[-1]['voxel_epochs_per_s']:.0f} voxel-epochs/s, "
              f"{achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.0%} of peak", flush=True)
    return {"method": args.method, "n_voxels": len(y), "n_volumes": int(y.shape[1]),
            "device": str(device), "threads": torch.get_num_threads(), "matmul_peak_flops": peak,
            "runs": rows, "target_fraction": 0.30}


# ---- amortised training on a subsample ---------------------------------------------------------
def bench_subsample(args) -> dict:
    """The same simulation fitted by ``args.method`` trained on every voxel and on a stratified
    subsample of ``--train-voxels`` (then inferring every voxel): RMSE against the truth per
    parameter and cluster, and the wall time of each."""
    from vaemap_bids.fitting import fit

    sim = simulate_clusters(hcp_acquisition(), args.n, snr=args.snr, seed=args.seed)
    names = [p.label for p in sim.model.parameters]
    runs = {}
    for label, train in (("all voxels", None), (f"{args.train_voxels} voxels", args.train_voxels)):
        t0 = time.perf_counter()
        res = fit(sim.model, sim.noisy, args.method, device=args.device, seed=args.seed,
                  options={"train_voxels": train}, progress=False)
        seconds = time.perf_counter() - t0
        err = res.params - sim.params
        runs[label] = {"train_voxels": train, "seconds": seconds,
                       "epochs_run": res.hyperparameters.get("epochs_run"),
                       "rmse": {c: {p: float(np.sqrt(np.nanmean(err[sim.labels == k, i] ** 2)))
                                    for i, p in enumerate(names)}
                                for k, c in enumerate(sim.cluster_names)}}
        print(f"  {label}: {seconds:.0f} s, epochs {runs[label]['epochs_run']}, RMSE "
              + ", ".join(f"{c} " + "/".join(f"{v:.4f}" for v in r.values())
                          for c, r in runs[label]["rmse"].items()), flush=True)
    full, sub = runs["all voxels"], runs[f"{args.train_voxels} voxels"]
    ratio = {c: {p: sub["rmse"][c][p] / full["rmse"][c][p] for p in names} for c in full["rmse"]}
    return {"method": args.method, "n_voxels": args.n, "snr": args.snr, "runs": runs,
            "rmse_ratio_subsample_over_full": ratio,
            "speedup": full["seconds"] / sub["seconds"], "target_ratio": 1.02}


# ---- science target ----------------------------------------------------------------------------
def bench_science(args) -> dict:
    from vaemap_bids.fitting import fit

    overrides = json.loads(args.options) if args.options else {}
    per_seed = []
    for seed in args.seeds:
        sim = simulate_clusters(hcp_acquisition(), args.n, snr=args.snr, seed=seed)
        row = {"seed": seed, "methods": {}}
        for method in ("lsq", "ssl", "vaeunig", "vaegmm"):
            opts = {} if method == "lsq" else {
                k: v for k, v in overrides.items()
                if k in method_options(method, None, sim.model.name)}
            t0 = time.perf_counter()
            res = fit(sim.model, sim.noisy, method, device=args.device, seed=seed, options=opts,
                      progress=False)
            err = res.params - sim.params
            row["methods"][method] = {
                "seconds": time.perf_counter() - t0,
                "rmse_pooled": np.sqrt(np.mean(err ** 2, axis=0)).tolist(),
                "rmse_cluster": [np.sqrt(np.mean(err[sim.labels == c] ** 2, axis=0)).tolist()
                                 for c in range(len(sim.cluster_names))],
                "epochs_run": res.hyperparameters.get("epochs_run")}
        m = row["methods"]
        row["vaegmm_beats_ssl_every_cluster"] = bool(np.all(
            np.array(m["vaegmm"]["rmse_cluster"]) < np.array(m["ssl"]["rmse_cluster"])))
        row["vaegmm_beats_lsq_pooled"] = bool(np.all(
            np.array(m["vaegmm"]["rmse_pooled"]) < np.array(m["lsq"]["rmse_pooled"])))
        per_seed.append(row)
        print(science_table(row, sim.cluster_names), flush=True)
    mean = {"seed": "mean", "methods": {}}
    for method in per_seed[0]["methods"]:
        rows = [r["methods"][method] for r in per_seed]
        mean["methods"][method] = {
            key: np.mean([r[key] for r in rows], axis=0).tolist()
            for key in ("seconds", "rmse_pooled", "rmse_cluster")}
    m = mean["methods"]
    mean["vaegmm_beats_ssl_every_cluster"] = bool(np.all(
        np.array(m["vaegmm"]["rmse_cluster"]) < np.array(m["ssl"]["rmse_cluster"])))
    mean["vaegmm_beats_lsq_pooled"] = bool(np.all(
        np.array(m["vaegmm"]["rmse_pooled"]) < np.array(m["lsq"]["rmse_pooled"])))
    print(science_table(mean, sim.cluster_names), flush=True)
    return {"snr": args.snr, "n_voxels": args.n, "options": overrides, "seeds": per_seed,
            "mean_over_seeds": mean}


def science_table(row: dict, names) -> str:
    lines = [f"seed {row['seed']}: vaegmm < ssl in every cluster: "
             f"{row['vaegmm_beats_ssl_every_cluster']}; vaegmm < lsq pooled: "
             f"{row['vaegmm_beats_lsq_pooled']}",
             "| method | " + " | ".join(f"D {n}" for n in names) + " | D pooled | "
             + " | ".join(f"K {n}" for n in names) + " | K pooled | s |",
             "|---" * (2 * len(names) + 4) + "|"]
    for method, r in row["methods"].items():
        d = [c[0] for c in r["rmse_cluster"]] + [r["rmse_pooled"][0]]
        k = [c[1] for c in r["rmse_cluster"]] + [r["rmse_pooled"][1]]
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in d + k)
                     + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["loop", "memory", "science", "roofline", "subsample",
                                     "_memory-child"])
    ap.add_argument("--device", default="cpu", help="auto | cpu | cuda")
    ap.add_argument("--n", type=int, help="voxels (loop 100000, memory 900000, science 10000)")
    ap.add_argument("--epochs", type=int, help="epochs (loop 3, memory 1)")
    ap.add_argument("--samples", type=int, default=20, help="posterior samples (memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="science seeds")
    ap.add_argument("--snr", type=float, default=20.0, help="science SNR")
    ap.add_argument("--options", help="science: JSON overrides of the network options")
    ap.add_argument("--method", default="vaegmm", help="roofline: the network method")
    ap.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+",
                    default=[1024, 4096, 16384], help="roofline: batch sizes")
    ap.add_argument("--train-voxels", dest="train_voxels", type=int, default=10_000,
                    help="subsample: training voxels of the subsampled fit")
    ap.add_argument("--phase", choices=["train", "infer"], help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = {"loop": (100_000, 3), "memory": (900_000, 1), "_memory-child": (900_000, 1),
                "science": (10_000, None), "roofline": (50_000, 3), "subsample": (40_000, None)}[args.what]
    args.n = args.n or defaults[0]
    args.epochs = args.epochs or defaults[1]
    if args.what == "_memory-child":
        print(json.dumps(memory_child(args)))
        return 0
    print(f"## bench_training {args.what}  ({' '.join(sys.argv[1:])})", flush=True)
    run = {"loop": bench_loop, "memory": bench_memory, "science": bench_science,
           "roofline": bench_roofline, "subsample": bench_subsample}[args.what]
    result = {"what": args.what, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "machine": machine(), "result": run(args)}
    if args.what == "loop":
        r = result["result"]
        print(f"speedup (voxels/s) vaemap / paper-style: {r['speedup']:.1f}x "
              f"(target >= {r['target_speedup']:.0f}x)")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
