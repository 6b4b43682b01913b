"""``vaemap-demo``: build the demo dataset (:mod:`vaemap_bids.simulate.demo`) and run the
participant pipeline on it with every model and the default methods, with a reduced epoch budget."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..atomic import write_json_atomic
from ..config import ExitCode
from ..fitting.base import DEFAULT_METHODS
from ..simulate.demo import (DEMO_HYPERPARAMETERS, DEMO_SUBJECTS, MARKER, MODELS,
                             build_demo_dataset, compare_with_truth, format_rows, phantom_record,
                             prepare_folder, write_demo_config)
from . import run as vaemap_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vaemap-demo",
        description=("Build the vaemap demo dataset (a synthetic brain phantom with known truth "
                     "and dipy's real small_101D crop) and run the participant pipeline on it "
                     "with every model and the default methods, with a REDUCED epoch budget."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("demo"),
                        help="demo folder: bids/, truth/, out/ (the derivatives), work/")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="torch device of the fits")
    parser.add_argument("--nprocs", type=int, default=None,
                        help="processes Nipype runs at once (default: all CPUs)")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the demo data and work dir of an earlier run (resume) "
                             "instead of rebuilding from scratch")
    parser.add_argument("--subjects", nargs="+", choices=DEMO_SUBJECTS, default=list(DEMO_SUBJECTS),
                        help="which demo subjects to build and process")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom and the fits")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    demo_dir = args.out_dir.absolute()
    start = time.perf_counter()
    try:
        prepare_folder(demo_dir, args.keep)
    except ValueError as exc:
        print(f"vaemap-demo: {exc}", file=sys.stderr)
        return ExitCode.CANTCREAT
    bids, truth, out, work = (demo_dir / s for s in ("bids", "truth", "out", "work"))
    have = all((bids / f"sub-{s}").is_dir() for s in args.subjects)
    have_extras = (("phantom" not in args.subjects or (truth / "truth.json").exists())
                   and ("small101d" not in args.subjects or (demo_dir / "masks").is_dir()))
    if args.keep and have and have_extras:
        print(f"Reusing the demo dataset in {bids}")
        built = None
    else:
        print(f"Building the demo dataset in {bids} (ground truth in {truth}) ...")
        built = build_demo_dataset(demo_dir, args.subjects, seed=args.seed)
    write_json_atomic(demo_dir / MARKER, {"subjects": args.subjects, "seed": args.seed})
    config = write_demo_config(demo_dir / "demo_hyperparameters.yaml")
    budget = ", ".join(f"{m} {o['epochs']}" for m, o in DEMO_HYPERPARAMETERS.items())
    print(f"Epochs are REDUCED for the demo (at most: {budget}; see {config}); full runs use "
          "the packaged defaults, so their maps are smoother.")

    cmd = [str(bids), str(out), "participant", "--participant-label", *args.subjects,
           "--models", *MODELS, "--methods", *DEFAULT_METHODS,
           "-w", str(work), "--config", str(config), "--device", args.device,
           "--seed", str(args.seed)]
    if "small101d" in args.subjects:
        cmd += ["--derivatives", str(demo_dir / "masks")]
    if args.nprocs:
        cmd += ["--nprocs", str(args.nprocs)]
    print("Running: vaemap " + " ".join(cmd), flush=True)
    try:
        code = vaemap_cli.main(cmd)
    except SystemExit as exc:  # a main() that exits rather than returns
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    code = int(code or 0)
    elapsed = time.perf_counter() - start
    if code != 0:
        print(f"vaemap-demo: the participant run failed with exit code {code} "
              f"(logs: {out / 'logs'})", file=sys.stderr)
        return code

    print(f"\nDone in {elapsed / 60:.1f} min. Derivatives: {out}")
    for subject in args.subjects:
        maps = sorted((out / f"sub-{subject}").rglob("*_dwimap.nii.gz"))
        report = out / f"sub-{subject}.html"
        print(f"  sub-{subject}: {len(maps)} maps in {out / f'sub-{subject}' / 'dwi'}")
        print(f"  sub-{subject}: report {report}" + ("" if report.exists() else " (not written)"))
    if "phantom" in args.subjects:
        phantom = built["phantom"] if built else phantom_record(bids, truth)
        rows = compare_with_truth(out, phantom)
        if rows:
            print("\nsub-phantom against its ground truth (demo epochs; brain voxels):")
            print(format_rows(rows))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
