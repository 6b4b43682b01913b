"""``vaemap-sim``: the paper's simulation benchmark (SCIENCE.md section 5, Fig. 1 and Fig. 6).

Simulates the three MS-DKI clusters with Rician noise at each SNR and seed, fits them with each
method through :func:`vaemap_bids.fitting.fit`, and writes to ``--out``:

- ``results.json``: every number (RMSE, bias, Pearson r per method, parameter, cluster and pooled,
  SNR and seed, with mean and sd over seeds), wall time and voxels/s, the configuration, the
  versions, the rejection statistics of the truth and the note on the MS-DKI shell restriction;
- ``results.md``: the same as Markdown tables (mean +- sd over seeds);
- ``scatter_snr-<SNR>.png``: truth against estimate (rows: methods, columns: D and K, coloured by
  cluster, identity line), first seed.

Every method gets the noise level the pipeline would give it: the known sigma = 1/SNR of the
magnitudes divided by each voxel's noisy measured mean b0 (sigma / S0 of the normalised signal).
``oracle`` (a ``--methods`` choice, in the default list) is the per-voxel Bayes posterior mean
and sd under the simulation's true prior and Rician likelihood
(:mod:`vaemap_bids.simulate.oracle`): the best any voxelwise estimator can do. When it runs,
every RMSE in ``results.md`` is also shown as a multiple of the oracle's, and every method with a
std (the oracle included) gets its 95 % coverage (mean +- 1.96 std holds the truth) per
parameter and cluster.

``--sweep`` instead trains vaeunig/vaegmm over a grid of latent dimension x KL weight (Fig. 6) and
writes ``sweep.json``, ``sweep.md`` and ``sweep.png``.

Exit codes (BIDS-Apps convention): 0 success, 64 bad arguments or options, 73 the output folder
cannot be created or written, 75 the device asked for is not available.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomic
from .. import __version__
from ..fitting.base import METHODS, NETWORK_METHODS
from ..physics.base import make_model
from .acquisitions import hcp_acquisition
from .clusters import PAPER_CLUSTERS, simulate_clusters
from .metrics import POOLED, mean_sd, parameter_metrics
from .oracle import simulation_sigma

log = logging.getLogger("vaemap.simulate")


RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SWEEP_PNG = "sweep.png"
MODEL = "msdki"
#: Parameter labels of the MS-DKI model and the symbols the paper uses for them.
SYMBOLS = {"msd": "D", "msk": "K"}
METRICS = ("rmse", "bias", "r")
#: the Bayes oracle: a row of the benchmark, not an estimator of vaemap
ORACLE = "oracle"
SIM_METHODS = METHODS + (ORACLE,)
DEFAULT_SNRS = (10.0, 20.0, 50.0, 100.0)
DEFAULT_SEEDS = (0, 1, 2)
QUICK = {"n_voxels": 300, "snrs": (20.0,), "seeds": (0,), "epochs": 2}
#: Option names the networks may use for the latent dimension and the final KL weight.
LATENT_KEYS = ("latent_dim", "latent_dims", "n_latent", "z_dim")
BETA_KEYS = ("beta", "kl_weight", "beta_final", "beta_max")
SWEEP_METHODS = ("vaeunig", "vaegmm")
DEFAULT_LATENT_DIMS = (1, 2, 4, 8, 16)
DEFAULT_BETAS = (1e-5, 1e-4, 1e-3, 1e-2)
CLUSTER_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def scatter_name(snr: float) -> str:
    return f"scatter_snr-{_snr_key(snr)}.png"


def _snr_key(snr: float) -> str:
    return f"{snr:g}"


class UsageError(ValueError):
    """A bad argument or option (exit code 64)."""


# ---- writing --------------------------------------------------------------------------------
def write_atomic(path: Path, data: str | bytes) -> None:
    write_bytes_atomic(path, data.encode() if isinstance(data, str) else data)


def _json_safe(obj):
    """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(_json_safe(data), indent=1, allow_nan=False) + "\n")


