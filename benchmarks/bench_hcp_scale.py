"""An HCP-size subject through the real participant graph: per-node wall time, CPU time and peak
memory, for every model and method.

The subject is generated on the fly (never committed): the HCP WU-Minn grid (145 x 174 x 145 at
1.25 mm) and table (18 b0 + 3 x 90 directions, 288 volumes), the project's MNI-based anatomy
scaled to hold about ``--n-voxels`` brain voxels (0.9 M, as an HCP subject), ball-stick truth
with smooth fields (so that both MS-DKI and ball-stick fit), a smooth S0 and Rician noise
(``--snr`` on the white-matter b0), stored as int16 like scanner data. The volumes are computed
and written one at a time, so generating it needs no more memory than one volume of signals.

    python benchmarks/bench_hcp_scale.py --json benchmarks/out/hcp_scale_cpu.json
    python benchmarks/bench_hcp_scale.py --device cuda --json hcp_scale_gpu.json   # one GPU
    python benchmarks/bench_hcp_scale.py --n-voxels 3000 --epochs 2 --json tiny.json  # a check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from vaemap_bids.atomic import write_json_atomic  # noqa: E402
from vaemap_bids.cli.parser import parse_args  # noqa: E402
from vaemap_bids.cli.run import build_config, run_participant_level, setup_logging  # noqa: E402
from vaemap_bids.fitting.base import METHODS  # noqa: E402
from vaemap_bids.physics import make_model  # noqa: E402
from vaemap_bids.simulate.acquisitions import hcp_acquisition  # noqa: E402
from vaemap_bids.simulate.noise import add_rician_noise  # noqa: E402
from vaemap_bids.simulate.phantom import (TISSUE_LABELS, TISSUE_S0, brain_anatomy,  # noqa: E402
                                          smooth_field, tissue_parameters,
                                          update_participants, write_dataset_description)

sys.path.insert(0, str(Path(__file__).parent))
from _nodes import markdown_rows, monitor_rows  # noqa: E402

HCP_SHAPE = (145, 174, 145)
#: Brain voxels of the anatomy at scale 1 on the HCP grid (measured), to aim at ``--n-voxels``.
BRAIN_AT_SCALE_1 = 1_555_166


def hcp_like_subject(bids_dir: Path, mask_dir: Path, n_voxels: int, snr: float, seed: int,
                     shape=HCP_SHAPE) -> dict:
    """Write ``sub-hcp`` (DWI, bval, bvec) into ``bids_dir`` and its brain mask as a derivative."""
    rng = np.random.default_rng(seed)
    acq = hcp_acquisition()
    if shape == HCP_SHAPE:
        scale = (BRAIN_AT_SCALE_1 / n_voxels) ** (1 / 3)
    else:  # a smaller grid for a quick check: shrink the grid, not the brain
        scale = 1.0
    anatomy = brain_anatomy(shape, orientation="LAS", scale=scale)
    mask = anatomy.mask
    maps = tissue_parameters("ballstick", anatomy, rng, float(acq.bvals.max()))
    model = make_model("ballstick", acq)
    params = np.concatenate([maps["stickfrac"][mask][:, None], maps["dpar"][mask][:, None],
                             maps["diso"][mask][:, None], maps["dir"][mask]], axis=1)
    weights = anatomy.probs[:, mask] / np.maximum(anatomy.probs[:, mask].sum(0), 1e-12)
    s0 = 1000.0 * (weights.T @ np.array([TISSUE_S0["GM"], TISSUE_S0["WM"], TISSUE_S0["CSF"]]))
    s0 *= 1.0 + 0.05 * smooth_field(mask.shape, rng)[mask]
    sigma = 1000.0 / snr
    folder = bids_dir / "sub-hcp" / "dwi"
    folder.mkdir(parents=True, exist_ok=True)
    write_dataset_description(bids_dir, "vaemap HCP-scale benchmark subject")
    update_participants(bids_dir, [{"participant_id": "sub-hcp"}])
    np.savetxt(folder / "sub-hcp_dwi.bval", (acq.bvals * 1e3)[None], fmt="%g")
    np.savetxt(folder / "sub-hcp_dwi.bvec", acq.bvecs.T, fmt="%.6f")
    (folder / "sub-hcp_dwi.json").write_text(json.dumps({"RepetitionTime": 5.52,
                                                          "EchoTime": 0.0895}) + "\n")
    header = nib.Nifti1Header()
    header.set_data_shape((*mask.shape, acq.n_volumes))
    header.set_data_dtype(np.int16)
    header.set_zooms((1.25, 1.25, 1.25, 5.52))
    header.set_qform(anatomy.affine, 1)
    header.set_sform(anatomy.affine, 1)
    header.set_xyzt_units("mm", "sec")
    header.set_slope_inter(1.0, 0.0)
    noise = np.random.default_rng(seed + 1)
    dwi = folder / "sub-hcp_dwi.nii"
    with open(dwi, "wb") as fobj:  # header, then one volume at a time (NIfTI is column-major)
        header.write_to(fobj)
        fobj.write(b"\0" * (int(header.get_data_offset()) - fobj.tell()))
        for t in range(acq.n_volumes):
            signal = s0 * model.forward_numpy(params, acq.bvals[t:t + 1], acq.bvecs[t:t + 1])[:, 0]
            vol = np.zeros(mask.shape, dtype=np.float64)
            vol[mask] = signal
            vol = add_rician_noise(vol / sigma, 1.0, noise) * sigma  # background is noise too
            fobj.write(np.clip(np.rint(vol), 0, 32767).astype("<i2").tobytes(order="F"))
    mask_folder = mask_dir / "sub-hcp" / "dwi"
    mask_folder.mkdir(parents=True, exist_ok=True)
    write_dataset_description(mask_dir, "brain mask", {"DatasetType": "derivative",
                                                       "GeneratedBy": [{"Name": "bench"}]})
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), anatomy.affine, header),
             str(mask_folder / "sub-hcp_desc-brain_mask.nii.gz"))
    return {"dwi": str(dwi), "brain_voxels": int(mask.sum()), "shape": [*mask.shape,
            acq.n_volumes], "tissue_voxels": {t: int((anatomy.labels == v).sum())
                                              for t, v in TISSUE_LABELS.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/vaemap_bench_hcp"))
    parser.add_argument("--n-voxels", type=int, default=900_000,
                        help="brain voxels (default: an HCP subject's 0.9 M); below 100k a "
                             "smaller grid is used")
    parser.add_argument("--snr", type=float, default=25.0)
    parser.add_argument("--models", nargs="+", default=["msdki", "ballstick"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=None,
                        help="at most this many epochs per network (default: the packaged "
                             "defaults)")
    parser.add_argument("--config", type=Path, help="hyper-parameter YAML")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--nprocs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--omp-nthreads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--keep", action="store_true", help="keep the subject and work dir")
    args = parser.parse_args(argv)

    root = args.root
    if root.exists():
        shutil.rmtree(root)
    shape = HCP_SHAPE if args.n_voxels >= 100_000 else \
        tuple(int(round(s * (args.n_voxels / BRAIN_AT_SCALE_1) ** (1 / 3))) + 2 for s in HCP_SHAPE)
    t0 = time.perf_counter()
    subject = hcp_like_subject(root / "bids", root / "masks", args.n_voxels, args.snr,
                               args.seed, shape)
    t_generate = time.perf_counter() - t0
    cli = [str(root / "bids"), str(root / "out"), "participant", "-w", str(root / "work"),
           "--models", *args.models, "--methods", *args.methods, "--device", args.device,
           "--nprocs", str(args.nprocs), "--derivatives", str(root / "masks"),
           "--skip-bids-validation", "--seed", str(args.seed)]
    if args.omp_nthreads:
        cli += ["--omp-nthreads", str(args.omp_nthreads)]
    if args.epochs:
        budget = {"epochs": args.epochs, "warmup_epochs": max(1, args.epochs // 10),
                  "ramp_epochs": max(1, args.epochs // 5)}
        args.config = root / "epochs.yaml"
        args.config.write_text(json.dumps({"ssl": {"epochs": args.epochs}, "vaeunig": budget,
                                           "vaegmm": budget}))
    if args.config:
        cli += ["--config", str(args.config)]
    setup_logging(0)
    config = build_config(parse_args(cli))
    os.chdir(root)  # Nipype's resource monitor writes its .proc-* samples here
    load = os.getloadavg()
    t0 = time.perf_counter()
    run_participant_level(config, resource_monitor=True)
    t_run = time.perf_counter() - t0
    rows = monitor_rows(root / "work")
    records = {p.name: json.loads(p.read_text()) for p in (root / "out").rglob("*_fit.json")}
    report = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load],
                    "load_after": [round(x, 2) for x in os.getloadavg()]},
        "device": config.resolved_device, "nprocs": args.nprocs,
        "omp_nthreads": config.effective_omp_nthreads(), "epochs_budget": args.epochs,
        "subject": subject, "generate_s": round(t_generate, 1), "run_s": round(t_run, 1),
        "nodes": rows,
        "fits": {name: {"timings": r["timings"], "n_voxels": r["n_voxels"],
                        "epochs_run": r["hyperparameters"].get("epochs_run"),
                        "threads": r.get("threads")} for name, r in sorted(records.items())},
        "peak_rss_gb": max((r["peak_rss_gb"] for r in rows if r["peak_rss_gb"] == r["peak_rss_gb"]),
                           default=None),
    }
    write_json_atomic(args.json, report)
    print(f"subject {subject['brain_voxels']} brain voxels x {subject['shape'][-1]} volumes "
          f"(generated in {t_generate:.0f} s); device {report['device']}; participant run "
          f"{t_run:.0f} s; peak RSS {report['peak_rss_gb']} GB")
    print(markdown_rows(rows))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
