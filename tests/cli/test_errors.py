"""Every bad input: one clear line naming the file and the problem, the documented exit code,
no traceback, and nothing written into OUTPUT_DIR's subject folders."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from vaemap_bids.atomic import TEMP_SUFFIX
from vaemap_bids.cli.run import main


SHAPE = (10, 12, 9)


PHANTOM = {"shape": SHAPE, "seed": 7}  # the ``base`` and ``ds`` fixtures (conftest.py)


DWI = "sub-01/dwi/sub-01_dwi"


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def assert_error(code, err, expected_code, *needles):
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("vaemap: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def assert_nothing_written(out):
    assert not list(out.glob("sub-*")) if out.exists() else True


def participant(ds, *extra):
    return (ds / "bids", ds / "out", "participant", "-w", ds / "work", "--nprocs", "1",
            "--skip-bids-validation", *extra)


def test_missing_bval(capsys, ds):
    (ds / "bids" / f"{DWI}.bval").unlink()
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 66, f"{DWI}.bval", "not found")
    assert_nothing_written(ds / "out")


def test_mismatched_bval_count(capsys, ds):
    path = ds / "bids" / f"{DWI}.bval"
    path.write_text(" ".join(path.read_text().split()[:-1]) + "\n")
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, "bvec", "b-values")
    assert_nothing_written(ds / "out")


def test_mismatched_bvec(capsys, ds):
    path = ds / "bids" / f"{DWI}.bvec"
    rows = [r.split()[:-2] for r in path.read_text().splitlines()]
    path.write_text("\n".join(" ".join(r) for r in rows) + "\n")
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, f"{DWI}.bvec", "gradient directions")


def test_3d_image(capsys, ds):
    path = ds / "bids" / f"{DWI}.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine), str(path))
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, f"{DWI}.nii.gz", "4-D")
    assert_nothing_written(ds / "out")


def test_corrupt_gzip(capsys, ds):
    path = ds / "bids" / f"{DWI}.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, f"{DWI}.nii.gz", "corrupt or truncated")
    assert_nothing_written(ds / "out")


def test_zero_b0(capsys, ds):
    path = ds / "bids" / f"{DWI}.nii.gz"
    bvals = np.loadtxt(ds / "bids" / f"{DWI}.bval")
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data[..., bvals < 50] = 0
    nib.save(nib.Nifti1Image(data, img.affine, img.header), str(path))
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, f"{DWI}.nii.gz", "b0")
    assert_nothing_written(ds / "out")


def test_no_b0_volume(capsys, ds):
    path = ds / "bids" / f"{DWI}.bval"
    path.write_text(" ".join("1000" if float(b) < 50 else b for b in path.read_text().split()))
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, f"{DWI}.bval", "no b0")


def test_nonfinite_voxels_are_excluded_and_reported(capsys, ds):
    path = ds / "bids" / f"{DWI}.nii.gz"
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    centre = tuple(s // 2 for s in SHAPE)
    data[centre + (3,)] = np.nan
    data[(centre[0] + 1,) + centre[1:] + (0,)] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    code, err = run_cli(capsys, *participant(ds, "--models", "msdki", "--methods", "lsq"))
    assert code == 0, err
    assert "NaN/Inf" in err
    summary = json.loads((ds / "out/sub-01/log/sub-01_summary.json").read_text())
    assert summary["mask"]["excluded_nonfinite"] == 2
    # excluded voxels stay in the brain mask, are 0 in the validity mask and 0 in every map
    mask = nib.load(ds / "out/sub-01/dwi/sub-01_desc-brain_mask.nii.gz").get_fdata()
    valid = nib.load(ds / "out/sub-01/dwi/sub-01_desc-valid_mask.nii.gz").get_fdata() > 0
    assert mask[centre] == 1 and not valid[centre] and valid.sum() == mask.sum() - 2
    msd = nib.load(ds / "out/sub-01/dwi/sub-01_model-msdki_desc-lsq_param-msd_dwimap.nii.gz")
    assert msd.get_fdata()[centre] == 0 and (msd.get_fdata()[valid] > 0).all()
    side = json.loads((ds / "out/sub-01/dwi/sub-01_desc-valid_mask.json").read_text())
    assert side["ExcludedVoxels"] == {"nonfinite": 2, "implausible": 0, "nonpositive_b0": 0}


def _single_shell(ds):
    bval = ds / "bids" / f"{DWI}.bval"
    values = np.array(bval.read_text().split(), dtype=float)
    keep = values < 1500
    bval.write_text(" ".join(f"{v:g}" for v in values[keep]) + "\n")
    bvec = ds / "bids" / f"{DWI}.bvec"
    rows = np.array([r.split() for r in bvec.read_text().splitlines()], dtype=float)[:, keep]
    bvec.write_text("\n".join(" ".join(f"{v:.6f}" for v in r) for r in rows) + "\n")
    path = ds / "bids" / f"{DWI}.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., keep], img.affine, img.header),
             str(path))


def test_single_shell_with_explicit_msdki(capsys, ds):
    _single_shell(ds)
    code, err = run_cli(capsys, *participant(ds, "--models", "msdki"))
    assert_error(code, err, 65, f"{DWI}.nii.gz", "--models msdki", "two non-zero shells")
    assert_nothing_written(ds / "out")


def test_single_shell_default_models_skip_msdki(capsys, ds):
    _single_shell(ds)
    code, err = run_cli(capsys, *participant(ds, "--methods", "lsq"))
    assert code == 0, err
    assert "msdki skipped" in err
    summary = json.loads((ds / "out/sub-01/log/sub-01_summary.json").read_text())
    assert summary["models"]["msdki"]["status"] == "skipped"
    assert "two non-zero shells" in summary["models"]["msdki"]["reason"]
    assert summary["models"]["ballstick"] == {"status": "ran", "reason": None,
                                             "methods": ["lsq"], "n_measurements": 26}
    assert not list((ds / "out/sub-01/dwi").glob("*model-msdki*"))


def test_unknown_participant(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--participant-label", "sub-99"))
    assert_error(code, err, 18, "99", "not found")


def test_bids_dir_missing(capsys, tmp_path):
    code, err = run_cli(capsys, tmp_path / "nope", tmp_path / "out", "participant")
    assert_error(code, err, 66, tmp_path / "nope", "BIDS_DIR")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_dir_in_bids_dir(capsys, ds, where):
    out = ds / "bids" if where == "same" else ds / "bids" / "derivatives" / "vaemap"
    code, err = run_cli(capsys, ds / "bids", out, "participant", "-w", ds / "work")
    assert_error(code, err, 64, "OUTPUT_DIR", "inside")
    assert not (ds / "bids" / "derivatives").exists()
    assert not (ds / "bids" / "dataset_description.json").read_text().count("derivative")


def test_unwritable_output_dir(capsys, ds):
    blocker = ds / "a_file"
    blocker.write_text("not a folder")
    code, err = run_cli(capsys, *participant(ds)[:1], blocker / "out", "participant", "-w",
                        ds / "work", "--skip-bids-validation")
    assert_error(code, err, 73, blocker / "out", "cannot create")


@pytest.mark.parametrize("label", ["../01", "01/../02", "sub-0/1"])
def test_label_with_path_characters(capsys, ds, label):
    code, err = run_cli(capsys, *participant(ds, "--participant-label", label))
    assert_error(code, err, 64, "--participant-label", "letters and digits")


def test_session_label_with_dots(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--session-label", ".."))
    assert_error(code, err, 64, "--session-label")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--device", "cuda"))
    assert_error(code, err, 75, "cuda", "no fall-back")
    assert_nothing_written(ds / "out")


def test_unknown_analysis_level(capsys, ds):
    code, err = run_cli(capsys, ds / "bids", ds / "out", "subject")
    assert_error(code, err, 17, "subject")


def test_bad_flag_is_usage_error(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--nprocs", "zero"))
    assert_error(code, err, 64, "--nprocs")
    code, err = run_cli(capsys, *participant(ds, "--methods", "magic"))
    assert_error(code, err, 64, "magic")


def test_invalid_bids_dataset(capsys, ds):
    (ds / "bids" / "sub-01" / "dwi" / "sub-01_notes.txt").write_text("")
    code, err = run_cli(capsys, ds / "bids", ds / "out", "participant", "-w", ds / "work")
    assert_error(code, err, 16, "BIDS validation failed", "sub-01_notes.txt")
    assert_nothing_written(ds / "out")


def test_config_file_missing_or_wrong(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--config", ds / "nope.yaml"))
    assert_error(code, err, 66, "nope.yaml", "not found")
    bad = ds / "bad.yaml"
    bad.write_text("vaegmm:\n  epoch: 3\n")
    code, err = run_cli(capsys, *participant(ds, "--config", bad))
    assert_error(code, err, 64, "bad.yaml", "epoch")
    # a known option with a bad value is refused before any work starts, not by a failing node
    for text, option in (("ssl:\n  lr: -1\n", "lr"), ("lsq@msdki:\n  solver: magic\n", "solver"),
                         ("vaegmm:\n  noise_model: poisson\n", "noise_model"),
                         ("lsq:\n  noise_model: rician\n  n_coils: 4\n", "ncchi")):
        bad.write_text(text)
        code, err = run_cli(capsys, *participant(ds, "--config", bad))
        assert_error(code, err, 64, "bad.yaml", option)
        assert_nothing_written(ds / "out")


def test_derivatives_missing_or_mask_on_wrong_grid(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--derivatives", ds / "nope"))
    assert_error(code, err, 66, "nope", "--derivatives")
    deriv = ds / "qsiprep" / "sub-01" / "dwi"
    deriv.mkdir(parents=True)
    mask = deriv / "sub-01_desc-brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(mask))
    code, err = run_cli(capsys, *participant(ds, "--derivatives", ds / "qsiprep"))
    assert_error(code, err, 65, mask, "does not match the DWI grid")


def test_plugin_file_missing_or_wrong(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--use-plugin", ds / "nope.yml"))
    assert_error(code, err, 66, "nope.yml")
    bad = ds / "plugin.yml"
    bad.write_text("plugin_args: {}\n")
    code, err = run_cli(capsys, *participant(ds, "--use-plugin", bad))
    assert_error(code, err, 64, "plugin.yml", "plugin: NAME")


def test_verbose_debug_shows_traceback(capsys, ds):
    (ds / "bids" / f"{DWI}.bval").unlink()
    code, err = run_cli(capsys, *participant(ds, "-vv"))
    assert code == 66 and "Traceback" in err


def test_failing_node_exits_1_with_crash_file(capsys, ds, monkeypatch):
    """A fit that fails inside the graph: exit 1, one line naming the crash files, and no maps
    of that fit (the mask, checked and written first, is complete). The Linear plugin runs the
    nodes in this process, so the patched trainer is the one that fails."""
    import vaemap_bids.fitting.train as train

    def broken(*args, **kwargs):
        raise RuntimeError("training diverged")

    monkeypatch.setattr(train, "fit_network", broken)
    plugin = ds / "linear.yml"
    plugin.write_text("plugin: Linear\n")
    code, err = run_cli(capsys, *participant(ds, "--models", "msdki", "--methods", "ssl",
                                             "--use-plugin", plugin))
    assert_error(code, err, 1, "the workflow failed", "crash file")
    assert list((ds / "out" / "logs").glob("crash-*"))
    assert not list((ds / "out").rglob("*_dwimap.nii.gz"))
    assert not list((ds / "out").rglob(f".*{TEMP_SUFFIX}"))