def save_figure(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# ---- configuration ---------------------------------------------------------------------------
def versions() -> dict:
    import torch

    return {"vaemap": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "git": _git_state()}


def _git_state() -> str | None:
    """Commit of the source tree (``+dirty`` with uncommitted changes), None outside git."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=here.parent, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def resolve_options(config: dict | None, method: str, epochs: int | None) -> dict:
    """Options of ``method`` on MS-DKI: packaged defaults < ``--config`` < ``--epochs``."""
    from ..fitting.options import options_for

    opts = options_for(config, method, MODEL)
    if epochs is not None and method in NETWORK_METHODS:
        if "epochs" not in opts:
            raise UsageError(f"--epochs given but method {method} has no 'epochs' option")
        opts["epochs"] = int(epochs)
    return opts


def shell_note(model) -> str:
    shells = ", ".join(f"{row['bval_smm2']:.0f}" for row in model.acquisition.shell_table())
    dropped = sorted({round(b * 1e3) for b in model.full_acquisition.nonzero_shells}
                     - {round(b * 1e3) for b in model.acquisition.nonzero_shells})
    b_top = model.acquisition.nonzero_shells.max() * 1e3
    note = (f"MS-DKI used only the shells b <= {b_top:.0f} s/mm^2 ({shells} s/mm^2; "
            f"{model.n_measurements} of {model.full_acquisition.n_volumes} volumes; the model keeps "
            f"shells up to {model.max_b * 1e3:.0f} s/mm^2, where its cumulant expansion holds)")
    if dropped:
        note += f"; shells not used: {', '.join(str(b) for b in dropped)} s/mm^2"
    return note + "."


# ---- the benchmark ---------------------------------------------------------------------------
def run_benchmark(methods=SIM_METHODS, snrs=DEFAULT_SNRS, seeds=DEFAULT_SEEDS, n_voxels=10_000, *,
                  device="auto", config=None, epochs=None, renormalise=True, progress=False,
                  acquisition=None, on_update=None) -> tuple[dict, dict]:
    """Run every (SNR, seed, method) and return ``(results, estimates)``.

    ``results`` is the JSON-ready record (see the module doc); ``estimates[snr]`` holds the first
    seed's truth, labels and each method's estimate for the scatter plots. ``on_update(results)``
    is called after each fit so that a caller can save partial results.
    """
    from ..fitting import fit, resolve_device

    methods = list(methods)
    dev = str(resolve_device(device))
    acq = hcp_acquisition() if acquisition is None else acquisition
    model = make_model(MODEL, acq)
    options = {m: resolve_options(config, m, epochs) for m in methods if m != ORACLE}
    param_labels = [p.label for p in model.parameters]
    results = {
        "tool": "vaemap-sim",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
        "note": shell_note(model),
        "configuration": {"model": MODEL, "methods": methods, "snrs": [float(s) for s in snrs],
                          "seeds": [int(s) for s in seeds], "n_voxels": int(n_voxels),
                          "device": dev, "renormalised_by_noisy_b0": bool(renormalise),
                          "sigma_given": SIGMA_NOTE if renormalise else SIGMA_NOTE_RAW,
                          "clusters": {k: list(v) for k, v in PAPER_CLUSTERS.items()},
                          "options": options},
        "versions": versions(),
        "machine": machine(dev),
        "parameters": {lab: SYMBOLS.get(lab, lab) for lab in param_labels},
        "simulation": {},
        "runs": [],
        "summary": {},
        "comparisons": {},
    }
    estimates: dict = {}
    for snr in snrs:
        for seed in seeds:
            sim = simulate_clusters(acq, n_voxels, snr, seed, model=model, renormalise=renormalise)
            results["simulation"].setdefault(str(int(seed)), {
                "rejection": sim.rejection, "b_max_used_smm2": sim.b_max * 1e3,
                "n_volumes": int(sim.noisy.shape[1]),
                "cluster_counts": np.bincount(sim.labels, minlength=len(sim.cluster_names)).tolist()})
            if seed == seeds[0]:
                estimates[float(snr)] = {"truth": sim.params, "labels": sim.labels,
                                         "cluster_names": sim.cluster_names, "methods": {}}
            sigma = simulation_sigma(sim)
            for method in methods:
                t0 = time.perf_counter()
                if method == ORACLE:
                    res = _oracle_result(sim, dev)
                else:
                    res = fit(model, sim.noisy, method, device=dev, seed=int(seed),
                              options=options[method], progress=progress, sigma=sigma)
                wall = time.perf_counter() - t0
                metrics = parameter_metrics(res.params, sim.params, sim.labels, param_labels,
                                            sim.cluster_names)
                finite = np.all(np.isfinite(res.params), axis=1)
                run = {"snr": float(snr), "seed": int(seed), "method": method,
                       "wall_s": wall, "voxels_per_s": n_voxels / wall if wall > 0 else None,
                       "timings": dict(res.timings), "device": res.device,
                       "n_at_bound": int(model.at_bound_mask(res.params[finite]).sum()),
                       "n_invalid": int(model.invalid_mask(res.params[finite]).sum()),
                       "n_not_finite": int((~finite).sum()),
                       "final_loss": _final(res.history),
                       "noise": (res.hyperparameters or {}).get("noise"),
                       "metrics": metrics}
                if res.std is not None:
                    run["coverage"] = coverage_metrics(res.params, res.std, sim.params,
                                                       sim.labels, param_labels, sim.cluster_names)
                results["runs"].append(run)
                if seed == seeds[0]:
                    estimates[float(snr)]["methods"][method] = res.params
                log.info("SNR %g seed %d %-8s %7.1f s  RMSE D %.4f K %.4f", snr, seed, method, wall,
                         metrics[param_labels[0]][POOLED]["rmse"],
                         metrics[param_labels[1]][POOLED]["rmse"])
                results["summary"] = summarise_runs(results["runs"], param_labels)
                results["comparisons"] = compare(results["summary"], param_labels,
                                                 list(sim.cluster_names))
                if on_update is not None:
                    on_update(results)
    results["complete"] = True
    return results, estimates


SIGMA_NOTE = ("sigma given to every fit: the known sigma = 1/SNR of the magnitudes divided by "
              "each voxel's noisy measured mean b0 (sigma / S0 of the normalised signal, what "
              "the pipeline computes)")
SIGMA_NOTE_RAW = "sigma given to every fit: the known sigma = 1/SNR (signals not renormalised)"


def _oracle_result(sim, device: str):
    """The oracle as a FitResult-like row (params = posterior mean, std = posterior sd)."""
    from ..fitting.base import FitResult
    from .oracle import OracleGrid, oracle_for_simulation

    t0 = time.perf_counter()
    mean, sd = oracle_for_simulation(sim, device=device)
    seconds = time.perf_counter() - t0
    grid = OracleGrid()
    return FitResult(model=sim.model.name, method=ORACLE, params=mean.astype(np.float32),
                     valid=np.ones(sim.n_voxels, dtype=bool), std=sd.astype(np.float32),
                     hyperparameters={"grid": grid.__dict__,
                                      "noise": {"model": "rician (true)", "sigma": sim.sigma}},
                     timings={"fit_seconds": seconds,
                              "voxels_per_second": sim.n_voxels / max(seconds, 1e-12)},
                     device=str(device))


def coverage_metrics(estimate, std, truth, labels, param_names, cluster_names) -> dict:
    """``{param: {cluster or pooled: fraction of voxels with |estimate - truth| <= 1.96 std}}``
    over the voxels with a finite estimate and std."""
    estimate = np.asarray(estimate, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    labels = np.asarray(labels)
    out = {}
    for j, name in enumerate(param_names):
        ok = np.isfinite(estimate[:, j]) & np.isfinite(std[:, j])
        hit = np.abs(estimate[:, j] - truth[:, j]) <= 1.96 * std[:, j]
        per = {}
        for c, cname in enumerate(cluster_names):
            sel = ok & (labels == c)
            per[cname] = float(hit[sel].mean()) if sel.any() else float("nan")
        per[POOLED] = float(hit[ok].mean()) if ok.any() else float("nan")
        out[name] = per
    return out


def _final(history: dict) -> dict:
    return {k: float(v[-1]) for k, v in (history or {}).items()
            if isinstance(v, (list, tuple)) and v and isinstance(v[-1], (int, float))}


def summarise_runs(runs: list[dict], param_labels) -> dict:
    """``summary[method][snr]`` = mean/sd over seeds of every metric and of the timings."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(run["method"], {}).setdefault(_snr_key(run["snr"]), []).append(run)
    out: dict = {}
    for method, per_snr in groups.items():
        for snr, rs in per_snr.items():
            entry = {"n_seeds": len(rs), "wall_s": mean_sd([r["wall_s"] for r in rs]),
                     "voxels_per_s": mean_sd([r["voxels_per_s"] for r in rs]),
                     "n_at_bound": mean_sd([r["n_at_bound"] for r in rs]), "metrics": {}}
            for lab in param_labels:
                entry["metrics"][lab] = {
                    cl: {m: mean_sd([r["metrics"][lab][cl][m] for r in rs]) for m in METRICS}
                    for cl in rs[0]["metrics"][lab]}
            if all("coverage" in r for r in rs):
                entry["coverage"] = {lab: {cl: mean_sd([r["coverage"][lab][cl] for r in rs])
                                           for cl in rs[0]["coverage"][lab]}
                                     for lab in param_labels}
            out.setdefault(method, {})[snr] = entry
    return out


def compare(summary: dict, param_labels, cluster_names) -> dict:
    """The paper's claim at each SNR: is vaegmm's RMSE (mean over seeds) of every parameter
    below ssl's in every cluster, and below lsq's pooled?"""
    out = {}
    if "vaegmm" not in summary:
        return out
    for snr, entry in summary["vaegmm"].items():
        rows, verdicts = [], []
        for lab in param_labels:
            for baseline, clusters in (("ssl", cluster_names), ("lsq", [POOLED])):
                base = summary.get(baseline, {}).get(snr)
                if base is None:
                    continue
                for cl in clusters:
                    ours = entry["metrics"][lab][cl]["rmse"]["mean"]
                    theirs = base["metrics"][lab][cl]["rmse"]["mean"]
                    below = bool(ours < theirs) if np.isfinite(ours) and np.isfinite(theirs) else None
                    rows.append({"parameter": lab, "baseline": baseline, "cluster": cl,
                                 "vaegmm_rmse": ours, "baseline_rmse": theirs, "vaegmm_below": below})
                    verdicts.append(below)
        out[snr] = {"checks": rows,
                    "all_below": bool(verdicts) and all(v is True for v in verdicts)}
    return out


# ---- Markdown --------------------------------------------------------------------------------
def _fmt(ms: dict, digits: int = 3) -> str:
    mean, sd = ms.get("mean"), ms.get("sd")
    if mean is None or not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if ms.get("n", 1) > 1 else f"{mean:.{digits}f}"


def results_markdown(results: dict) -> str:
    cfg = results["configuration"]
    summary = results["summary"]
    params = results["parameters"]
    clusters = [c for c in cfg["clusters"]["names"]] + [POOLED]
    lines = ["# vaemap-sim: MS-DKI three-cluster simulation", "",
             f"{cfg['n_voxels']} voxels, SNR {', '.join(f'{s:g}' for s in cfg['snrs'])}, "
             f"seeds {', '.join(str(s) for s in cfg['seeds'])}, device {cfg['device']}, "
             f"vaemap {results['versions']['vaemap']}, torch {results['versions']['torch']}. "
             "Values: mean ± sd over seeds.", "", results["note"], ""]
    if not results.get("complete"):
        lines += ["**Partial results: the run did not finish.**", ""]
    lines += [cfg.get("sigma_given", SIGMA_NOTE) + ".", ""]
    lines += _rejection_lines(results)
    header_cells = [f"{params[lab]} {cl}" for lab in params for cl in clusters]
    titles = {"rmse": "RMSE", "bias": "Bias (estimate - truth)", "r": "Pearson r"}
    for snr in (f"{s:g}" for s in cfg["snrs"]):
        present = [m for m in cfg["methods"] if snr in summary.get(m, {})]
        if not present:
            continue
        lines += [f"## SNR {snr}", ""]
        for metric in METRICS:
            lines += [f"### {titles[metric]}", "",
                      "| method | " + " | ".join(header_cells) + " |",
                      "|---" * (len(header_cells) + 1) + "|"]
            oracle = summary.get(ORACLE, {}).get(snr)
            for m in present:
                e = summary[m][snr]["metrics"]
                cells = [_fmt(e[lab][cl][metric]) for lab in params for cl in clusters]
                if metric == "rmse" and oracle is not None:
                    cells = [f"{c} ({_ratio(e[lab][cl]['rmse'], oracle['metrics'][lab][cl]['rmse'])})"
                             for c, (lab, cl) in zip(cells, [(lab, cl) for lab in params
                                                             for cl in clusters])]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
            if metric == "rmse" and oracle is not None:
                lines += ["In brackets: the RMSE as a multiple of the oracle's (mean over seeds).",
                          ""]
        covered = [m for m in present if "coverage" in summary[m][snr]]
        if covered:
            lines += ["### 95 % coverage (mean ± 1.96 std holds the truth)", "",
                      "| method | " + " | ".join(header_cells) + " |",
                      "|---" * (len(header_cells) + 1) + "|"]
            for m in covered:
                cov = summary[m][snr]["coverage"]
                lines.append(f"| {m} | " + " | ".join(_fmt(cov[lab][cl]) for lab in params
                                                      for cl in clusters) + " |")
            lines.append("")
        comp = results["comparisons"].get(snr)
        if comp:
            lines += _comparison_lines(comp, params)
    lines += ["## Speed", "", "| method | SNR | wall time (s) | voxels/s | estimates at a bound |",
              "|---|---|---|---|---|"]
    for m in cfg["methods"]:
        for snr, e in summary.get(m, {}).items():
            lines.append(f"| {m} | {snr} | {_fmt(e['wall_s'], 2)} | {_fmt(e['voxels_per_s'], 0)} "
                         f"| {_fmt(e['n_at_bound'], 0)} |")
    lines.append("")
    return "\n".join(lines)


def _ratio(ours: dict, oracle: dict) -> str:
    a, b = ours.get("mean"), oracle.get("mean")
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)) or b <= 0:
        return "n/a"
    return f"{a / b:.2f}×"


