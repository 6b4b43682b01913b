"""Accuracy and 95 % coverage of the network estimators on the paper's cluster simulation
(issue 9): per cluster RMSE, bias and the fraction of voxels with |estimate - truth| <= 1.96 std.

    python benchmarks/bench_network_calibration.py N_VOXELS SNR '[["label", "method", {options}], ...]'

One JSON line per run on stdout (default options unless given; CPU, one torch thread, seed 0).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from vaemap_bids.fitting import fit
from vaemap_bids.simulate.acquisitions import hcp_acquisition
from vaemap_bids.simulate.clusters import simulate_clusters


def main(argv) -> int:
    torch.set_num_threads(1)
    n, snr, runs = int(argv[0]), float(argv[1]), json.loads(argv[2])
    sim = simulate_clusters(hcp_acquisition(), n, snr, 0)
    for label, method, options in runs:
        t0 = time.time()
        res = fit(sim.model, sim.noisy, method, device="cpu", seed=0, options=options,
                  progress=False)
        err = res.params - sim.params
        row = {"snr": snr, "n": n, "label": label, "method": method, "wall": time.time() - t0,
               "timings": res.timings, "epochs": res.hyperparameters.get("epochs_run")}
        for c, name in enumerate(sim.cluster_names):
            sel = sim.labels == c
            row[name] = {"rmse": np.sqrt((err[sel] ** 2).mean(0)).round(4).tolist(),
                         "bias": err[sel].mean(0).round(4).tolist()}
            if res.std is not None:
                inside = np.abs(err[sel]) <= 1.96 * res.std[sel]
                row[name]["cov"] = inside.mean(0).round(3).tolist()
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
