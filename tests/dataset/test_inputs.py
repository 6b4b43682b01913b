"""Inputs of the BIDS-App: gradient files, images, masks, discovery, validation, model decisions.

Fast: tiny phantoms and hand-made files, no Nipype graph.
"""
from __future__ import annotations

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids import naming
from vaemap_bids.dataset import bids as vbids
from vaemap_bids.dataset.gradients import (bvec_to_voxel_axes, load_acquisition, read_bval,
                                           read_bvec)
from vaemap_bids.dataset.image import iter_volumes, read_image_info, scan_image
from vaemap_bids.dataset.masking import compute_brain_mask, load_mask, median_radius
from vaemap_bids.dataset.signals import fit_quality, nrmse, prepare_series
from vaemap_bids.outputs.products import rows_to_volume
from vaemap_bids.physics import Acquisition, make_model
from vaemap_bids.simulate.phantom import write_phantom_dataset

SHAPE = (16, 18, 14)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return write_phantom_dataset(root / "bids", root / "truth", model="msdki", shape=SHAPE, seed=3)


def _write(path, text):
    path.write_text(text)
    return path


# ---- gradient files --------------------------------------------------------------------------

def test_bval_row_or_column(tmp_path):
    row = _write(tmp_path / "a.bval", "0 1000 2000\n")
    col = _write(tmp_path / "b.bval", "0\n1000\n2000\n")
    assert read_bval(row).tolist() == read_bval(col).tolist() == [0, 1000, 2000]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("0 1000 abc\n", "not a number"),
    ("0 -5 1000\n", "negative"),
    ("0 1000\n0 1000\n", "one row"),
    ("0 1000 nan\n", "non-finite"),
])
def test_bad_bval_names_file_and_problem(tmp_path, text, message):
    path = _write(tmp_path / "x.bval", text)
    with pytest.raises(ValueError, match=message) as info:
        read_bval(path)
    assert str(path) in str(info.value)