def _rejection_lines(results: dict) -> list[str]:
    lines = ["## Truth (drawn by rejection)", "",
             "Each voxel's cluster is drawn with the weights; its (D, K) is redrawn from the "
             "cluster's Gaussian until physical (D > 0, K >= 0, b_max D K < 3, inside the model's "
             "bounds). Rejection truncates the clusters: effective means below.", "",
             "| seed | cluster | voxels | draws | rejected | nominal mean (D, K) | effective mean (D, K) | effective sd (D, K) |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, sim in results["simulation"].items():
        for st in sim["rejection"]:
            lines.append(
                f"| {seed} | {st['name']} | {st['n_voxels']} | {st['n_draws']} | {st['n_rejected']} "
                f"({1 - st['acceptance_rate']:.1%}) | ({st['nominal_mean'][0]:.2f}, {st['nominal_mean'][1]:.2f}) "
                f"| ({st['effective_mean'][0]:.3f}, {st['effective_mean'][1]:.3f}) "
                f"| ({st['effective_sd'][0]:.3f}, {st['effective_sd'][1]:.3f}) |")
    return lines + [""]


def _comparison_lines(comp: dict, params: dict) -> list[str]:
    lines = ["### vaegmm against the baselines (RMSE, mean over seeds)", "",
             "| parameter | baseline | cluster | vaegmm | baseline | vaegmm lower |", "|---|---|---|---|---|---|"]
    for row in comp["checks"]:
        verdict = {True: "yes", False: "**no**", None: "n/a"}[row["vaegmm_below"]]
        lines.append(f"| {params[row['parameter']]} | {row['baseline']} | {row['cluster']} "
                     f"| {row['vaegmm_rmse']:.4f} | {row['baseline_rmse']:.4f} | {verdict} |")
    lines += ["", f"vaegmm below ssl in every cluster and below lsq pooled, for every parameter: "
              f"**{'yes' if comp['all_below'] else 'no'}**", ""]
    return lines


# ---- figures ---------------------------------------------------------------------------------
def scatter_figure(est: dict, snr: float, params: dict, bounds: tuple):
    """Fig. 1 style: rows = methods, columns = parameters, truth (x) against estimate (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(est["methods"])
    labs = list(params)
    fig, axes = plt.subplots(len(methods), len(labs), figsize=(3.6 * len(labs), 3.2 * len(methods)),
                             squeeze=False)
    truth, labels = est["truth"], est["labels"]
    lo, hi = bounds
    # one range per column, shared by every method, so that rows compare at a glance
    tops = [max([float(np.nanmax(truth[:, j]))]
                + [float(np.nanmax(p[:, j])) for p in est["methods"].values() if np.isfinite(p[:, j]).any()])
            for j in range(len(labs))]
    for i, m in enumerate(methods):
        for j, lab in enumerate(labs):
            ax = axes[i, j]
            pred = est["methods"][m][:, j]
            for c, name in enumerate(est["cluster_names"]):
                sel = labels == c
                ax.scatter(truth[sel, j], pred[sel], s=2, alpha=0.35, lw=0,
                           color=CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)], label=name, rasterized=True)
            edge = [min(lo[j], 0.0), min(hi[j], 1.05 * tops[j])]
            ax.plot(edge, edge, "k--", lw=0.8)
            ax.set_xlim(edge)
            ax.set_ylim(edge)
            ax.set_title(f"{m}: {params[lab]}  (SNR {snr:g})", fontsize=9)
            ax.set_xlabel(f"true {params[lab]}", fontsize=8)
            ax.set_ylabel(f"estimated {params[lab]}", fontsize=8)
            ax.tick_params(labelsize=7)
    from matplotlib.lines import Line2D

    names = list(est["cluster_names"])
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)])
               for c in range(len(names))]  # own handles: resizing the scatters' would resize the dots
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def write_outputs(out: Path, results: dict, estimates: dict | None, model) -> list[Path]:
    written = [out / RESULTS_JSON, out / RESULTS_MD]
    write_json(out / RESULTS_JSON, results)
    write_atomic(out / RESULTS_MD, results_markdown(results))
    for snr, est in (estimates or {}).items():
        if est["methods"]:
            fig = scatter_figure(est, snr, results["parameters"], model.bounds())
            save_figure(fig, out / scatter_name(snr))
            written.append(out / scatter_name(snr))
    return written


# ---- the sweep (Fig. 6) ----------------------------------------------------------------------
def sweep_keys(method: str) -> tuple[str, str]:
    """The option names of the latent dimension and of the KL weight of ``method``."""
    from ..fitting.options import default_options

    opts = default_options(method, MODEL)
    latent = next((k for k in LATENT_KEYS if k in opts), None)
    beta = next((k for k in BETA_KEYS if k in opts), None)
    if latent is None or beta is None:
        raise UsageError(
            f"--sweep needs {method} options for the latent dimension ({' or '.join(LATENT_KEYS)}) "
            f"and the KL weight ({' or '.join(BETA_KEYS)}); hyperparameters.yaml has only: "
            f"{', '.join(sorted(opts)) or 'none'}")
    return latent, beta


def run_sweep(methods=SWEEP_METHODS, latent_dims=DEFAULT_LATENT_DIMS, betas=DEFAULT_BETAS,
              snr=20.0, seeds=(0,), n_voxels=10_000, *, device="auto", config=None, epochs=None,
              baselines=("ssl",), progress=False, acquisition=None, on_update=None) -> tuple[dict, dict]:
    """Train each method over latent_dims x betas (and the baselines once) on the same voxels."""
    from ..fitting import fit, resolve_device

    dev = str(resolve_device(device))
    acq = hcp_acquisition() if acquisition is None else acquisition
    model = make_model(MODEL, acq)
    keys = {m: sweep_keys(m) for m in methods}
    param_labels = [p.label for p in model.parameters]
    results = {"tool": "vaemap-sim --sweep", "complete": False, "note": shell_note(model),
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "configuration": {"methods": list(methods), "baselines": list(baselines),
                                 "latent_dims": list(latent_dims), "betas": list(betas),
                                 "snr": float(snr), "seeds": [int(s) for s in seeds],
                                 "n_voxels": int(n_voxels), "device": dev,
                                 "option_keys": {m: {"latent": k[0], "beta": k[1]} for m, k in keys.items()}},
               "versions": versions(), "machine": machine(dev),
               "parameters": {lab: SYMBOLS.get(lab, lab) for lab in param_labels}, "runs": []}
    results["warnings"] = []
    for m in methods:
        opts = resolve_options(config, m, epochs)
        ramp = int(opts.get("warmup_epochs", 0)) + int(opts.get("ramp_epochs", 0))
        if int(opts.get("epochs", ramp + 1)) <= ramp:
            results["warnings"].append(
                f"{m}: {opts['epochs']} epochs <= KL warm-up + ramp ({ramp}): the KL weight never "
                "reaches its final value, so the KL-weight axis of the sweep is not meaningful")
            log.warning(results["warnings"][-1])
    scatter: dict = {}
    for seed in seeds:
        sim = simulate_clusters(acq, n_voxels, snr, seed, model=model)
        grid = [(b, None, None) for b in baselines]
        grid += [(m, ld, be) for m in methods for ld in latent_dims for be in betas]
        for method, ld, be in grid:
            opts = resolve_options(config, method, epochs)
            if ld is not None:
                opts[keys[method][0]] = int(ld)
                opts[keys[method][1]] = be
            t0 = time.perf_counter()
            res = fit(model, sim.noisy, method, device=dev, seed=int(seed), options=opts,
                      progress=progress)
            wall = time.perf_counter() - t0
            metrics = parameter_metrics(res.params, sim.params, sim.labels, param_labels,
                                        sim.cluster_names)
            results["runs"].append({"method": method, "latent_dim": ld, "beta": be, "seed": int(seed),
                                    "wall_s": wall, "metrics": metrics})
            if seed == seeds[0]:
                scatter[(method, ld, be)] = res.params
            log.info("sweep %s latent %s beta %s seed %d: RMSE D %.4f K %.4f (%.1f s)", method, ld,
                     be, seed, metrics[param_labels[0]][POOLED]["rmse"],
                     metrics[param_labels[1]][POOLED]["rmse"], wall)
            if on_update is not None:
                on_update(results)
        if seed == seeds[0]:
            scatter["truth"], scatter["labels"] = sim.params, sim.labels
            scatter["cluster_names"] = sim.cluster_names
    results["summary"] = _sweep_summary(results["runs"], param_labels)
    results["complete"] = True
    return results, scatter


def _sweep_summary(runs: list[dict], param_labels) -> list[dict]:
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["latent_dim"], r["beta"]), []).append(r)
    return [{"method": m, "latent_dim": ld, "beta": be, "n_seeds": len(rs),
             "rmse": {lab: mean_sd([r["metrics"][lab][POOLED]["rmse"] for r in rs]) for lab in param_labels},
             "r": {lab: mean_sd([r["metrics"][lab][POOLED]["r"] for r in rs]) for lab in param_labels},
             "rmse_by_cluster": {lab: {cl: mean_sd([r["metrics"][lab][cl]["rmse"] for r in rs])
                                       for cl in rs[0]["metrics"][lab] if cl != POOLED}
                                 for lab in param_labels}}
            for (m, ld, be), rs in groups.items()]


def sweep_markdown(results: dict) -> str:
    cfg, params = results["configuration"], results["parameters"]
    lines = ["# vaemap-sim --sweep: latent dimension x KL weight (paper Fig. 6)", "",
             f"SNR {cfg['snr']:g}, {cfg['n_voxels']} voxels, seeds {cfg['seeds']}, device "
             f"{cfg['device']}. Pooled RMSE and Pearson r, mean ± sd over seeds.", "",
             results["note"], ""] + [f"**Warning:** {w}\n" for w in results.get("warnings", [])] + [
             "| method | latent dim | KL weight | " + " | ".join(f"RMSE {s}" for s in params.values())
             + " | " + " | ".join(f"r {s}" for s in params.values()) + " |",
             "|---" * (3 + 2 * len(params)) + "|"]
    for row in results.get("summary", []):
        ld = "-" if row["latent_dim"] is None else row["latent_dim"]
        be = "-" if row["beta"] is None else _beta_text(row["beta"])
        cells = [_fmt(row["rmse"][lab], 4) for lab in params] + [_fmt(row["r"][lab], 3) for lab in params]
        lines.append(f"| {row['method']} | {ld} | {be} | " + " | ".join(cells) + " |")
    rows = [row for row in results.get("summary", []) if "rmse_by_cluster" in row]
    if rows:
        cols = [(lab, cl) for lab in params for cl in rows[0]["rmse_by_cluster"][lab]]
        lines += ["", "RMSE per cluster:", "",
                  "| method | latent dim | KL weight | " + " | ".join(f"{params[lab]} {cl}" for lab, cl in cols) + " |",
                  "|---" * (3 + len(cols)) + "|"]
        for row in rows:
            ld = "-" if row["latent_dim"] is None else row["latent_dim"]
            be = "-" if row["beta"] is None else _beta_text(row["beta"])
            lines.append(f"| {row['method']} | {ld} | {be} | "
                         + " | ".join(_fmt(row["rmse_by_cluster"][lab][cl], 3) for lab, cl in cols) + " |")
    return "\n".join(lines + [""])


def sweep_figure(results: dict, scatter: dict):
    """Top: heat maps of pooled RMSE over latent dimension x KL weight (rows: methods, columns:
    parameters), the baselines' RMSE in the title. Bottom (the paper's Fig. 6): truth against
    estimate of D for every grid point of the first method, the first baseline in the left column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, params = results["configuration"], results["parameters"]
    methods, lds, betas = cfg["methods"], cfg["latent_dims"], cfg["betas"]
    labs = list(params)
    table = {(r["method"], r["latent_dim"], r["beta"]): r for r in results["summary"]}
    bases = [b for b in cfg["baselines"] if (b, None, None) in table]
    base_text = "; ".join(f"{b}: " + ", ".join(
        f"{params[lab]} {table[(b, None, None)]['rmse'][lab]['mean']:.3f}" for lab in labs) for b in bases)
    n_cols = len(betas) + (1 if bases else 0)
    width = max(4.2 * len(labs), 2.1 * n_cols)
    top_h, bottom_h = 2.6 * len(methods), 2.1 * len(lds)
    fig = plt.figure(figsize=(width, top_h + bottom_h + 0.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_h, bottom_h])
    top.suptitle(f"Pooled RMSE at SNR {cfg['snr']:g}" + (f" (baselines: {base_text})" if base_text else ""),
                 fontsize=9)
    axes = top.subplots(len(methods), len(labs), squeeze=False)
    for i, m in enumerate(methods):
        for j, lab in enumerate(labs):
            ax = axes[i, j]
            grid = np.array([[table[(m, ld, be)]["rmse"][lab]["mean"] for be in betas] for ld in lds])
            im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
            mid = np.nanmean(grid)
            for a in range(len(lds)):
                for b in range(len(betas)):  # dark text on the light (low) end of viridis_r
                    ax.text(b, a, f"{grid[a, b]:.3f}", ha="center", va="center", fontsize=7,
                            color="k" if grid[a, b] <= mid else "w")
            ax.set_xticks(range(len(betas)), [_beta_text(b) for b in betas], fontsize=7)
            ax.set_yticks(range(len(lds)), [str(d) for d in lds], fontsize=7)
            ax.set_xlabel("KL weight", fontsize=8)
            ax.set_ylabel("latent dim", fontsize=8)
            ax.set_title(f"{m}: RMSE {params[lab]}", fontsize=9)
            top.colorbar(im, ax=ax, fraction=0.05)
    m0 = methods[0]
    bottom.suptitle(f"{m0}: true (x) against estimated (y) {params[labs[0]]}", fontsize=9)
    axes = bottom.subplots(len(lds), n_cols, squeeze=False, sharex=True, sharey=True)
    truth, labels = scatter["truth"], scatter["labels"]

    def panel(ax, pred, title):
        for c in range(len(scatter["cluster_names"])):
            sel = labels == c
            ax.scatter(truth[sel, 0], pred[sel], s=1, alpha=0.3, lw=0,
                       color=CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)], rasterized=True)
        ax.plot([0, 3.5], [0, 3.5], "k--", lw=0.6)
        ax.set_xlim(0, 3.5)
        ax.set_ylim(0, 3.5)
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=6)

    off = 1 if bases else 0
    for a, ld in enumerate(lds):
        if bases:
            if a == 0:
                panel(axes[0, 0], scatter[(bases[0], None, None)][:, 0], bases[0])
                axes[0, 0].tick_params(labelbottom=True)  # the panels below it are hidden
            else:
                axes[a, 0].axis("off")
        for b, be in enumerate(betas):
            panel(axes[a, b + off], scatter[(m0, ld, be)][:, 0], f"latent {ld}, KL {_beta_text(be)}")
    return fig


def _beta_text(beta) -> str:
    return beta if isinstance(beta, str) else f"{beta:g}"
