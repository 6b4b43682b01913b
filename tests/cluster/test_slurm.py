"""`vaemap ... --use-plugin slurm_plugin.yml` on a real (one-node, localhost) SLURM cluster.

The shipped plugin file is used unchanged: the node declares enough CPUs and memory for its
sbatch arguments (see slurm_cluster.py). The same phantom is fitted once with MultiProc and once
through SLURM, and the maps must be the same bytes: a node's result must not depend on where it
ran. Skipped, with the reason, where slurm-wlm/munge are not installed or the suite is not root
(scripts/test.sh installs them as root).
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import NODE, LocalSlurm, unavailable_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SLURM_PLUGIN = REPO / "vaemap_bids" / "data" / "slurm_plugin.yml"
METHODS = ("lsq", "ssl")
# a small, fast run: a few hundred brain voxels, one network trained for a few epochs
FAST_CONFIG = {"lsq": {"max_iter": 30}, "ssl": {"epochs": 3, "batch_size": 64}}


def vaemap_command() -> list[str]:
    script = Path(sys.executable).with_name("vaemap")
    return [str(script)] if script.exists() else [shutil.which("vaemap") or "vaemap"]


def run_vaemap(bids: Path, out: Path, work: Path, extra: list[str], env: dict, cwd: Path):
    argv = vaemap_command() + [
        str(bids), str(out), "participant", "-w", str(work), "--models", "msdki",
        "--methods", *METHODS, "--config", str(cwd / "fast.yaml"), "--nprocs", "2",
        "--omp-nthreads", "1", "--device", "cpu", "--seed", "3", "--skip-bids-validation",
        *extra]
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def sbatch_options(args: str) -> dict[str, str]:
    """'--time=02:00:00 --cpus-per-task=4' -> {'--time': '02:00:00', '--cpus-per-task': '4'}"""
    return dict(token.split("=", 1) for token in args.split() if token.startswith("--"))


def nifti_files(root: Path) -> dict[str, bytes]:
    """Every NIfTI under root, decompressed (gzip's own header holds a time stamp)."""
    return {str(p.relative_to(root)): gzip.decompress(p.read_bytes())
            for p in sorted(root.rglob("*.nii.gz"))}


@pytest.fixture
def cluster():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    # a short folder of its own: munged's socket path must stay under the 108-byte UNIX limit
    root = Path(tempfile.mkdtemp(prefix="vaemap-slurm-"))
    try:
        with LocalSlurm(root) as running:
            yield running
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(1200)
def test_participant_run_through_slurm_equals_multiproc(cluster, tmp_path):
    from vaemap_bids.simulate.phantom import write_phantom_dataset

    bids = tmp_path / "bids"
    write_phantom_dataset(bids, tmp_path / "truth", subjects=("01",), model="msdki",
                          shape=(12, 14, 10), snr=40.0, seed=3)
    (tmp_path / "fast.yaml").write_text(yaml.safe_dump(FAST_CONFIG))
    env = dict(os.environ, NIPYPE_NO_ET="1", MPLBACKEND="Agg", PYTHONHASHSEED="0")
    env.setdefault("LOGNAME", "vaemap")  # Nipype's SLURM plugin names jobs after LOGNAME

    started = time.monotonic()
    local = run_vaemap(bids, tmp_path / "out_multiproc", tmp_path / "work_multiproc", [],
                       env, tmp_path)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    multiproc_s = time.monotonic() - started
    assert not cluster.completed_jobs(), "MultiProc must not submit jobs"

    started = time.monotonic()
    slurm = run_vaemap(bids, tmp_path / "out_slurm", tmp_path / "work_slurm",
                       ["--use-plugin", str(SLURM_PLUGIN)], cluster.env(env), tmp_path)
    slurm_s = time.monotonic() - started
    assert slurm.returncode == 0, (slurm.stdout[-3000:] + slurm.stderr[-3000:] + "\n"
                                   + cluster.logs())
    print(f"MultiProc run {multiproc_s:.1f} s, SLURM run {slurm_s:.1f} s")

    # every node that Nipype submitted finished as a SLURM job, with the plugin file's arguments
    cluster.wait_idle()
    jobs = cluster.completed_jobs()
    assert jobs, "no job in the job-completion log\n" + cluster.logs()
    plugin_args = yaml.safe_load(SLURM_PLUGIN.read_text())["plugin_args"]
    requested = sbatch_options(plugin_args["sbatch_args"])
    hours, minutes, seconds = (int(v) for v in requested["--time"].split(":"))
    for job in jobs:
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["NodeList"] == NODE, job
        # the job-completion log gives the CPUs and the time limit (in minutes) it ran with
        assert job["ProcCnt"] == requested["--cpus-per-task"], job
        assert int(job["TimeLimit"]) == hours * 60 + minutes + (seconds > 0), job
    # Nipype's job name is '<node>.<workflow>...<LOGNAME>'; match the fit nodes loosely (any
    # node whose name says fit and the method), as node names may change
    nodes = [job["Name"].split(".")[0] for job in jobs]
    for method in METHODS:
        assert any("fit" in node and method in node for node in nodes), (method, nodes)
    print(f"{len(jobs)} SLURM jobs: {sorted(nodes)}")

    # the same maps, bit for bit
    maps_local = nifti_files(tmp_path / "out_multiproc")
    maps_slurm = nifti_files(tmp_path / "out_slurm")
    assert set(maps_slurm) == set(maps_local)
    for method in METHODS:
        assert any(method in Path(name).name for name in maps_local), (method, sorted(maps_local))
    differ = [name for name in maps_local if maps_local[name] != maps_slurm[name]]
    assert not differ, f"maps differ between MultiProc and SLURM: {differ}"
