"""The QSM phantom, the MEGRE input checks (one-line errors, exit codes) and the end-to-end graph
with --models qsm (tiny grid, a few DIP iterations through a test --config)."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.cli.run import main
from vaemap_bids.qsm import field as F
from vaemap_bids.qsm.inputs import collect_megre_series, plan_qsm_series
from vaemap_bids.qsm.phantom import make_qsm_phantom, write_megre_dataset

SHAPE = (24, 28, 22)
TINY = dict(shape=SHAPE, voxel_mm=6.0, echo_times_s=(0.004, 0.008, 0.012), seed=2)
STEM = "sub-01/anat/sub-01"


@pytest.fixture(scope="module")
def phantom():
    return make_qsm_phantom(**TINY)


@pytest.fixture(scope="module")
def base(phantom, tmp_path_factory):
    root = tmp_path_factory.mktemp("megre")
    write_megre_dataset(root / "bids", phantom)
    return root


@pytest.fixture
def ds(base, tmp_path):
    shutil.copytree(base / "bids", tmp_path / "bids")
    return tmp_path


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def participant(ds, *extra):
    return (ds / "bids", ds / "out", "participant", "-w", ds / "work", "--nprocs", "1",
            "--skip-bids-validation", "--models", "qsm", *extra)


def assert_error(code, err, expected, *needles):
    assert code == expected, err
    lines = [line for line in err.splitlines() if line.startswith("vaemap: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_phantom_has_the_anatomy_and_exact_truth(phantom):
    p = make_qsm_phantom(echo_times_s=(0.004, 0.008, 0.012))   # the default grid, 2.4 mm
    for name in ("pallidusL", "putamenR", "nigraL", "veins", "calcification", "ventricles"):
        assert p.labels[name].any(), name
    assert p.chi_local[p.labels["pallidusL"]].mean() > 0.1
    assert p.chi_local[p.labels["calcification"]].mean() < 0
    assert not p.chi_local[~p.brain_mask].any()
    # the background field (air/tissue) dominates the local one inside the brain
    assert np.std(p.background_field[p.brain_mask]) > 3 * np.std(p.local_field[p.brain_mask])
    # the phase wraps, and is the wrapped total field (plus a receiver phase and noise)
    assert p.phase.min() < -3 and p.phase.max() > 3
    assert p.magnitude.shape == (64, 72, 56, 3) and phantom.magnitude.shape == SHAPE + (3,)


def test_oblique_phantom_has_the_same_chi_and_a_tilted_field(phantom):
    tilted = make_qsm_phantom(**{**TINY, "oblique_deg": 20.0})
    np.testing.assert_array_equal(tilted.chi_local, phantom.chi_local)
    assert not np.allclose(tilted.affine[:3, :3], phantom.affine[:3, :3])
    assert np.abs(tilted.local_field - phantom.local_field)[phantom.brain_mask].max() > 1e-3


def test_megre_dataset_layout_and_sidecars(base):
    root = base / "bids"
    for n in (1, 2, 3):
        for part in ("mag", "phase"):
            name = root / f"{STEM}_echo-{n}_part-{part}_MEGRE"
            assert (name.parent / (name.name + ".nii.gz")).is_file()
            meta = json.loads((name.parent / (name.name + ".json")).read_text())
            assert meta["EchoTime"] == pytest.approx(TINY["echo_times_s"][n - 1])
            assert meta["MagneticFieldStrength"] == 3.0
    (series,) = collect_megre_series(root)
    plan = plan_qsm_series(series)
    assert plan.echo_times_s == list(TINY["echo_times_s"]) and plan.phase_units == ["rad"] * 3


def test_integer_and_radian_phase_give_the_same_field(phantom, tmp_path):
    from vaemap_bids.qsm.phantom import phase_to_integer
    ints = phase_to_integer(phantom.phase)
    rad = np.stack([F.to_radians(ints[..., e]) for e in range(3)], -1)
    np.testing.assert_allclose(np.angle(np.exp(1j * (rad - phantom.phase))), 0, atol=1e-3)
    mask = phantom.brain_mask
    f_rad, _ = F.multi_echo_field(phantom.magnitude, phantom.phase, TINY["echo_times_s"], 3.0,
                                  mask, phantom.zooms)
    f_int, _ = F.multi_echo_field(phantom.magnitude, rad, TINY["echo_times_s"], 3.0, mask,
                                  phantom.zooms)
    d = (f_int - f_rad)[mask]
    assert np.abs(d - np.median(d)).max() < 0.01 * np.abs(f_rad[mask]).max()
    write_megre_dataset(tmp_path / "ints", phantom, integer_phase=True)
    (series,) = collect_megre_series(tmp_path / "ints")
    assert plan_qsm_series(series).phase_units == ["integer"] * 3


def test_missing_echo_exits_66(capsys, ds):
    for ext in (".nii.gz", ".json"):
        (ds / "bids" / f"{STEM}_echo-2_part-phase_MEGRE{ext}").unlink()
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 66, "echo 2 has no part-phase")
    for ext in (".nii.gz", ".json"):
        for part in ("mag",):
            (ds / "bids" / f"{STEM}_echo-2_part-{part}_MEGRE{ext}").unlink()
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 66, "echo(es) 2", "missing")
    assert not (ds / "out").exists() or not list((ds / "out").glob("sub-*"))


def test_shape_mismatch_exits_65(capsys, ds):
    path = ds / "bids" / f"{STEM}_echo-1_part-phase_MEGRE.nii.gz"
    img = nib.load(path)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:-1], img.affine), path)
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, "does not match the magnitude/phase shape")


def test_missing_echo_time_exits_65(capsys, ds):
    for part in ("mag", "phase"):
        side = ds / "bids" / f"{STEM}_echo-3_part-{part}_MEGRE.json"
        meta = json.loads(side.read_text())
        del meta["EchoTime"]
        side.write_text(json.dumps(meta))
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, "EchoTime")


def test_non_finite_data_exits_65(capsys, ds):
    path = ds / "bids" / f"{STEM}_echo-1_part-mag_MEGRE.nii.gz"
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), path)
    code, err = run_cli(capsys, *participant(ds))
    assert_error(code, err, 65, "NaN/Inf")


def test_single_echo_is_a_warning(caplog, ds):
    for n in (2, 3):
        for part in ("mag", "phase"):
            for ext in (".nii.gz", ".json"):
                (ds / "bids" / f"{STEM}_echo-{n}_part-{part}_MEGRE{ext}").unlink()
    (series,) = collect_megre_series(ds / "bids")
    plan = plan_qsm_series(series)
    assert plan.warnings and "single echo" in plan.warnings[0]


def test_methods_are_checked_per_model_family(capsys, ds):
    code, err = run_cli(capsys, *participant(ds, "--methods", "lsq"))
    assert_error(code, err, 64, "--models qsm needs one of tkd, tv, dip")
    code, err = run_cli(capsys, *participant(ds, "--methods", "tkd", "lsq"))
    assert_error(code, err, 64, "diffusion methods need a diffusion model")
    code, err = run_cli(capsys, ds / "bids", ds / "out", "participant", "--methods", "tkd",
                        "--skip-bids-validation")
    assert_error(code, err, 64, "QSM methods need --models qsm")
    code, err = run_cli(capsys, *participant(ds, "--methods", "tkd", "--models", "qsm", "msdki"))
    assert_error(code, err, 64, "needs one of lsq")


@pytest.mark.slow
def test_end_to_end_graph_writes_the_contracted_files(ds):
    cfg = ds / "fast.yaml"
    cfg.write_text("dip: {max_iter: 20, width: 4, eval_every: 5, patience: 100}\n"
                   "tv: {max_iter: 20}\nqsm: {pdf_max_iter: 10}\n")
    code = main([str(a) for a in participant(ds, "--methods", "tkd", "tv", "dip", "--config",
                                             cfg, "--device", "cpu")])
    assert code == 0
    anat = ds / "out" / "sub-01" / "anat"
    mask = nib.load(anat / "sub-01_desc-brain_mask.nii.gz")
    m = np.asanyarray(mask.dataobj) > 0
    assert m.sum() > 100
    for method in ("tkd", "tv", "dip"):
        name = anat / f"sub-01_model-qsm_desc-{method}_Chimap.nii.gz"
        chi = np.asanyarray(nib.load(name).dataobj)
        assert np.isfinite(chi).all() and not chi[~m].any() and chi[m].std() > 0
        side = json.loads((anat / f"sub-01_model-qsm_desc-{method}_Chimap.json").read_text())
        assert side["Units"] == "ppm" and side["Model"]["FitMethod"] == method
        assert side["B0"] == 3.0 and side["EchoTime"] == list(TINY["echo_times_s"])
        assert "mask" in side["ReferenceRegion"] and side["Model"]["Hyperparameters"]
    local = anat / "sub-01_model-qsm_desc-localfield_fieldmap.nii.gz"
    assert local.is_file()
    assert json.loads(local.with_name(local.name.replace(".nii.gz", ".json")).read_text())[
        "Units"] == "ppm"
    rec = json.loads((ds / "out" / "sub-01" / "log" /
                      "sub-01_model-qsm_desc-qsmrecord_qsm.json").read_text())
    assert rec["methods"]["dip"]["curve"]["iteration"][-1] == 20
    page = (ds / "out" / "sub-01.html").read_text()
    assert 'id="qsm"' in page and "model-qsm_maps.png" in page and "dipcurve" in page
    assert (ds / "out" / "sub-01" / "figures" / "sub-01_model-qsm_maps.png").is_file()
    # the run's settings file resumes it (every node re-used)
    (toml,) = (ds / "work").glob("config-*.toml")
    assert main(["--config-file", str(toml)]) == 0
    # the group level: a QSM table (this dataset has no DWI subject)
    assert main([str(ds / "bids"), str(ds / "out"), "group"]) == 0
    table = (ds / "out" / "group_qsm.tsv").read_text().splitlines()
    assert table[0].startswith("subject\tsession") and len(table) == 4
    assert 'id="qsm"' in (ds / "out" / "group.html").read_text()


@pytest.mark.slow
def test_qsm_runs_beside_a_diffusion_model_in_one_run(phantom, tmp_path):
    from vaemap_bids.simulate.phantom import write_phantom_dataset
    write_phantom_dataset(tmp_path / "bids", tmp_path / "truth", model="msdki",
                          shape=(10, 12, 9), seed=0)
    write_megre_dataset(tmp_path / "bids", phantom)
    cfg = tmp_path / "fast.yaml"
    cfg.write_text("qsm: {pdf_max_iter: 10}\n")
    code = main([str(a) for a in (tmp_path / "bids", tmp_path / "out", "participant", "-w",
                                  tmp_path / "work", "--nprocs", "1", "--skip-bids-validation",
                                  "--models", "msdki", "qsm", "--methods", "lsq", "tkd",
                                  "--config", cfg)])
    assert code == 0
    sub = tmp_path / "out" / "sub-01"
    assert (sub / "anat" / "sub-01_model-qsm_desc-tkd_Chimap.nii.gz").is_file()
    assert not list((sub / "anat").glob("*desc-lsq*")) and not list(sub.glob("dwi/*tkd*"))
    assert list((sub / "dwi").glob("sub-01_model-msdki_desc-lsq_param-msd_dwimap.nii.gz"))
    page = (tmp_path / "out" / "sub-01.html").read_text()
    assert 'id="qsm"' in page and "msdki" in page
