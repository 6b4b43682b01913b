"""QSIPrep derivatives as input: the gradient frames (oblique images included), detection, the
mask used as given, the space- entity kept, Sources, and the one-line errors."""
from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.cli.run import main
from vaemap_bids.dataset.gradients import (read_dsistudio_btable, read_mrtrix_b,
                                           voxel_to_bvec_frame, world_to_bvec_frame)
from vaemap_bids.dataset.qsiprep import (generated_by_qsiprep, gradient_table,
                                         VALIDATOR_NOTE)
from vaemap_bids.simulate.qsiprep import write_qsiprep_dataset


def vaemap(*args) -> int:
    return main([str(a) for a in args])


def _unit_columns(affine):
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return a / np.linalg.norm(a, axis=0)


# ---- frames: plain functions -------------------------------------------------------------------
def test_frames_by_hand_on_an_oblique_lps_image(tmp_path):
    """LPS+ at 2 mm, tilted 30 degrees about z. Voxel axis i points along Rz(30)(-1, 0, 0) =
    (-cos30, -sin30, 0) in RAS, j along (sin30, -cos30, 0), k along z. The world vector
    (1, 0, 0) RAS is (-cos30, sin30, 0) in the voxel axes; det > 0, so FSL's .bvec frame flips
    x: (cos30, sin30, 0)."""
    c, s = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
    rz = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ np.diag([-2.0, -2.0, 2.0])
    expected = np.array([[c, s, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(world_to_bvec_frame(np.array([[1.0, 0, 0], [0, 0, 0]]), affine),
                               expected, atol=1e-12)
    np.testing.assert_allclose(voxel_to_bvec_frame(np.array([[-c, s, 0.0]]), affine),
                               expected[:1], atol=1e-12)
    # the same vector as an MRtrix .b row (RAS) and a DSI Studio b-table row (LPS: x, y negated)
    (tmp_path / "g.b").write_text("0 0 0 0\n1 0 0 1000\n")
    (tmp_path / "g.b_table.txt").write_text("0 0 0 0\n1000 -1 0 0\n")
    for read, name in ((read_mrtrix_b, "g.b"), (read_dsistudio_btable, "g.b_table.txt")):
        bvals, world = read(tmp_path / name)
        np.testing.assert_array_equal(bvals, [0, 1000])
        np.testing.assert_allclose(world_to_bvec_frame(world, affine)[1], expected[0], atol=1e-12)
    # a plain LAS image (det < 0): the voxel frame is already the .bvec frame
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(world_to_bvec_frame(np.array([[1.0, 0, 0]]), las), [[-1, 0, 0]])
    with pytest.raises(ValueError, match="one row 'x y z b'"):
        (tmp_path / "bad.b").write_text("1 0 0\n")
        read_mrtrix_b(tmp_path / "bad.b")


@pytest.mark.parametrize("oblique", [0.0, 25.0])
def test_every_qsiprep_table_gives_the_signal_frame(tmp_path, oblique):
    """.bval/.bvec (voxel axes), .b (RAS) and .b_table.txt (LPS) of one series, each read alone,
    give the .bvec-frame table that made the phantom's signal, on a plumb and an oblique grid."""
    ds = write_qsiprep_dataset(tmp_path / "q", tmp_path / "truth", shape=(8, 9, 7), seed=1,
                               oblique_deg=oblique)
    series = ds["series"][0]
    affine = nib.load(series["dwi"]).affine
    assert np.linalg.det(affine[:3, :3]) > 0  # LPS+, as QSIPrep writes
    tilted = not np.allclose(np.abs(_unit_columns(affine)), np.eye(3)[[0, 1, 2]], atol=1e-6)
    assert tilted == bool(oblique)
    read_from = []
    for keep in ("bval", "b", "b_table"):
        folder = tmp_path / f"only-{keep}"
        shutil.copytree(series["dwi"].parent, folder)
        for other in ("bval", "bvec", "b", "b_table"):
            if other != keep and not (keep == "bval" and other == "bvec"):
                (folder / series[other].name).unlink()
        bvals, bvecs, files = gradient_table(str(folder / series["dwi"].name))
        np.testing.assert_allclose(bvals, series["bvals"], atol=0.5)
        np.testing.assert_allclose(bvecs, series["bvecs_fsl"], atol=2e-6)
        read_from.append([f.split("_dwi")[-1] for f in files])
    assert read_from == [[".bval", ".bvec"], [".b"], [".b_table.txt"]]
    assert gradient_table(str(series["dwi"]))[2] == [str(series["bval"]), str(series["bvec"])]
    if oblique:  # read as if the vectors were in the voxel frame, .b would be wrong
        bvals, world = read_mrtrix_b(series["b"])
        assert not np.allclose(voxel_to_bvec_frame(world, affine), series["bvecs_fsl"], atol=0.05)


def test_detection_from_generated_by(tmp_path):
    ds = write_qsiprep_dataset(tmp_path / "q", tmp_path / "truth", shape=(8, 9, 7), seed=1)
    assert generated_by_qsiprep(ds["qsiprep_dir"])
    desc = json.loads(ds["dataset_description"].read_text())
    desc["GeneratedBy"] = [{"Name": "fMRIPrep"}]
    (tmp_path / "other").mkdir()
    (tmp_path / "other/dataset_description.json").write_text(json.dumps(desc))
    assert not generated_by_qsiprep(tmp_path / "other")
    assert not generated_by_qsiprep(tmp_path / "missing")


# ---- end to end ----------------------------------------------------------------------------
def test_qsiprep_dataset_runs_with_its_mask_and_space(tmp_path):
    """Detected from GeneratedBy (no --input-type), the BIDS validator not run (it rejects
    QSIPrep's layout), the QSIPrep mask used as given (half a brain: not what median_otsu finds),
    space- kept in every name, Sources bids:qsiprep:..., and the group level reads it."""
    ds = write_qsiprep_dataset(tmp_path / "qsiprep", tmp_path / "truth", shape=(10, 12, 9),
                               seed=6, gradients=("b_table",))
    series = ds["series"][0]
    mask_img = nib.load(series["mask"])
    given = np.asanyarray(mask_img.dataobj).copy()
    given[: given.shape[0] // 2] = 0
    nib.save(nib.Nifti1Image(given, mask_img.affine, mask_img.header), str(series["mask"]))
    out = tmp_path / "out"
    code = vaemap(ds["qsiprep_dir"], out, "participant", "-w", tmp_path / "work",
                  "--models", "msdki", "--methods", "lsq", "--nprocs", "1")
    assert code == 0
    dwi = out / "sub-01" / "dwi"
    msd = dwi / "sub-01_space-ACPC_model-msdki_desc-lsq_param-msd_dwimap.nii.gz"
    assert msd.is_file()
    assert all("_space-ACPC_" in p.name for p in dwi.iterdir())
    valid = nib.load(dwi / "sub-01_space-ACPC_desc-valid_mask.nii.gz").get_fdata() > 0
    np.testing.assert_array_equal(valid, given > 0)
    written = nib.load(dwi / "sub-01_space-ACPC_desc-brain_mask.nii.gz").get_fdata() > 0
    np.testing.assert_array_equal(written, given > 0)
    values = nib.load(msd).get_fdata()
    assert (values[given > 0] > 0).all() and (values[given == 0] == 0).all()
    side = json.loads(msd.with_name(msd.name.replace(".nii.gz", ".json")).read_text())
    assert side["Sources"] == [
        "bids:qsiprep:sub-01/dwi/sub-01_space-ACPC_desc-preproc_dwi.nii.gz",
        "bids:qsiprep:sub-01/dwi/sub-01_space-ACPC_desc-preproc_dwi.b_table.txt"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"qsiprep": ds["qsiprep_dir"].resolve().as_uri()}
    summary = json.loads((out / "sub-01/log/sub-01_space-ACPC_summary.json").read_text())
    assert summary["validator"] == VALIDATOR_NOTE
    assert summary["inputs"]["mask_source"] == f"given: {series['mask']}"
    assert summary["entities"] == {"subject": "01", "space": "ACPC"}
    assert vaemap(ds["qsiprep_dir"], out, "group") == 0
    assert (out / "group_msdki.tsv").read_text().count("\n") == 1 + 2  # header, msd, msk
    from vaemap_bids.dataset.bids import run_bids_validator
    report = run_bids_validator(ds["qsiprep_dir"], tmp_path / "scratch")
    if report is not None:  # why vaemap does not validate QSIPrep input as raw BIDS
        assert report.errors


def test_qsiprep_errors_are_one_line(tmp_path, capsys):
    ds = write_qsiprep_dataset(tmp_path / "qsiprep", tmp_path / "truth", shape=(8, 9, 7), seed=2,
                               mask=False)
    code = vaemap(ds["qsiprep_dir"], tmp_path / "out", "participant", "-w", tmp_path / "work",
                  "--input-type", "qsiprep", "--models", "msdki", "--methods", "lsq")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 66
    assert err[-1].startswith("vaemap: error: ") and "sub-01_space-ACPC_desc-brain_mask.nii.gz" \
        in err[-1] and "QSIPrep brain mask not found" in err[-1]
    assert not (tmp_path / "out").exists()  # nothing written before the checks pass
    code = vaemap(ds["qsiprep_dir"], tmp_path / "out", "participant", "-w", tmp_path / "work",
                  "--derivatives", tmp_path / "truth")
    assert code == 64 and "QSIPrep's own brain masks" in capsys.readouterr().err
    for name in ("bval", "bvec", "b", "b_table"):
        ds["series"][0][name].unlink()
    nib.save(nib.load(ds["series"][0]["truth_mask"]),
             str(ds["series"][0]["dwi"]).replace("_desc-preproc_dwi", "_desc-brain_mask"))
    code = vaemap(ds["qsiprep_dir"], tmp_path / "out", "participant", "-w", tmp_path / "work")
    assert code == 66 and "no gradient table" in capsys.readouterr().err


@pytest.mark.slow
def test_ballstick_directions_from_an_oblique_b_file(tmp_path):
    """An oblique LPS+ grid with only the MRtrix .b (world frame): the fitted dir map, in the
    image's voxel axes, points along the true fibre once taken to the world by the affine."""
    ds = write_qsiprep_dataset(tmp_path / "qsiprep", tmp_path / "truth", model="ballstick",
                               shape=(16, 18, 14), seed=2, snr=80, oblique_deg=25,
                               gradients=("b",))
    code = vaemap(ds["qsiprep_dir"], tmp_path / "out", "participant", "-w", tmp_path / "work",
                  "--models", "ballstick", "--methods", "lsq", "--nprocs", "1")
    assert code == 0
    series = ds["series"][0]
    affine = nib.load(series["dwi"]).affine
    rot = _unit_columns(affine)
    dwi = tmp_path / "out/sub-01/dwi"
    est = nib.load(dwi / "sub-01_space-ACPC_model-ballstick_desc-lsq_param-dir_dwimap.nii.gz"
                   ).get_fdata()
    truth = nib.load(series["truth"]["dir"]).get_fdata() * np.array([-1.0, 1.0, 1.0])  # -> ijk
    frac = nib.load(series["truth"]["stickfrac"]).get_fdata()
    fibre = (nib.load(dwi / "sub-01_space-ACPC_desc-valid_mask.nii.gz").get_fdata() > 0) \
        & (frac > 0.35)  # the tilted grid's larger voxels blur WM: few voxels reach 0.45
    assert fibre.sum() > 50
    world_est, world_truth = est[fibre] @ rot.T, truth[fibre] @ rot.T
    cos = np.abs(np.sum(world_est * world_truth, axis=1))
    assert np.median(cos) > np.cos(np.deg2rad(10))
    side = json.loads((dwi / "sub-01_space-ACPC_model-ballstick_desc-lsq_param-dir_dwimap.json"
                       ).read_text())
    assert side["OrientationEncoding"]["Reference"] == "ijk"


def test_collect_keeps_every_entity_and_rewrites_nothing(tmp_path):
    """Sessions, acq- and space- identify the series; the mask is the DWI's own sibling (not
    another series'); a second collection (a resumed run) leaves the converted files untouched."""
    from vaemap_bids.dataset.qsiprep import collect_qsiprep_series
    ds = write_qsiprep_dataset(tmp_path / "q", tmp_path / "truth", shape=(8, 9, 7), seed=3,
                               subjects=("01", "02"), sessions=("1", "2"), acq_label="multi",
                               space="T1w", gradients=("b",))
    series = collect_qsiprep_series(ds["qsiprep_dir"], ["02"], ["2"], gradient_dir=tmp_path / "g")
    assert len(series) == 1
    s = series[0]
    assert s.entities == {"subject": "02", "session": "2", "acquisition": "multi",
                          "space": "T1w"}
    assert s.prefix == "sub-02_ses-2_acq-multi_space-T1w"
    assert s.mask == str(ds["qsiprep_dir"] / "sub-02/ses-2/dwi"
                         / "sub-02_ses-2_acq-multi_space-T1w_desc-brain_mask.nii.gz")
    assert [p.rsplit("/", 1)[-1] for p in s.sources] == [
        "sub-02_ses-2_acq-multi_space-T1w_desc-preproc_dwi.nii.gz",
        "sub-02_ses-2_acq-multi_space-T1w_desc-preproc_dwi.b"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "g").iterdir()}
    assert len(stamps) == 2
    again = collect_qsiprep_series(ds["qsiprep_dir"], ["02"], ["2"], gradient_dir=tmp_path / "g")
    assert again[0].bvec == s.bvec
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "g").iterdir()} == stamps