def test_bvec_rows_and_transposed(tmp_path):
    rows = _write(tmp_path / "a.bvec", "0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    table = _write(tmp_path / "b.bvec", "0 0 0\n1 0 0\n0 1 0\n0 0 1\n")
    np.testing.assert_array_equal(read_bvec(rows), read_bvec(table))
    assert read_bvec(rows).shape == (4, 3)
    with pytest.raises(ValueError, match="3 rows"):
        read_bvec(_write(tmp_path / "c.bvec", "0 1\n0 0\n"))


def test_acquisition_counts_and_unit_vectors(tmp_path):
    bval = _write(tmp_path / "x.bval", "0 1000 1000 2000\n")
    bvec = _write(tmp_path / "x.bvec", "0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    assert load_acquisition(bval, bvec, 4).n_volumes == 4
    with pytest.raises(ValueError, match="image has 5 volumes") as info:
        load_acquisition(bval, bvec, 5)
    assert str(bval) in str(info.value)
    short = _write(tmp_path / "short.bvec", "0 1 0\n0 0 1\n0 0 0\n")
    with pytest.raises(ValueError, match="3 gradient directions but") as info:
        load_acquisition(bval, short)
    assert str(short) in str(info.value)
    scaled = _write(tmp_path / "scaled.bvec", "0 2 0 0\n0 0 2 0\n0 0 0 2\n")
    with pytest.raises(ValueError, match="unit vectors") as info:
        load_acquisition(bval, scaled)
    assert str(scaled) in str(info.value)
    no_b0 = _write(tmp_path / "nob0.bval", "1000 1000 1000 2000\n")
    unit = _write(tmp_path / "unit.bvec", "1 1 0 0\n0 0 1 0\n0 0 0 1\n")
    with pytest.raises(ValueError, match="no b0"):
        load_acquisition(no_b0, unit)
    with pytest.raises(FileNotFoundError, match="bval file not found"):
        load_acquisition(tmp_path / "missing.bval", bvec)


def test_shells_grouped_within_tolerance(tmp_path):
    rng = np.random.default_rng(0)
    bvals = np.array([0, 5, 990, 1005, 1010, 1995, 2000, 2010, 0])
    dirs = rng.normal(size=(bvals.size, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs[bvals < 50] = 0
    bval = _write(tmp_path / "j.bval", " ".join(map(str, bvals)) + "\n")
    bvec = _write(tmp_path / "j.bvec", "\n".join(" ".join(f"{v:.6f}" for v in row) for row in dirs.T))
    table = load_acquisition(bval, bvec).shell_table()
    assert [r["n_volumes"] for r in table] == [3, 3, 3]
    assert [round(r["bval_smm2"], -2) for r in table] == [0, 1000, 2000]


# ---- images ----------------------------------------------------------------------------------

def test_image_stream_matches_nibabel(tmp_path, phantom):
    series = phantom["series"][0]
    ref = np.asanyarray(nib.load(series["dwi"]).dataobj).astype(np.float32)
    for index, vol in iter_volumes(series["dwi"]):
        np.testing.assert_array_equal(vol, ref[..., index])
    # scaled integers and an uncompressed file read the same values as nibabel
    img = nib.Nifti1Image(np.round(ref / 3).astype(np.int16), np.eye(4))
    img.header.set_slope_inter(2.5, -1.0)
    path = tmp_path / "scaled.nii"
    nib.save(img, str(path))
    expected = np.asanyarray(nib.load(str(path)).dataobj)
    got = np.stack([v for _, v in iter_volumes(path)], axis=-1)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_3d_image_is_rejected(tmp_path):
    path = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    with pytest.raises(ValueError, match="4-D") as info:
        read_image_info(path)
    assert str(path) in str(info.value)


def test_corrupt_gzip_is_detected(tmp_path, phantom):
    series = phantom["series"][0]
    acq = load_acquisition(series["bval"], series["bvec"])
    data = open(series["dwi"], "rb").read()
    truncated = tmp_path / "trunc_dwi.nii.gz"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match="corrupt or truncated") as info:
        scan_image(truncated, acq)
    assert str(truncated) in str(info.value)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # one corrupt byte in the middle of the stream
    bad = tmp_path / "bad_dwi.nii.gz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=str(bad)):
        scan_image(bad, acq)


def test_zero_b0_and_nonfinite_voxels(tmp_path, phantom):
    series = phantom["series"][0]
    acq = load_acquisition(series["bval"], series["bvec"])
    img = nib.load(series["dwi"])
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[1, 2, 3, 5] = np.nan
    data[4, 5, 6, 0] = np.inf
    nan_path = tmp_path / "nan_dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(nan_path))
    scan = scan_image(nan_path, acq)
    assert scan.nonfinite.sum() == 2 and scan.nonfinite[1, 2, 3] and scan.nonfinite[4, 5, 6]
    zero = data.copy()
    zero[..., acq.b0_mask] = 0
    zero_path = tmp_path / "zero_dwi.nii.gz"
    nib.save(nib.Nifti1Image(zero, img.affine), str(zero_path))
    with pytest.raises(ValueError, match="every b0 volume is zero") as info:
        scan_image(zero_path, acq)
    assert str(zero_path) in str(info.value)


def test_masked_signals_normalised_and_int16_equals_float(tmp_path):
    write_phantom_dataset(tmp_path / "i16", tmp_path / "t16", shape=(10, 12, 9), seed=5,
                          dtype="int16")
    write_phantom_dataset(tmp_path / "f32", tmp_path / "t32", shape=(10, 12, 9), seed=5,
                          dtype="float32")
    outs = []
    for root in ("i16", "f32"):
        d = tmp_path / root / "sub-01" / "dwi"
        acq = load_acquisition(d / "sub-01_dwi.bval", d / "sub-01_dwi.bvec")
        mask = nib.load(tmp_path / root.replace("i16", "t16").replace("f32", "t32") / "sub-01" /
                        "dwi" / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
        loaded = prepare_series(d / "sub-01_dwi.nii.gz", acq, mask)
        np.testing.assert_array_equal(loaded.mask, mask)
        assert loaded.valid.all() and loaded.signals.shape == (mask.sum(), acq.n_volumes)
        np.testing.assert_allclose(loaded.signals[:, acq.b0_mask].mean(axis=1), 1.0, rtol=1e-5)
        outs.append(loaded.signals)
    # int16 rounding is the only difference (signals of ~1000 counts)
    assert np.nanmax(np.abs(outs[0] - outs[1])) < 0.01


def test_rows_to_volume_roundtrip():
    mask = np.zeros((3, 4, 5), bool)
    mask[1, 1:3, 2:4] = True
    rows = np.arange(mask.sum() * 3, dtype=np.float32).reshape(-1, 3)
    vol = rows_to_volume(rows, mask)
    assert vol.shape == (3, 4, 5, 3) and (vol[0, 0, 0] == 0).all()  # background is 0
    np.testing.assert_array_equal(vol[mask], rows)
    with pytest.raises(ValueError, match="rows for a mask"):
        rows_to_volume(rows[:-1], mask)


def test_nrmse_and_fit_quality(hcp_acq):
    model = make_model("msdki", hcp_acq)
    truth = np.array([[1.0, 1.0], [2.0, 0.5]])
    clean = model.forward_numpy(truth)
    assert np.allclose(nrmse(clean, clean), 0)
    noisy = clean * 1.1
    np.testing.assert_allclose(nrmse(noisy, clean), 0.1 / 1.1, rtol=1e-5)
    full = np.ones((2, hcp_acq.n_volumes), np.float32)
    full[:, model.volumes] = clean
    q = fit_quality(model, full, truth, np.array([True, False]))
    assert q["nrmse"][0] < 1e-6 and np.isnan(q["nrmse"][1])
    assert not q["invalid"].any()


# ---- masks -----------------------------------------------------------------------------------

def test_median_otsu_mask_matches_phantom_brain(phantom):
    series = phantom["series"][0]
    acq = load_acquisition(series["bval"], series["bvec"])
    scan = scan_image(series["dwi"], acq)
    mask = compute_brain_mask(scan.mean_b0, scan.info.zooms)
    truth = nib.load(series["mask"]).get_fdata() > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.9, dice
    assert median_radius((1.25,) * 3) == 3 and median_radius((2.0,) * 3) == 2
    assert median_radius((8.0,) * 3) == 1


def test_given_mask_must_match_grid(tmp_path, phantom):
    series = phantom["series"][0]
    info = read_image_info(series["dwi"])
    mask = load_mask(series["mask"], info.shape, info.affine)
    assert mask.dtype == bool and mask.any()
    wrong = tmp_path / "wrong_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), info.affine), str(wrong))
    with pytest.raises(ValueError, match="does not match the DWI grid") as err:
        load_mask(wrong, info.shape, info.affine)
    assert str(wrong) in str(err.value)


def test_find_derivative_mask_matches_entities(tmp_path):
    deriv = tmp_path / "qsiprep"
    names = ["sub-01/dwi/sub-01_ses-a_run-1_space-T1w_desc-brain_mask.nii.gz",
             "sub-01/dwi/sub-01_ses-a_space-T1w_desc-brain_mask.nii.gz",
             "sub-01/anat/sub-01_ses-b_desc-brain_mask.nii.gz",
             "sub-01/dwi/sub-01_ses-b_desc-brain_mask.nii.gz",
             "sub-01/dwi/sub-01_ses-b_acq-other_desc-brain_mask.nii.gz",
             "sub-02/dwi/sub-02_desc-brain_mask.nii.gz"]
    for name in names:
        (deriv / name).parent.mkdir(parents=True, exist_ok=True)
        (deriv / name).write_bytes(b"")
    find = vbids.find_derivative_mask
    got = find([deriv], {"subject": "01", "session": "a", "run": "1", "space": "T1w"})
    assert got.endswith(names[0])
    got = find([deriv], {"subject": "01", "session": "a", "run": "2", "space": "T1w"})
    assert got.endswith(names[1])
    assert find([deriv], {"subject": "01", "session": "b"}).endswith(names[3])
    assert find([deriv], {"subject": "01", "session": "c"}) is None
    assert find([deriv], {"subject": "03"}) is None


# ---- discovery and validation ----------------------------------------------------------------

def test_discovery_sessions_runs_acq(tmp_path):
    write_phantom_dataset(tmp_path / "bids", tmp_path / "truth", subjects=("01", "02"),
                          sessions=("pre", "post"), runs=(1, 2), acq_label="multishell",
                          shape=(8, 9, 7))
    series = vbids.collect_dwi_series(tmp_path / "bids")
    assert len(series) == 8
    assert {s.prefix for s in series} >= {"sub-01_ses-pre_acq-multishell_run-1",
                                         "sub-02_ses-post_acq-multishell_run-2"}
    one = vbids.collect_dwi_series(tmp_path / "bids", ["02"], ["post"])
    assert [s.entities["session"] for s in one] == ["post", "post"]
    assert all(s.bval.endswith(".bval") and s.bvec.endswith(".bvec") for s in one)
    with pytest.raises(vbids.NoMatchingData, match="participant"):
        vbids.collect_dwi_series(tmp_path / "bids", ["03"])
    with pytest.raises(vbids.NoMatchingData, match="session"):
        vbids.collect_dwi_series(tmp_path / "bids", ["01"], ["nope"])


@pytest.mark.parametrize("raw, clean", [("sub-01", "01"), ("01", "01"), ("ABC3", "ABC3")])
def test_labels_with_or_without_prefix(raw, clean):
    assert naming.clean_label(raw, "sub") == clean


@pytest.mark.parametrize("bad", ["../01", "01/02", "..", "sub-", "a_b"])
def test_bad_labels_rejected(bad):
    with pytest.raises(ValueError):
        naming.clean_label(bad, "sub")


def test_validator_runs_offline(tmp_path, phantom):
    report = vbids.run_bids_validator(phantom["bids_dir"], tmp_path)
    if report is None:
        pytest.skip("bids-validator-deno cannot run here; pybids validation is the fallback")
    assert report.validator.startswith("bids-validator-deno") and not report.errors
    broken = tmp_path / "broken"
    shutil.copytree(phantom["bids_dir"], broken)
    (broken / "sub-01" / "dwi" / "sub-01_bogus.txt").write_text("")
    bad = vbids.run_bids_validator(broken, tmp_path)
    assert bad.errors and any("bogus" in (e.get("location") or "") for e in bad.errors)
    with pytest.raises(vbids.ValidationFailed, match="bids-validator-deno"):
        vbids.validate_dataset(broken, tmp_path)


def test_pybids_fallback_validation(tmp_path, phantom):
    assert not vbids.pybids_validation(phantom["bids_dir"]).errors
    empty = tmp_path / "empty"
    empty.mkdir()
    assert vbids.pybids_validation(empty).errors


# ---- model decisions -------------------------------------------------------------------------

def _single_shell() -> Acquisition:
    rng = np.random.default_rng(1)
    dirs = rng.normal(size=(30, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return Acquisition.from_smm2(np.r_[np.zeros(3), np.full(30, 1000.0)],
                                 np.vstack([np.zeros((3, 3)), dirs]))


def test_models_skipped_or_refused_on_single_shell(hcp_acq):
    decisions = vbids.decide_models(_single_shell(), ["msdki", "ballstick"], explicit=False)
    assert not decisions["msdki"].runs and "two non-zero shells" in decisions["msdki"].reason
    assert decisions["ballstick"].runs and decisions["ballstick"].n_measurements == 33
    with pytest.raises(ValueError, match="--models msdki cannot run"):
        vbids.decide_models(_single_shell(), ["msdki"], explicit=True)
    hcp = vbids.decide_models(hcp_acq, ["msdki"], explicit=True)
    assert hcp["msdki"].n_measurements == 18 + 90 + 90  # b <= 2500 s/mm^2 only


# ---- gradient frames -------------------------------------------------------------------------

def test_bvec_frame_conventions():
    las = np.diag([-2.0, 2.0, 2.0, 1.0])  # det < 0: the bvec frame is the voxel frame
    ras = np.diag([2.0, 2.0, 2.0, 1.0])   # det > 0: the bvec frame flips voxel x
    v = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    np.testing.assert_allclose(bvec_to_voxel_axes(v, las), v)
    np.testing.assert_allclose(bvec_to_voxel_axes(v, ras), [[-1, 0, 0], [0, 0.6, 0.8]])
    # either way, ijk -> world through the affine points the same way in the scanner: FSL's
    # bvec x is the radiological (left-to-right in world) axis for both storage orders
    for aff in (las, ras):
        world = bvec_to_voxel_axes(v, aff) @ (aff[:3, :3] / 2.0).T
        np.testing.assert_allclose(world, [[-1, 0, 0], [0, 0.6, 0.8]], atol=1e-6)


def test_gzip_module_detects_crc(tmp_path):
    """The stream check relies on gzip verifying its trailer; make that assumption explicit."""
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as fobj:
        fobj.write(b"abc" * 1000)
    raw = bytearray(path.read_bytes())
    raw[-6] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises((OSError, EOFError)):
        with gzip.open(path, "rb") as fobj:
            fobj.read()


@pytest.mark.parametrize("n_b0", [1, 6])
def test_the_series_sigma_comes_from_the_b0_repeats(tmp_path, n_b0):
    """S0 = 800 counts, Rician sigma = 40 (SNR 20): the b0 spread of 2,000 brain voxels gives
    sigma within 5 %; with one b0 there is no series estimate (the fits estimate it)."""
    rng = np.random.default_rng(0)
    bvals = np.r_[np.zeros(n_b0), np.full(12, 1000.0)]
    bvecs = np.c_[np.zeros((3, n_b0)), rng.normal(size=(3, 12))]
    bvecs[:, n_b0:] /= np.linalg.norm(bvecs[:, n_b0:], axis=0)
    clean = 800.0 * np.exp(-bvals / 1000.0 * 0.8)
    shape = (20, 10, 10, bvals.size)
    data = np.hypot(clean + 40.0 * rng.standard_normal(shape), 40.0 * rng.standard_normal(shape))
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), tmp_path / "dwi.nii.gz")
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", bvecs, fmt="%.6f")
    acq = load_acquisition(tmp_path / "dwi.bval", tmp_path / "dwi.bvec")
    mask = np.ones(shape[:3], bool)
    prepared = prepare_series(tmp_path / "dwi.nii.gz", acq, mask)
    if n_b0 == 1:
        assert prepared.sigma is None and prepared.normalised_sigma is None
        assert prepared.noise["method"] == "none" and "at least 2" in prepared.noise["reason"]
        return
    assert prepared.noise["method"] == "b0" and prepared.noise["n_b0"] == 6
    assert abs(prepared.sigma / 40.0 - 1) < 0.05
    np.testing.assert_allclose(prepared.normalised_sigma, prepared.sigma / prepared.s0)
