"""The faults found probing the BIDS-App as a hostile user and a flaky cluster would (issue 13),
one test each: secrets, runs that produce nothing, dead volumes, locks, symlink cycles, orphaned
workers, huge values, late entity errors, left-over temporaries, and the small items."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.atomic import TEMP_SUFFIX
from vaemap_bids.cli.run import main
from vaemap_bids.dataset.quality import find_bad_volumes
from vaemap_bids.physics import Acquisition


SHAPE = (12, 14, 10)
DWI = "sub-01/dwi/sub-01_dwi"
SLOW_NETWORK = "vaegmm: {epochs: 400, patience: 400, n_posterior_samples: 2}\n"


PHANTOM = {"shape": SHAPE, "seed": 11}  # the ``base`` and ``ds`` fixtures (conftest.py)


def vaemap(ds, *extra, out="out", work="work"):
    return main([str(a) for a in (ds / "bids", ds / out, "participant", "-w", ds / work,
                                  "--nprocs", "1", "--skip-bids-validation", "--models", "msdki",
                                  "--methods", "lsq", *extra)])


def _image(ds):
    img = nib.load(ds / "bids" / f"{DWI}.nii.gz")
    return img, np.asanyarray(img.dataobj).astype(np.float32)


def _save(ds, img, data):
    out = nib.Nifti1Image(data.astype(np.float32), img.affine, img.header)
    out.set_data_dtype(np.float32)  # an int16 header would rescale 1e30 and zero the rest
    nib.save(out, str(ds / "bids" / f"{DWI}.nii.gz"))


def _msd(ds, out="out"):
    return nib.load(ds / out / "sub-01/dwi/sub-01_model-msdki_desc-lsq_param-msd_dwimap.nii.gz"
                    ).get_fdata()


def _start(ds, *extra, env=None):
    """A real vaemap process (MultiProc, 2 workers) running a long network fit."""
    (ds / "slow.yaml").write_text(SLOW_NETWORK)
    cmd = [sys.executable, "-m", "vaemap_bids.cli.run", str(ds / "bids"), str(ds / "out"),
           "participant", "-w", str(ds / "work"), "--skip-bids-validation", "--models",
           "msdki", "--methods", "vaegmm", "--config", str(ds / "slow.yaml"), "--nprocs", "2",
           "--omp-nthreads", "1", "--device", "cpu", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_fit(ds, proc, timeout=240):
    """Until the network fit node has started (its working folder exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list((ds / "work").rglob("fit_msdki_vaegmm/_inputs.pklz")):
            time.sleep(2)
            return
        if proc.poll() is not None:
            pytest.fail(f"vaemap ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail("the fit node never started")


def _files_holding(root: Path, secret: bytes, since: float | None = None) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if not path.is_file() or path.is_symlink():
                continue
            if since is not None and path.stat().st_mtime < since:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if data[:2] == b"\x1f\x8b":
            import gzip
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                pass
        if secret in data:
            hits.append(str(path))
    return hits


# ---- 1. secrets ------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_secret_on_disk_through_sigterm_mid_fit(ds):
    """AWS secrets in the environment, no HCP option, SIGTERM while a network trains: the run
    stops cleanly (143), and no file anywhere (temp dir, work dir, outputs) holds the secret."""
    secret = f"vaemapSECRET{os.getpid()}x{time.time_ns()}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIAVAEMAPTEST0000", AWS_SECRET_ACCESS_KEY=secret,
               AWS_SESSION_TOKEN=secret + "token", NIPYPE_NO_ET="1")
    started = time.time()
    proc = _start(ds, env=env)
    _wait_for_fit(ds, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated; rerun with the same work dir to resume" in err
    for root in (ds, Path(tempfile.gettempdir())):
        assert _files_holding(root, secret.encode(), since=started - 1) == []


# ---- 2. a run that produces nothing ----------------------------------------------------------

def test_bvals_in_ms_per_um2_are_refused(ds, capsys):
    bval = ds / "bids" / f"{DWI}.bval"
    values = np.array(bval.read_text().split(), dtype=float)
    bval.write_text(" ".join(f"{v / 1000:g}" for v in values) + "\n")
    code = main([str(ds / "bids"), str(ds / "out"), "participant", "-w", str(ds / "work"),
                 "--skip-bids-validation"])
    err = capsys.readouterr().err
    assert code == 65 and "all b-values are below 50 s/mm^2" in err and "ms/um^2" in err
    assert not (ds / "out").exists() or not list((ds / "out").glob("sub-*"))


def test_no_model_can_run_means_no_success(ds, capsys):
    """A single-direction, single-shell series: no default model can run, nothing is made."""
    bval, bvec = ds / "bids" / f"{DWI}.bval", ds / "bids" / f"{DWI}.bvec"
    values = np.array(bval.read_text().split(), dtype=float)
    bval.write_text(" ".join("0" if v < 50 else "1000" for v in values) + "\n")
    vecs = np.array([r.split() for r in bvec.read_text().splitlines()], dtype=float)
    vecs[:, values >= 50] = np.array([[1.0], [0.0], [0.0]])
    bvec.write_text("\n".join(" ".join(f"{x:g}" for x in row) for row in vecs) + "\n")
    code = main([str(ds / "bids"), str(ds / "out"), "participant", "-w", str(ds / "work"),
                 "--skip-bids-validation"])
    err = capsys.readouterr().err
    assert code == 65 and "no model can run" in err
    assert not (ds / "out").exists() or not list((ds / "out").glob("sub-*"))


# ---- 3. dead volumes ---------------------------------------------------------------------------

def test_dead_volumes_are_found_and_left_out(ds, capsys):
    assert vaemap(ds, out="clean", work="w0") == 0
    clean = _msd(ds, "clean")
    img, data = _image(ds)
    bvals = np.array((ds / "bids" / f"{DWI}.bval").read_text().split(), dtype=float)
    b0, dw = int(np.flatnonzero(bvals < 50)[1]), int(np.flatnonzero(bvals > 1500)[3])
    data[..., b0] = 0
    data[..., dw] = 0
    _save(ds, img, data)
    capsys.readouterr()
    assert vaemap(ds) == 0
    err = capsys.readouterr().err
    assert f"volume {b0} (b = 0 s/mm^2) left out: no signal" in err and f"volume {dw}" in err
    summary = json.loads((ds / "out/sub-01/log/sub-01_summary.json").read_text())
    assert set(summary["acquisition"]["excluded_volumes"]) == {str(b0), str(dw)}
    assert summary["acquisition"]["n_volumes"] == len(bvals) - 2
    brain = nib.load(ds / "out/sub-01/dwi/sub-01_desc-valid_mask.nii.gz").get_fdata() > 0
    # left out, they do not bias the map (kept, a dead b0 shifted msd by about a quarter)
    assert abs(np.median(_msd(ds)[brain] / clean[brain]) - 1) < 0.03
    report = (ds / "out" / "sub-01.html").read_text()
    assert f"Volume {b0} left out (WARNING)" in report


def test_find_bad_volumes_on_shells():
    rng = np.random.default_rng(0)
    mask = np.zeros((8, 8, 8), bool)
    mask[2:6, 2:6, 2:6] = True
    bvals = np.array([0, 0, 0, 1000, 1000, 1000, 1000, 2000, 2000, 2000, 2000])
    vecs = rng.normal(size=(bvals.size, 3))
    acq = Acquisition.from_smm2(bvals, vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    level = np.where(bvals == 0, 1000.0, np.where(bvals == 1000, 400.0, 200.0))
    thumbs = level[:, None, None, None] * (1 + 0.03 * rng.normal(size=(bvals.size, 8, 8, 8)))
    thumbs[:, ~mask] = 1.0
    assert find_bad_volumes(thumbs, 1, mask, acq) == {}
    thumbs[1] = 0.0                        # a dead b0
    thumbs[5, mask] *= 6.0                 # a weighted volume far above its shell
    bad = find_bad_volumes(thumbs, 1, mask, acq)
    assert set(bad) == {1, 5} and "dead" in bad[1] and "shell" in bad[5]


# ---- 4. locks and provenance -------------------------------------------------------------------

def test_a_second_run_on_the_same_work_dir_exits_75(ds, capsys):
    (ds / "work").mkdir()
    with open(ds / "work" / ".vaemap.lock", "w") as held:   # as a running vaemap holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        t0 = time.monotonic()
        code = vaemap(ds)
        err = capsys.readouterr().err
        assert code == 75 and "another vaemap run (pid 4242)" in err
        assert time.monotonic() - t0 < 30 and not (ds / "out").exists()
    assert vaemap(ds) == 0                                       # released: fine


def test_one_output_dir_never_mixes_seeds(ds, capsys):
    assert vaemap(ds, "--seed", "1") == 0
    before = (ds / "out" / "dataset_description.json").read_text()
    capsys.readouterr()
    code = vaemap(ds, "--seed", "2", work="work2")
    err = capsys.readouterr().err
    assert code == 64 and "--seed 1" in err
    assert (ds / "out" / "dataset_description.json").read_text() == before


def test_a_raw_dataset_as_output_dir_is_refused(ds, capsys):
    raw = ds / "raw"
    shutil.copytree(ds / "bids", raw)
    before = (raw / "dataset_description.json").read_text()
    code = main([str(ds / "bids"), str(raw), "participant", "-w", str(ds / "work"),
                 "--skip-bids-validation", "--methods", "lsq"])
    err = capsys.readouterr().err
    assert code == 64 and "raw BIDS dataset" in err
    assert (raw / "dataset_description.json").read_text() == before


# ---- 5. symlink cycles ---------------------------------------------------------------------------

def test_symlink_cycles_are_not_followed(ds, capsys):
    os.symlink("..", ds / "bids" / "sub-01" / "dwi" / "loop")
    os.symlink("../../..", ds / "bids" / "sub-01" / "dwi" / "up")
    t0 = time.monotonic()
    assert vaemap(ds) == 0
    err = capsys.readouterr().err
    assert time.monotonic() - t0 < 120
    assert "loop: a symbolic link back to" in err and "not followed" in err
    assert max(len(line) for line in err.splitlines()) < 400


# ---- 6. orphaned workers -------------------------------------------------------------------------

@pytest.mark.slow
def test_workers_die_with_a_killed_main_process(ds):
    psutil = pytest.importorskip("psutil")
    proc = _start(ds, env=dict(os.environ, NIPYPE_NO_ET="1"))
    _wait_for_fit(ds, proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "MultiProc started no worker"
    proc.kill()                                     # SIGKILL: no handler runs
    proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} workers outlived the killed vaemap process"


# ---- 7. huge values ------------------------------------------------------------------------------

def test_huge_values_are_excluded_like_nonfinite_ones(ds, capsys):
    img, data = _image(ds)
    truth = nib.load(ds / "truth" / "sub-01" / "dwi" / "sub-01_desc-brain_mask.nii.gz")
    inside = np.argwhere(np.asanyarray(truth.dataobj) > 0)
    inside = inside[np.argsort(np.abs(inside - inside.mean(0)).sum(1))[:3]]  # deep inside
    for i, j, k in inside:
        data[i, j, k, 4] = 1e30
    _save(ds, img, data)
    (ds / "fast.yaml").write_text("ssl: {epochs: 5}\n")
    assert vaemap(ds, "--methods", "lsq", "ssl", "--config", ds / "fast.yaml") == 0
    valid = nib.load(ds / "out/sub-01/dwi/sub-01_desc-valid_mask.nii.gz").get_fdata()
    assert all(valid[tuple(v)] == 0 for v in inside)
    side = json.loads((ds / "out/sub-01/dwi/sub-01_desc-valid_mask.json").read_text())
    assert side["ExcludedVoxels"]["implausible"] == 3
    assert (ds / "out" / "sub-01.html").is_file()


def test_a_failed_fit_keeps_the_other_fits_report(ds, capsys, monkeypatch):
    import vaemap_bids.fitting.train as train

    def broken(*args, **kwargs):
        raise RuntimeError("training diverged")

    monkeypatch.setattr(train, "fit_network", broken)
    (ds / "linear.yml").write_text("plugin: Linear\n")
    code = vaemap(ds, "--methods", "lsq", "ssl", "--use-plugin", ds / "linear.yml")
    assert code == 1
    assert (ds / "out" / "sub-01.html").is_file()
    assert "Incomplete outputs" in (ds / "out" / "sub-01.html").read_text()
    assert (ds / "out/sub-01/dwi/sub-01_model-msdki_desc-lsq_param-msd_dwimap.nii.gz").is_file()


# ---- 8. an invalid entity, found before anything is written --------------------------------------

def test_a_bad_file_name_is_refused_before_any_output(ds, capsys):
    for ext in (".nii.gz", ".bval", ".bvec"):
        shutil.copy(ds / "bids" / f"{DWI}{ext}", ds / "bids" / f"sub-01/dwi/sub-01_acq-a b_dwi{ext}")
    code = vaemap(ds)
    err = capsys.readouterr().err
    assert code == 65 and "acq-a b_dwi.nii.gz: not a BIDS file name" in err
    assert not (ds / "out").exists()


# ---- 9. small items ------------------------------------------------------------------------------

def test_temporaries_of_a_killed_run_are_removed_and_never_look_like_images(ds):
    assert vaemap(ds) == 0
    left = ds / "out" / "sub-01" / "dwi" / f".sub-01_x.nii.gz.abc123{TEMP_SUFFIX}"
    left.write_bytes(b"")                           # what a SIGKILL mid-write leaves
    assert not left.name.endswith(".nii.gz")
    assert vaemap(ds) == 0
    assert not left.exists() and not list((ds / "out").rglob(f"*{TEMP_SUFFIX}"))


def test_a_constant_image_exits_65(ds, capsys):
    img, data = _image(ds)
    _save(ds, img, np.full_like(data, 100.0))
    code = vaemap(ds)
    err = capsys.readouterr().err
    assert code == 65 and "median_otsu found no brain voxel" in err and "sub-01_dwi" in err


def test_a_constant_signal_in_the_brain_warns_about_bounds(ds, capsys):
    img, data = _image(ds)
    brain = np.asanyarray(nib.load(ds / "truth/sub-01/dwi/sub-01_desc-brain_mask.nii.gz"
                                   ).dataobj) > 0
    data[brain] = 800.0                             # no decay with b: D at its lower bound
    _save(ds, img, data)
    given = ds / "masks" / "sub-01" / "dwi"
    given.mkdir(parents=True)
    shutil.copy(ds / "truth/sub-01/dwi/sub-01_desc-brain_mask.nii.gz", given)
    assert vaemap(ds, "--derivatives", ds / "masks") == 0
    err = capsys.readouterr().err
    assert "msdki/lsq:" in err and "at a bound of its range" in err


def test_a_stray_folder_with_a_non_bids_label_is_named_and_ignored(ds, capsys):
    stray = ds / "bids" / "sub-ü1" / "dwi"
    stray.mkdir(parents=True)
    for ext in (".nii.gz", ".bval", ".bvec"):
        shutil.copy(ds / "bids" / f"{DWI}{ext}", stray / f"sub-ü1_dwi{ext}")
    assert vaemap(ds) == 0
    err = capsys.readouterr().err
    assert "sub-ü1: not a BIDS subject folder" in err
    assert not (ds / "out" / "sub-ü1").exists()


# ---- 10. from the newcomer run -------------------------------------------------------------------

def test_newcomer_items(ds, capfd):
    """A small mask is flagged; fit log lines name the series; the report's times are the
    series' own; --help shows each default once; validator warnings are listed."""
    img, data = _image(ds)
    bigger = np.zeros((30, 30, 24, data.shape[3]), np.float32)   # a head in a large field of view
    bigger[:SHAPE[0], :SHAPE[1], :SHAPE[2]] = data
    _save(ds, img, bigger)
    (ds / "fast.yaml").write_text("ssl: {epochs: 3}\n")
    code = main([str(ds / "bids"), str(ds / "out"), "participant", "-w", str(ds / "work"),
                 "--nprocs", "1", "--models", "msdki", "--methods", "lsq", "ssl", "--config",
                 str(ds / "fast.yaml")])
    err = capfd.readouterr().err  # fd level: the fit's log line comes from a worker process
    assert code == 0, err
    assert "brain mask covers only" in err
    assert "sub-01: msdki/ssl:" in err                  # the fit's own log line names the series
    report = (ds / "out" / "sub-01.html").read_text()
    assert "Fitting time of this series" in report and "Total run time" not in report
    listed = ds / "out" / "logs" / "bids-validator-warnings.json"
    if "bids-validator-deno" in err:                    # pybids' fallback gives no warnings
        assert listed.is_file() and json.loads(listed.read_text())["warnings"]
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capfd.readouterr().out
    entries, current = [], []
    for line in text.splitlines():          # one entry per option: it starts at indent 2
        if line.startswith("  ") and not line.startswith("   ") and current:
            entries.append(" ".join(current))
            current = []
        current.append(line.strip())
    entries.append(" ".join(current))
    assert "(default: None)" not in text
    assert all(entry.count("(default") <= 1 for entry in entries), entries
