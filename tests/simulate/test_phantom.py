"""The synthetic BIDS phantom and the dipy small_101D converter."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.atomic import TEMP_SUFFIX
from vaemap_bids.physics import Acquisition, make_model
from vaemap_bids.simulate.phantom import (TISSUE_LABELS, ballstick_cumulants, bvec_frame,
                                          demo_acquisition, write_phantom_dataset)


def _validator() -> str | None:
    exe = Path(sys.executable).parent / "bids-validator-deno"
    return str(exe) if exe.exists() else shutil.which("bids-validator-deno")


def run_validator(bids_dir) -> dict:
    """The deno BIDS validator's JSON report, or skip when it cannot run here."""
    exe = _validator()
    if exe is None:
        pytest.skip("bids-validator-deno is not installed")
    try:
        proc = subprocess.run([exe, str(bids_dir), "--format", "json"], capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("bids-validator-deno did not finish within 120 s")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.skip(f"bids-validator-deno gave no JSON report (offline?): {proc.stderr[-300:]}")


def validator_errors(report: dict) -> list[str]:
    return [f"{i.get('code')} {i.get('location')}" for i in report["issues"]["issues"]
            if i.get("severity") == "error"]


@pytest.fixture(scope="module")
def msdki_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("msdki")
    return write_phantom_dataset(root / "bids", root / "truth")


@pytest.fixture(scope="module")
def ballstick_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("ballstick")
    return write_phantom_dataset(root / "bids", root / "truth", model="ballstick",
                                 subjects=("01", "02"), sessions=("pre", "post"), runs=(1, 2),
                                 acq_label="multishell", dtype="float32", shape=(16, 18, 14),
                                 snr=50.0, orientation="RAS")


def _read_series(series):
    img = nib.load(series["dwi"])
    bvals = np.loadtxt(series["bval"], ndmin=1)
    bvecs = np.loadtxt(series["bvec"], ndmin=2)
    return img, bvals, bvecs


def test_layout_and_files(msdki_phantom):
    bids = msdki_phantom["bids_dir"]
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"] and desc["Name"]
    assert (bids / "README").read_text().strip()
    assert (bids / "participants.tsv").read_text().splitlines()[1].split("\t")[0] == "sub-01"
    (series,) = msdki_phantom["series"]
    assert Path(series["dwi"]).relative_to(bids).as_posix() == "sub-01/dwi/sub-01_dwi.nii.gz"
    sidecar = json.loads(Path(series["json"]).read_text())
    assert sidecar["PhaseEncodingDirection"] in ("i", "i-", "j", "j-", "k", "k-")
    assert 0.01 < sidecar["TotalReadoutTime"] < 0.2
    assert 1.0 < sidecar["RepetitionTime"] < 20.0 and 0.02 < sidecar["EchoTime"] < 0.2
    # The truth sits outside the BIDS folder.
    truth_dir = msdki_phantom["truth_dir"]
    assert bids not in truth_dir.parents and truth_dir != bids
    for path in [*series["truth"].values(), series["mask"], series["dseg"], series["s0"]]:
        assert Path(path).is_file() and truth_dir in Path(path).parents
    assert Path(series["truth"]["msd"]).name == "sub-01_model-msdki_desc-truth_param-msd_dwimap.nii.gz"
    assert not list(bids.rglob(f".*{TEMP_SUFFIX}"))


def test_signal_shape_dtype_and_gradients(msdki_phantom):
    (series,) = msdki_phantom["series"]
    img, bvals, bvecs = _read_series(series)
    acq = demo_acquisition()
    assert img.shape == (24, 28, 20, acq.n_volumes)
    assert img.get_data_dtype() == np.int16 and np.asarray(img.dataobj).dtype == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    data = np.asarray(img.dataobj)
    assert data.min() >= 0
    assert bvals.shape == (img.shape[3],) and bvecs.shape == (3, img.shape[3])
    np.testing.assert_allclose(bvals, acq.bvals * 1e3)
    norms = np.linalg.norm(bvecs, axis=0)
    np.testing.assert_allclose(norms[bvals > 50], 1.0, atol=1e-5)
    np.testing.assert_allclose(norms[bvals <= 50], 0.0)
    # Interleaved: b0s are spread through the series, shells alternate.
    b0_idx = np.flatnonzero(bvals < 50)
    assert b0_idx[0] == 0 and b0_idx[-1] == len(bvals) - 1 and len(b0_idx) == 6
    assert not np.all(np.diff(bvals[bvals > 50]) >= 0)
    # The bvals/bvecs read back form the same acquisition (shells, directions).
    back = Acquisition.from_smm2(bvals, bvecs)
    assert back.shell_table() == acq.shell_table()


def test_truth_physical_and_brain_like(msdki_phantom):
    (series,) = msdki_phantom["series"]
    mask = nib.load(series["mask"]).get_fdata() > 0
    labels = np.asarray(nib.load(series["dseg"]).dataobj)
    assert 0.1 < mask.mean() < 0.6
    counts = {t: int((labels == v).sum()) for t, v in TISSUE_LABELS.items()}
    assert all(n > 0.02 * mask.sum() for n in counts.values()), counts
    assert np.array_equal(labels > 0, mask)
    d = nib.load(series["truth"]["msd"]).get_fdata()[mask]
    k = nib.load(series["truth"]["msk"]).get_fdata()[mask]
    b_max = demo_acquisition().bvals.max()
    assert np.all(d > 0) and np.all(d < 3.5) and np.all(k >= 0) and np.all(k <= 3)
    assert np.all(b_max * d * k < 3)
    # Tissue contrast: CSF diffuses fastest, WM has the highest kurtosis.
    wm, gm, csf = (labels[mask] == TISSUE_LABELS[t] for t in ("WM", "GM", "CSF"))
    assert np.median(d[csf]) > np.median(d[gm]) > np.median(d[wm])
    assert np.median(k[wm]) > np.median(k[gm]) > np.median(k[csf])
    # Smooth spatial variation, not a constant per tissue.
    assert np.std(d[wm]) > 0.01
    record = json.loads(Path(msdki_phantom["truth_json"]).read_text())
    assert record["model"] == "msdki" and record["series"][0]["n_brain_voxels"] == int(mask.sum())


def test_signal_matches_truth(msdki_phantom):
    """Noise aside, the data are S0 * MS-DKI(truth); background is Rician noise around 0."""
    (series,) = msdki_phantom["series"]
    img, bvals, bvecs = _read_series(series)
    data = np.asarray(img.dataobj, dtype=np.float64)
    mask = nib.load(series["mask"]).get_fdata() > 0
    s0 = nib.load(series["s0"]).get_fdata()
    truth = np.stack([nib.load(series["truth"][p]).get_fdata()[mask] for p in ("msd", "msk")], 1)
    acq = Acquisition.from_smm2(bvals, bvecs)
    model = make_model("msdki", acq)
    expected = s0[mask, None] * model.forward_numpy(truth, acq.bvals, acq.bvecs)
    assert np.all(np.isfinite(data))
    sigma = 1000.0 / 30.0
    residual = data[mask] - expected
    # High-signal voxels: Rician ~ Gaussian, mean ~ 0, sd ~ sigma.
    high = expected > 8 * sigma
    assert abs(residual[high].mean()) < 0.1 * sigma
    assert 0.9 * sigma < residual[high].std() < 1.1 * sigma
    background = data[~mask]
    assert abs(background.mean() - sigma * np.sqrt(np.pi / 2)) < 0.1 * sigma  # Rayleigh mean


def test_deterministic(tmp_path, msdki_phantom):
    again = write_phantom_dataset(tmp_path / "bids", tmp_path / "truth")
    for key in ("dwi", "bval", "bvec", "json", "mask", "dseg"):
        a, b = Path(msdki_phantom["series"][0][key]), Path(again["series"][0][key])
        assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest(), key
    other = write_phantom_dataset(tmp_path / "bids2", tmp_path / "truth2", seed=1)
    assert not np.array_equal(np.asarray(nib.load(other["series"][0]["dwi"]).dataobj),
                              np.asarray(nib.load(again["series"][0]["dwi"]).dataobj))


def test_ballstick_sessions_runs_float(ballstick_phantom):
    series = ballstick_phantom["series"]
    assert len(series) == 2 * 2 * 2
    names = sorted(Path(s["dwi"]).relative_to(ballstick_phantom["bids_dir"]).as_posix()
                   for s in series)
    assert names[0] == "sub-01/ses-post/dwi/sub-01_ses-post_acq-multishell_run-1_dwi.nii.gz"
    first = series[0]
    img, bvals, bvecs = _read_series(first)
    assert img.get_data_dtype() == np.float32 and img.shape[:3] == (16, 18, 14)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    mask = nib.load(first["mask"]).get_fdata() > 0
    maps = {p: nib.load(first["truth"][p]).get_fdata() for p in first["truth"]}
    direction = maps["dir"][mask]
    np.testing.assert_allclose(np.linalg.norm(direction, axis=1), 1.0, atol=1e-5)
    assert np.all((maps["stickfrac"][mask] >= 0) & (maps["stickfrac"][mask] <= 1))
    # Fibre directions vary smoothly: neighbouring WM voxels mostly agree (|cos| > 0.7).
    labels = np.asarray(nib.load(first["dseg"]).dataobj)
    wm = labels == TISSUE_LABELS["WM"]
    pairs = wm[1:] & wm[:-1]
    cos = np.abs(np.sum(maps["dir"][1:][pairs] * maps["dir"][:-1][pairs], axis=1))
    assert np.median(cos) > 0.7
    # Not one direction everywhere.
    assert np.abs(direction @ direction[0]).min() < 0.5
    # Sessions/runs share the truth of the subject but not the noise.
    same_sub = [s for s in series if s["entities"]["subject"] == "01"]
    a, b = (np.asarray(nib.load(s["dwi"]).dataobj) for s in same_sub[:2])
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(nib.load(same_sub[0]["truth"]["dpar"]).get_fdata(),
                                  nib.load(same_sub[1]["truth"]["dpar"]).get_fdata())
    # The cumulant MS-DKI maps follow the closed form.
    d, k = ballstick_cumulants(maps["stickfrac"], maps["dpar"], maps["diso"])
    np.testing.assert_allclose(nib.load(first["cumulant"]["msd"]).get_fdata()[mask], d[mask],
                               rtol=1e-5)
    np.testing.assert_allclose(nib.load(first["cumulant"]["msk"]).get_fdata()[mask], k[mask],
                               rtol=1e-4, atol=1e-6)
    participants = (ballstick_phantom["bids_dir"] / "participants.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in participants[1:]] == ["sub-01", "sub-02"]


def test_ballstick_signal_uses_bvec_frame(ballstick_phantom):
    """The written bvecs and the truth's directions are in one frame: the clean signal of a WM
    voxel computed from the files is close to the measured one (SNR 50)."""
    series = ballstick_phantom["series"][0]
    img, bvals, bvecs = _read_series(series)
    data = np.asarray(img.dataobj, dtype=np.float64)
    labels = np.asarray(nib.load(series["dseg"]).dataobj)
    wm = labels == TISSUE_LABELS["WM"]
    s0 = nib.load(series["s0"]).get_fdata()[wm]
    maps = {p: nib.load(series["truth"][p]).get_fdata()[wm] for p in series["truth"]}
    params = np.column_stack([maps["stickfrac"], maps["dpar"], maps["diso"], maps["dir"]])
    acq = Acquisition.from_smm2(bvals, bvecs)
    model = make_model("ballstick", acq)
    expected = s0[:, None] * model.forward_numpy(params, acq.bvals, acq.bvecs)
    rmse_true = np.sqrt(np.mean((data[wm] - expected) ** 2))
    # The same with the directions mirrored in x (the classic bvec-flip mistake) fits worse.
    flipped = params.copy()
    flipped[:, 3] *= -1
    wrong = s0[:, None] * model.forward_numpy(flipped, acq.bvals, acq.bvecs)
    rmse_wrong = np.sqrt(np.mean((data[wm] - wrong) ** 2))
    assert rmse_true < 1.15 * (1000.0 / 50.0) and rmse_wrong > 1.2 * rmse_true


def test_bvec_frame():
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(bvec_frame(las), np.diag([-1.0, 1.0, 1.0]))  # voxel axes = bvec axes
    np.testing.assert_allclose(bvec_frame(ras), np.diag([-1.0, 1.0, 1.0]))  # FSL flips x


def test_pybids_finds_the_dwi(ballstick_phantom):
    from bids import BIDSLayout

    layout = BIDSLayout(str(ballstick_phantom["bids_dir"]), validate=True)
    dwis = layout.get(suffix="dwi", extension=[".nii.gz"], return_type="filename")
    assert len(dwis) == 8
    assert sorted(layout.get_sessions()) == ["post", "pre"]
    assert layout.get_runs() == [1, 2]
    one = layout.get(subject="02", session="pre", run=2, suffix="dwi", extension=".nii.gz")[0]
    assert Path(layout.get_bval(one.path)).is_file() and Path(layout.get_bvec(one.path)).is_file()
    assert layout.get_metadata(one.path)["PhaseEncodingDirection"] == "j-"


def test_bids_validator_accepts_phantoms(msdki_phantom, ballstick_phantom):
    for dataset in (msdki_phantom, ballstick_phantom):
        report = run_validator(dataset["bids_dir"])
        assert validator_errors(report) == []


def test_custom_acquisition_single_shell(tmp_path):
    """A caller's acquisition is written in its own order, even one MS-DKI could not fit."""
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((12, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0, np.full(6, 1000.0), 0, np.full(6, 1000.0)]
    bvecs = np.vstack([[0, 0, 0], dirs[:6], [0, 0, 0], dirs[6:]])
    acq = Acquisition.from_smm2(bvals, bvecs)
    out = write_phantom_dataset(tmp_path / "bids", tmp_path / "truth", acquisition=acq,
                                shape=(10, 12, 9), subjects="x1")
    img, b_back, v_back = _read_series(out["series"][0])
    assert img.shape == (10, 12, 9, 14)
    np.testing.assert_allclose(b_back, bvals)
    np.testing.assert_allclose(v_back.T, bvecs, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"model": "ivim"}, "model"),
    ({"snr": 0}, "snr"),
    ({"dtype": "uint8"}, "dtype"),
    ({"subjects": ("0/1",)}, "subject"),
    ({"s0": 30000.0}, "int16"),
    ({"shape": (4, 4, 4)}, "coarse"),
    ({"shape": (10, 10)}, "shape"),
    ({"orientation": "LAX"}, "orientation"),
    ({"orientation": "LRS"}, "orientation"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_phantom_dataset(tmp_path / "bids", tmp_path / "truth", **kwargs)
    assert not (tmp_path / "bids").exists()  # nothing half-written


def test_truth_inside_bids_rejected(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_phantom_dataset(tmp_path / "bids", tmp_path / "bids" / "derivatives" / "truth")
    assert not (tmp_path / "bids").exists()


# ---- dipy small_101D -> BIDS --------------------------------------------------------------

@pytest.fixture(scope="module")
def small101d(tmp_path_factory):
    from vaemap_bids.simulate.dipy_small import convert_small_101d

    root = tmp_path_factory.mktemp("small101d")
    phantom = write_phantom_dataset(root / "bids", root / "truth", shape=(10, 12, 9))
    return phantom, convert_small_101d(root / "bids", mask_dir=root / "masks")


def test_small101d_is_dipys_data_unchanged(small101d):
    from vaemap_bids.simulate.dipy_small import small_101d_files

    _, out = small101d
    img_path, bval_path, bvec_path = small_101d_files()
    src, dst = nib.load(img_path), nib.load(out["dwi"])
    assert Path(out["dwi"]).name == "sub-small101d_dwi.nii.gz"
    assert dst.shape == src.shape == (6, 10, 10, 102)
    assert dst.get_data_dtype() == src.get_data_dtype()
    np.testing.assert_array_equal(np.asarray(dst.dataobj), np.asarray(src.dataobj))
    np.testing.assert_allclose(dst.affine, src.affine)
    assert dst.header.get_xyzt_units() == ("mm", "sec")
    assert Path(out["bval"]).read_bytes() == bval_path.read_bytes()
    assert Path(out["bvec"]).read_bytes() == bvec_path.read_bytes()
    sidecar = json.loads(Path(out["json"]).read_text())
    assert "Real diffusion-weighted data" in sidecar["vaemapSource"]["Description"]
    # Its gradient table suits both models.
    acq = Acquisition.from_smm2(np.loadtxt(out["bval"]), np.loadtxt(out["bvec"]))
    assert make_model("msdki", acq).n_measurements > 10
    assert make_model("ballstick", acq).n_measurements == 102


def test_small101d_joins_an_existing_dataset(small101d):
    from bids import BIDSLayout

    phantom, out = small101d
    bids = out["bids_dir"]
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["Name"] == "vaemap synthetic DWI phantom"  # the existing description is kept
    rows = (bids / "participants.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == ["sub-01", "sub-small101d"]
    layout = BIDSLayout(str(bids))
    assert sorted(layout.get_subjects()) == ["01", "small101d"]
    dwi = layout.get(subject="small101d", suffix="dwi", extension=".nii.gz")[0].path
    assert Path(layout.get_bval(dwi)).is_file()
    assert validator_errors(run_validator(bids)) == []


def test_small101d_mask_derivative(small101d):
    """The whole-crop mask is a derivative that vaemap's --derivatives lookup finds."""
    from vaemap_bids.dataset.bids import find_derivative_mask

    _, out = small101d
    mask_dir = Path(out["mask"]).parents[2]
    assert json.loads((mask_dir / "dataset_description.json").read_text())["DatasetType"] == \
        "derivative"
    assert Path(out["mask"]).name == "sub-small101d_desc-brain_mask.nii.gz"
    mask = nib.load(out["mask"])
    dwi = nib.load(out["dwi"])
    np.testing.assert_allclose(mask.affine, dwi.affine)
    assert mask.shape == dwi.shape[:3] and np.asarray(mask.dataobj).all()
    assert find_derivative_mask([mask_dir], {"subject": "small101d"}) == str(out["mask"])
    assert validator_errors(run_validator(mask_dir)) == []


def test_small101d_alone_and_rerun(tmp_path):
    from vaemap_bids.simulate.dipy_small import convert_small_101d

    first = convert_small_101d(tmp_path / "bids", subject="real1")
    digest = hashlib.sha256(Path(first["dwi"]).read_bytes()).hexdigest()
    again = convert_small_101d(tmp_path / "bids", subject="real1")
    assert hashlib.sha256(Path(again["dwi"]).read_bytes()).hexdigest() == digest
    desc = json.loads((tmp_path / "bids" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw"
    assert sorted(p.name for p in (tmp_path / "bids").iterdir()) == [
        "README", "dataset_description.json", "participants.tsv", "sub-real1"]
    with pytest.raises(ValueError, match="subject"):
        convert_small_101d(tmp_path / "bids", subject="../x")


# ---- vaemap-demo (without the participant run, which takes minutes) -------------------------

def test_demo_config_is_a_valid_reduced_budget(tmp_path):
    from vaemap_bids.fitting.options import default_options, load_config
    from vaemap_bids.simulate.demo import write_demo_config

    config = load_config(write_demo_config(tmp_path / "demo.yaml"))  # unknown keys would raise
    for method in ("ssl", "vaeunig", "vaegmm"):
        assert config[method]["epochs"] < default_options(method)["epochs"]
    assert "REDUCED" in (tmp_path / "demo.yaml").read_text()
    # Rewriting an identical file would change its mtime and make Nipype rerun every fit.
    stamp = (tmp_path / "demo.yaml").stat().st_mtime_ns
    write_demo_config(tmp_path / "demo.yaml")
    assert (tmp_path / "demo.yaml").stat().st_mtime_ns == stamp


def test_demo_main_builds_data_and_calls_vaemap(tmp_path, monkeypatch, capsys):
    """``vaemap-demo`` builds both subjects, calls the BIDS-App with every model and method, and
    compares what the app wrote with the truth (here the app is replaced by a stand-in that
    writes the truth itself as the lsq maps, so every error must be 0)."""
    import vaemap_bids.cli.run as cli_run
    from vaemap_bids import naming
    from vaemap_bids.cli import demo as demo_cli
    from vaemap_bids.outputs.table import output
    from vaemap_bids.simulate import demo

    monkeypatch.setattr(demo, "PHANTOM_SHAPE", (12, 14, 10))
    calls = []

    def fake_vaemap(argv):
        calls.append(argv)
        out = Path(argv[1])
        truth = Path(argv[0]).parent / "truth"
        for path in (truth / "sub-phantom" / "dwi").glob("*desc-truth_param-*_dwimap.nii.gz"):
            ent = {"subject": "phantom"}
            param = naming.parse(path.name)["param"]
            dest = out / output("param", ent, model="ballstick", method="lsq", param=param).path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest)
        return 0

    monkeypatch.setattr(cli_run, "main", fake_vaemap)
    demo_dir = tmp_path / "demo"
    assert demo_cli.main(["--out-dir", str(demo_dir), "--device", "cpu", "--nprocs", "1"]) == 0
    (argv,) = calls
    assert argv[:3] == [str(demo_dir / "bids"), str(demo_dir / "out"), "participant"]
    joined = " ".join(argv)
    assert "--models msdki ballstick" in joined
    assert "--methods lsq ssl vaeunig vaegmm" in joined
    assert f"--config {demo_dir / 'demo_hyperparameters.yaml'}" in joined
    assert f"--derivatives {demo_dir / 'masks'}" in joined
    assert "--device cpu" in joined and "--nprocs 1" in joined and f"-w {demo_dir / 'work'}" in joined
    assert (demo_dir / "bids" / "sub-phantom").is_dir() and (demo_dir / "bids" / "sub-small101d").is_dir()
    text = capsys.readouterr().out
    assert "REDUCED" in text and "sub-phantom.html" in text
    rows = demo.compare_with_truth(demo_dir / "out", demo.phantom_record(demo_dir / "bids",
                                                                          demo_dir / "truth"))
    assert {r["param"] for r in rows} == {"stickfrac", "dpar", "diso", "dir"}
    assert all(r["median_abs_error"] < 1e-3 for r in rows)
    # --keep reuses the data; a folder that is not a demo folder is refused.
    stamp = (demo_dir / "bids" / "sub-phantom" / "dwi" / "sub-phantom_dwi.nii.gz").stat().st_mtime_ns
    assert demo_cli.main(["--out-dir", str(demo_dir), "--keep"]) == 0
    assert (demo_dir / "bids" / "sub-phantom" / "dwi" / "sub-phantom_dwi.nii.gz").stat().st_mtime_ns == stamp
    other = tmp_path / "not_demo"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert demo_cli.main(["--out-dir", str(other)]) == 73
    assert (other / "precious.txt").exists()
