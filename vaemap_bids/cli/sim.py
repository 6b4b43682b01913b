"""``vaemap-sim``: the command line of the simulation benchmark
(:mod:`vaemap_bids.simulate.benchmark` holds the science and the reports)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ..config import ExitCode
from ..physics.base import make_model
from ..simulate.acquisitions import hcp_acquisition
from ..simulate.benchmark import (DEFAULT_BETAS, DEFAULT_LATENT_DIMS, DEFAULT_SEEDS,
                                  DEFAULT_SNRS, MODEL, ORACLE, QUICK, SIM_METHODS, SWEEP_JSON,
                                  SWEEP_MD, SWEEP_METHODS, SWEEP_PNG, resolve_options,
                                  run_benchmark, run_sweep, save_figure, sweep_figure, sweep_keys,
                                  sweep_markdown, write_atomic, write_json, write_outputs)

EXIT_OK, EXIT_USAGE = ExitCode.OK, ExitCode.USAGE
EXIT_CANTCREAT, EXIT_TEMPFAIL = ExitCode.CANTCREAT, ExitCode.TEMPFAIL


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 64, not argparse's usage dump and exit 2
        self.exit(EXIT_USAGE, f"vaemap-sim: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vaemap-sim", description=(
        "Simulation benchmark of the MS-DKI estimators (paper Fig. 1): three tissue-like clusters, "
        "HCP b-table (shells b <= 2000 s/mm^2), Rician noise; RMSE, bias and Pearson r per method, "
        "parameter, cluster and SNR over several seeds. Exit codes: 0 ok, 64 bad arguments, "
        "73 cannot write the output folder, 75 device not available."))
    p.add_argument("--out", type=Path, default=Path("vaemap-sim-results"),
                   help="output folder (created; default: %(default)s)")
    p.add_argument("--methods", nargs="+", choices=SIM_METHODS, default=None,
                   help="estimators to run, and oracle: the Bayes posterior under the true "
                        "prior and likelihood (default: all four and oracle)")
    p.add_argument("--snr", nargs="+", type=float, default=None,
                   help="SNRs, sigma = 1/SNR on S/S0 (default: 10 20 50 100)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="seeds; each gives a new truth, noise and network initialisation (default: 0 1 2)")
    p.add_argument("--n-voxels", type=int, default=None, help="voxels per simulation (default 10000)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the epochs of every network method")
    p.add_argument("--config", type=Path, default=None,
                   help="hyper-parameter YAML ({method: {option: value}}), as for vaemap")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-renormalise", action="store_true",
                   help="keep the true S0 = 1 instead of dividing by the noisy mean b0")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny run for checks: {QUICK['n_voxels']} voxels, SNR 20, seed 0, "
                        f"{QUICK['epochs']} epochs (explicit options still win)")
    p.add_argument("--progress", action="store_true", help="show a progress bar per fit")
    p.add_argument("-v", "--verbose", action="store_true", help="log every fit")
    sw = p.add_argument_group("sweep (paper Fig. 6)")
    sw.add_argument("--sweep", action="store_true",
                    help="train the VAE methods over latent dimension x KL weight instead")
    sw.add_argument("--sweep-methods", nargs="+", choices=SWEEP_METHODS, default=list(SWEEP_METHODS))
    sw.add_argument("--latent-dims", nargs="+", type=int, default=list(DEFAULT_LATENT_DIMS))
    sw.add_argument("--betas", nargs="+", type=_beta_arg, default=list(DEFAULT_BETAS),
                    help="final KL weights (numbers, or auto where the networks support it)")
    return p


def _beta_arg(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid KL weight {text!r} (a number or auto)") from None


def _check_args(p, args) -> None:
    if args.quick:
        args.n_voxels = QUICK["n_voxels"] if args.n_voxels is None else args.n_voxels
        args.snr = list(QUICK["snrs"]) if args.snr is None else args.snr
        args.seeds = list(QUICK["seeds"]) if args.seeds is None else args.seeds
        args.epochs = QUICK["epochs"] if args.epochs is None else args.epochs
    args.methods = args.methods or list(SIM_METHODS)
    args.snr = args.snr or (list(DEFAULT_SNRS) if not args.sweep else [20.0])
    args.seeds = args.seeds if args.seeds is not None else (list(DEFAULT_SEEDS) if not args.sweep else [0])
    args.n_voxels = 10_000 if args.n_voxels is None else args.n_voxels
    if any(not (s > 0) for s in args.snr):
        p.error("--snr values must be positive")
    if args.n_voxels < 10:
        p.error("--n-voxels must be at least 10")
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if len(set(args.seeds)) != len(args.seeds) or len(set(args.snr)) != len(args.snr):
        p.error("--seeds and --snr values must be distinct")
    if args.sweep and (len(args.snr) != 1):
        p.error("--sweep runs at one SNR; give a single --snr")
    if args.sweep and (any(d < 1 for d in args.latent_dims) or any(not isinstance(b, str) and b < 0 for b in args.betas)):
        p.error("--latent-dims must be >= 1 and --betas >= 0")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from ..fitting import DeviceUnavailableError, resolve_device

    try:
        resolve_device(args.device)
        config = None
        if args.config is not None:
            from ..fitting.options import load_config
            config = load_config(args.config)
        for m in (args.methods if not args.sweep else list(args.sweep_methods) + ["ssl"]):
            if m != ORACLE:
                resolve_options(config, m, args.epochs)
        if args.sweep:
            for m in args.sweep_methods:
                sweep_keys(m)
    except DeviceUnavailableError as exc:
        print(f"vaemap-sim: error: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except ValueError as exc:
        print(f"vaemap-sim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        probe = args.out / ".vaemap-sim-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        print(f"vaemap-sim: error: cannot write to {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CANTCREAT
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    model = make_model(MODEL, hcp_acquisition())
    t0 = time.perf_counter()
    try:
        if args.sweep:
            res, scatter = run_sweep(args.sweep_methods, args.latent_dims, args.betas, args.snr[0],
                                     args.seeds, args.n_voxels, device=args.device, config=config,
                                     epochs=args.epochs, progress=args.progress,
                                     on_update=lambda r: write_json(args.out / SWEEP_JSON, r))
            write_json(args.out / SWEEP_JSON, res)
            write_atomic(args.out / SWEEP_MD, sweep_markdown(res))
            save_figure(sweep_figure(res, scatter), args.out / SWEEP_PNG)
            written = [args.out / n for n in (SWEEP_JSON, SWEEP_MD, SWEEP_PNG)]
        else:
            res, est = run_benchmark(args.methods, args.snr, args.seeds, args.n_voxels,
                                     device=args.device, config=config, epochs=args.epochs,
                                     renormalise=not args.no_renormalise, progress=args.progress,
                                     on_update=lambda r: write_outputs(args.out, r, None, model))
            res["total_wall_s"] = time.perf_counter() - t0
            written = write_outputs(args.out, res, est, model)
    except DeviceUnavailableError as exc:
        print(f"vaemap-sim: error: {exc}", file=sys.stderr)
        return EXIT_TEMPFAIL
    except OSError as exc:
        print(f"vaemap-sim: error: cannot write results to {args.out}: {exc}", file=sys.stderr)
        return EXIT_CANTCREAT
    print(f"vaemap-sim: wrote {', '.join(str(w) for w in written)} "
          f"({time.perf_counter() - t0:.1f} s)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
