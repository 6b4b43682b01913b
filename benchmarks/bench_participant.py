"""A full ``vaemap participant`` run on a phantom of about 100k brain voxels: wall time and peak
memory of every Nipype node.

Per-node figures come from Nipype's resource monitor when psutil is installed (any plugin);
otherwise the graph runs under the Linear plugin (one node at a time, in this process) and a
status callback measures each node's wall time and peak resident memory from /proc (the
kernel's high-water mark, reset at each node's start). Both are written to JSON and printed as a
Markdown table.

    python benchmarks/bench_participant.py                       # defaults, CPU
    python benchmarks/bench_participant.py --device cuda --json gpu.json
    python benchmarks/bench_participant.py --shape 24 28 20 --config fast.yaml   # a quick look
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

from vaemap_bids.cli.parser import parse_args  # noqa: E402
from vaemap_bids.cli.run import build_config, run_participant_level, setup_logging  # noqa: E402
from vaemap_bids.simulate.phantom import write_phantom_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _nodes import NodeMeter, markdown_rows, monitor_rows  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/vaemap_bench_participant"))
    parser.add_argument("--shape", type=int, nargs=3, default=(60, 72, 60),
                        help="phantom grid (60 72 60 holds about 100k brain voxels)")
    parser.add_argument("--data-model", default="msdki", choices=("msdki", "ballstick"))
    parser.add_argument("--models", nargs="+", default=["msdki", "ballstick"])
    parser.add_argument("--methods", nargs="+", default=["lsq", "ssl", "vaeunig", "vaegmm"])
    parser.add_argument("--config", type=Path, help="hyper-parameter YAML (default: packaged)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="a reduced training budget: every network method runs at most this "
                             "many epochs (KL warm-up and ramp scaled to it); overrides --config")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--nprocs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--plugin", default=None, choices=("Linear", "MultiProc"),
                        help="default: MultiProc when psutil is installed, else Linear")
    parser.add_argument("--json", type=Path, default=None, help="where to write the figures")
    parser.add_argument("--keep", action="store_true", help="keep the phantom and work dir")
    args = parser.parse_args(argv)

    try:
        import psutil  # noqa: F401
        have_psutil = True
    except ImportError:
        have_psutil = False
    plugin = args.plugin or ("MultiProc" if have_psutil else "Linear")
    if plugin == "MultiProc" and not have_psutil:
        parser.error("per-node memory under MultiProc needs psutil (Nipype's resource monitor)")

    root = args.root
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    phantom = write_phantom_dataset(root / "bids", root / "truth", model=args.data_model,
                                    shape=tuple(args.shape), seed=0)
    t_phantom = time.perf_counter() - t0
    dwi = nib.load(phantom["series"][0]["dwi"])
    brain = int((nib.load(phantom["series"][0]["mask"]).get_fdata() > 0).sum())

    cli = [str(root / "bids"), str(root / "out"), "participant", "-w", str(root / "work"),
           "--models", *args.models, "--methods", *args.methods, "--device", args.device,
           "--nprocs", str(args.nprocs)]
    if args.epochs:
        vae = {"epochs": args.epochs, "warmup_epochs": max(1, args.epochs // 10),
               "ramp_epochs": max(1, args.epochs // 5)}
        args.config = root / "epochs.yaml"
        args.config.write_text(json.dumps({"ssl": {"epochs": args.epochs}, "vaeunig": vae,
                                           "vaegmm": vae}))
    if args.config:
        cli += ["--config", str(args.config)]
    if plugin == "Linear":
        plugin_file = root / "linear.yml"
        plugin_file.write_text("plugin: Linear\n")
        cli += ["--use-plugin", str(plugin_file)]
    setup_logging(0)
    config = build_config(parse_args(cli))
    meter = NodeMeter()
    # Nipype's resource monitor writes its .proc-* samples into the current directory
    os.chdir(root)
    t0 = time.perf_counter()
    plans = run_participant_level(config, status_callback=meter if plugin == "Linear" else None,
                                  resource_monitor=have_psutil)
    t_total = time.perf_counter() - t0

    rows = monitor_rows(root / "work") if have_psutil else list(meter.rows.values())
    summary_file = next((root / "out").rglob("*_summary.json"))
    summary = json.loads(summary_file.read_text())
    records = {p.name: json.loads(p.read_text()) for p in (root / "out").rglob("*_fit.json")}
    report = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "cpus": os.cpu_count(), "note": "shared machine; other jobs ran meanwhile"},
        "epochs_budget": args.epochs, "plugin": plugin, "memory_source": ("nipype resource monitor" if have_psutil else
                                            "/proc VmHWM per node (Linear plugin)"),
        "device": config.resolved_device, "nprocs": args.nprocs,
        "phantom": {"shape": list(dwi.shape), "brain_voxels": brain,
                    "mask_voxels": summary["mask"]["n_voxels"], "write_s": round(t_phantom, 2)},
        "run_s": round(t_total, 2), "nodes": rows,
        "fits": {name: {"timings": r["timings"], "n_voxels": r["n_voxels"],
                        "epochs_run": r["hyperparameters"].get("epochs_run")}
                 for name, r in records.items()},
        "models": {m: d["status"] for m, d in summary["models"].items()},
        "series": [p.series.prefix for p in plans],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"phantom {report['phantom']}; plugin {plugin}; device {report['device']}; "
          f"total {report['run_s']} s")
    print(markdown_rows(rows))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
