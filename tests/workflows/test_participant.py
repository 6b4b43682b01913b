"""End-to-end ``vaemap participant`` runs on tiny phantoms (CPU, few epochs).

One run with every model and method is shared by the manifest, sidecar, truth, validator and
resume tests; two small LSQ-only runs cover ball-stick directions in an RAS-stored image, and
sessions/acq-/runs with a user plugin file.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.atomic import TEMP_SUFFIX
from vaemap_bids.cli.run import main
from vaemap_bids.simulate.phantom import write_phantom_dataset

pytestmark = pytest.mark.slow

SHAPE = (16, 18, 14)
MODELS = ("ballstick", "msdki")
METHODS = ("lsq", "ssl", "vaeunig", "vaegmm")
PARAMS = {"msdki": ("msd", "msk"), "ballstick": ("stickfrac", "dpar", "diso", "dir")}
FAST_CONFIG = """\
lsq: {max_iter: 30}
ssl: {epochs: 25, batch_size: 64}
vaeunig: {epochs: 25, batch_size: 64, warmup_epochs: 3, ramp_epochs: 5, n_posterior_samples: 5}
vaegmm: {epochs: 25, batch_size: 64, warmup_epochs: 3, ramp_epochs: 5, n_posterior_samples: 5}
ssl@ballstick: {epochs: 4}
vaeunig@ballstick: {epochs: 4}
vaegmm@ballstick: {epochs: 4}
"""


def vaemap(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The phantom, and one participant run with every model and method."""
    root = tmp_path_factory.mktemp("e2e")
    phantom = write_phantom_dataset(root / "bids", root / "truth", model="msdki", shape=SHAPE,
                                    seed=1)
    (root / "fast.yaml").write_text(FAST_CONFIG)
    code = vaemap(root / "bids", root / "out", "participant", "-w", root / "work", "--config",
                  root / "fast.yaml", "--nprocs", "2", "--omp-nthreads", "1", "--device", "cpu",
                  "--seed", "3")
    assert code == 0
    return {"root": root, "out": root / "out", "work": root / "work", "phantom": phantom}


STD_METHODS = {"lsq", "vaeunig", "vaegmm"}     # methods that write stat-std maps


def expected_manifest() -> set[str]:
    """The contract (ARCHITECTURE.md section 3), spelt out: the table is not asked."""
    dwi, log = "sub-01/dwi", "sub-01/log"
    names = {"dataset_description.json", ".bidsignore", f"{log}/sub-01_summary.json"}

    def nifti(stem):
        names.update({f"{dwi}/{stem}.nii.gz", f"{dwi}/{stem}.json"})

    nifti("sub-01_desc-brain_mask")
    nifti("sub-01_desc-valid_mask")
    for model in MODELS:
        for method in METHODS:
            pre = f"sub-01_model-{model}_desc-{method}"
            for param in PARAMS[model]:
                nifti(f"{pre}_param-{param}_dwimap")
                if method in STD_METHODS and param != "dir":
                    nifti(f"{pre}_param-{param}_stat-std_dwimap")
            nifti(f"{pre}_stat-nrmse_dwimap")
            names.add(f"{log}/{pre}_fit.json")
            if method.startswith("vae"):
                names.add(f"{log}/{pre}_latent.npz")
            if method == "vaegmm":
                nifti(f"{pre}_dseg")
                nifti(f"{pre}_probseg")
                names.add(f"{dwi}/{pre}_dseg.tsv")
    return names


def test_exact_output_manifest(run):
    out = run["out"]
    got = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    got = {p for p in got if not p.startswith("logs/")}  # crash files would land there
    figures = {p for p in got if p.startswith("sub-01/figures/")}
    assert "sub-01.html" in got and figures, "the participant report is missing"
    assert got - figures - {"sub-01.html"} == expected_manifest()
    assert not list(out.rglob(f".*{TEMP_SUFFIX}")), "temporary files left behind"
    assert not (out / "logs").exists() or not list((out / "logs").glob("crash-*"))


def test_group_level_after_participant(run):
    assert vaemap(run["root"] / "bids", run["out"], "group") == 0
    assert (run["out"] / "group.html").is_file()
    assert sorted(p.name for p in run["out"].glob("group_*.tsv")) == ["group_ballstick.tsv",
                                                                      "group_msdki.tsv"]


def test_dataset_description_and_bidsignore(run):
    desc = json.loads((run["out"] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    gen = desc["GeneratedBy"][0]
    assert gen["Name"] == "vaemap" and gen["Version"] and gen["CodeURL"].startswith("https://")
    assert "seed 3" in gen["Description"] and desc["vaemap"]["seed"] == 3
    ignore = (run["out"] / ".bidsignore").read_text()
    for pattern in ("*_model-*", "*_param-*", "**/log"):
        assert pattern in ignore


def test_sidecars_follow_bep016(run):
    dwi = run["out"] / "sub-01" / "dwi"
    side = json.loads((dwi / "sub-01_model-msdki_desc-vaegmm_param-msd_dwimap.json").read_text())
    model = side["Model"]
    assert model["FitMethod"] == "vaegmm" and model["URL"].startswith("https://doi.org/")
    assert "Description" in model and model["Parameters"]["n_components"] == 3
    assert model["Parameters"]["epochs"] == 25
    assert side["Units"] == "um^2/ms" and "diffusivity" in side["Description"].lower()
    assert side["Sources"][0] == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    assert side["RandomSeed"] == 3
    std = json.loads((dwi / "sub-01_model-msdki_desc-vaegmm_param-msd_stat-std_dwimap.json")
                     .read_text())
    assert std["Units"] == "um^2/ms" and "standard deviation" in std["Description"]
    noise = side["Model"]["Noise"]
    assert noise["model"] == "rician" and noise["series_estimate"]["method"] == "b0"
    assert noise["sigma_source"] == "given" and noise["series_estimate"]["value"] > 0
    assert "noise" not in side["Model"]["Parameters"]
    kurt = json.loads((dwi / "sub-01_model-msdki_desc-lsq_param-msk_dwimap.json").read_text())
    assert kurt["Model"]["FitMethod"] == "lsq" and kurt["Units"] == "arbitrary"
    direction = json.loads((dwi / "sub-01_model-ballstick_desc-ssl_param-dir_dwimap.json")
                           .read_text())
    assert direction["OrientationEncoding"] == {"Type": "unit3vector", "Reference": "ijk"}
    tsv = (dwi / "sub-01_model-msdki_desc-vaegmm_dseg.tsv").read_text().splitlines()
    assert tsv == ["index\tname", "1\tcomponent1", "2\tcomponent2", "3\tcomponent3"]


def test_run_records(run):
    log = run["out"] / "sub-01" / "log"
    summary = json.loads((log / "sub-01_summary.json").read_text())
    assert set(summary) >= {"subject", "session", "entities", "prefix", "inputs", "acquisition",
                            "shape", "voxel_size_mm", "mask", "models", "device", "seed",
                            "versions", "validator", "started", "finished"}
    assert summary["subject"] == "01" and summary["session"] is None
    assert summary["inputs"]["mask_source"].startswith("dipy median_otsu")
    assert [s["bval_smm2"] for s in summary["acquisition"]["shells"]] == [0, 1000, 2000]
    assert summary["shape"] == list(SHAPE) + [summary["acquisition"]["n_volumes"]]
    assert summary["models"]["msdki"]["methods"] == list(METHODS)
    assert summary["validator"].startswith(("bids-validator-deno", "pybids"))
    assert set(summary["versions"]) == {"vaemap", "torch", "dipy", "nipype", "numpy"}
    assert summary["device"] == "cpu" and summary["seed"] == 3
    mask = nib.load(run["out"] / "sub-01/dwi/sub-01_desc-brain_mask.nii.gz").get_fdata()
    assert summary["mask"]["n_voxels"] == int(mask.sum())
    record = json.loads((log / "sub-01_model-ballstick_desc-vaegmm_fit.json").read_text())
    assert set(record) >= {"model", "method", "hyperparameters", "history", "timings", "device",
                           "seed", "n_voxels", "n_invalid", "n_at_bound", "nrmse_median",
                           "nrmse_mean", "maps"}
    assert set(record["maps"]) == set(PARAMS["ballstick"])
    assert record["threads"] == {"torch": 1, "blas": 1}  # --omp-nthreads 1: the thread budget
    assert all((run["out"] / p).is_file() for p in record["maps"].values())
    assert len(record["history"]["loss"]) == record["hyperparameters"]["epochs_run"]
    with np.load(log / "sub-01_model-ballstick_desc-vaegmm_latent.npz") as latent:
        latent_dim = record["hyperparameters"].get("latent_dim")
        assert latent["latent_mean"].shape[0] == record["n_voxels"]
        if isinstance(latent_dim, int):  # resolved by the estimator (null = number of outputs)
            assert latent["latent_mean"].shape[1] == latent_dim
        assert latent["responsibilities"].shape == (record["n_voxels"], 3)
        np.testing.assert_allclose(latent["responsibilities"].sum(axis=1), 1, atol=1e-4)
        assert mask.ravel()[latent["index"]].all()


def _load(out, method, param, model="msdki"):
    return nib.load(out / f"sub-01/dwi/sub-01_model-{model}_desc-{method}_param-{param}"
                          "_dwimap.nii.gz").get_fdata()


def test_maps_against_phantom_truth(run):
    series = run["phantom"]["series"][0]
    ours = nib.load(run["out"] / "sub-01/dwi/sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    brain = ours & (nib.load(series["mask"]).get_fdata() > 0)
    assert brain.sum() > 0.8 * ours.sum()
    truth = {p: nib.load(series["truth"][p]).get_fdata()[brain] for p in ("msd", "msk")}
    for method in METHODS:
        msd = _load(run["out"], method, "msd")[brain]
        msk = _load(run["out"], method, "msk")[brain]
        assert np.isfinite(msd).all() and np.isfinite(msk).all()
        assert (msd > 0).all() and (msd < 3.5).all() and (msk >= 0).all() and (msk <= 3).all()
        # the maps are in the right voxels, units and order: strong correlation with the truth
        # for every method (measured r >= 0.96 for msd and >= 0.93 for msk); the networks'
        # errors after 25 epochs are the estimators' business, so their bounds are loose
        assert np.corrcoef(msd, truth["msd"])[0, 1] > 0.9, method
        assert np.corrcoef(msk, truth["msk"])[0, 1] > 0.8, method
        assert np.median(np.abs(msd - truth["msd"])) < 0.2, method
        assert np.median(np.abs(msk - truth["msk"])) < 0.35, method
    lsq = {p: _load(run["out"], "lsq", p)[brain] for p in ("msd", "msk")}
    assert np.median(np.abs(lsq["msd"] - truth["msd"]) / truth["msd"]) < 0.06  # measured 0.025
    assert np.median(np.abs(lsq["msk"] - truth["msk"])) < 0.08  # measured 0.034
    nrmse = nib.load(run["out"] / "sub-01/dwi/sub-01_model-msdki_desc-lsq_stat-nrmse_dwimap.nii.gz"
                     ).get_fdata()[brain]
    assert np.all((nrmse > 0) & (nrmse < 0.2))  # SNR 30: about 0.04-0.08 measured
    dseg = nib.load(run["out"] / "sub-01/dwi/sub-01_model-msdki_desc-vaegmm_dseg.nii.gz")
    labels = np.asanyarray(dseg.dataobj)
    assert set(np.unique(labels[ours])) <= {1, 2, 3} and (labels[~ours] == 0).all()
    probseg = nib.load(run["out"] / "sub-01/dwi/sub-01_model-msdki_desc-vaegmm_probseg.nii.gz")
    assert probseg.shape == SHAPE + (3,)
    np.testing.assert_allclose(probseg.get_fdata()[ours].sum(axis=-1), 1, atol=1e-4)
    ref = nib.load(series["dwi"])
    assert np.allclose(dseg.affine, ref.affine) and np.allclose(probseg.affine, ref.affine)


def test_validator_accepts_outputs(run, tmp_path):
    from vaemap_bids.dataset.bids import run_bids_validator
    report = run_bids_validator(run["out"], tmp_path)
    if report is None:
        pytest.skip("bids-validator-deno cannot run here")
    assert not report.errors, report.first_errors()


def _result_files(work: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in work.rglob("result_*.pklz")}


def test_resume_reruns_only_the_removed_fit(run):
    out, work = run["out"], run["work"]
    before = _result_files(work)
    maps_before = {m: _load(out, m, "msk") for m in METHODS}
    assert {"prepare_series", "fit_msdki_vaegmm", "fit_ballstick_lsq"} <= set(before)
    target = next(work.rglob("fit_msdki_vaegmm/result_fit_msdki_vaegmm.pklz"))
    target.unlink()
    # resumed from the settings file the first run wrote (issue 12: resume and audit from it)
    (settings,) = work.glob("config-*.toml")
    code = vaemap("--config-file", settings, "--skip-bids-validation")
    assert code == 0
    after = _result_files(work)
    rerun = {name for name in after if after[name] != before.get(name)}
    # the sinks always run (they restore deleted outputs), and so do the summary and the merge
    # of the record paths feeding it; the refitted node's products follow it; nothing else
    always = {"merge_records", "summary", "summary_early"}
    assert {n for n in rerun if not n.startswith("ds_")} - always == {"fit_msdki_vaegmm",
                                                                      "products_msdki_vaegmm"}
    for method in METHODS:
        np.testing.assert_array_equal(_load(out, method, "msk"), maps_before[method])


def test_ballstick_directions_in_ras_image(tmp_path):
    """An RAS-stored image (det > 0): the .bvec frame flips voxel x; the dir map is in ijk."""
    phantom = write_phantom_dataset(tmp_path / "bids", tmp_path / "truth", model="ballstick",
                                    shape=SHAPE, seed=2, orientation="RAS", snr=80)
    code = vaemap(tmp_path / "bids", tmp_path / "out", "participant", "-w", tmp_path / "work",
                  "--models", "ballstick", "--methods", "lsq", "--nprocs", "1",
                  "--skip-bids-validation")
    assert code == 0
    series = phantom["series"][0]
    assert np.linalg.det(nib.load(series["dwi"]).affine[:3, :3]) > 0
    truth_dir = nib.load(series["truth"]["dir"]).get_fdata()
    truth_f = nib.load(series["truth"]["stickfrac"]).get_fdata()
    est = _load(tmp_path / "out", "lsq", "dir", "ballstick")
    mask = nib.load(tmp_path / "out/sub-01/dwi/sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    fibre = mask & (truth_f > 0.45)
    assert fibre.sum() > 50
    expected = truth_dir[fibre] * np.array([-1.0, 1.0, 1.0])  # .bvec frame -> ijk
    cos = np.abs(np.sum(est[fibre] * expected, axis=1))
    assert np.median(cos) > np.cos(np.deg2rad(10))
    # without the flip the directions would be wrong wherever the fibre has an x component
    wrong = np.abs(np.sum(est[fibre] * truth_dir[fibre], axis=1))
    assert np.median(wrong) < np.median(cos)


def test_sessions_acq_runs_and_plugin_file(tmp_path):
    write_phantom_dataset(tmp_path / "bids", tmp_path / "truth", sessions=("a", "b"), runs=(1, 2),
                          acq_label="hcp", shape=(10, 12, 9), seed=4)
    plugin = tmp_path / "plugin.yml"
    plugin.write_text("plugin: Linear\n")
    code = vaemap(tmp_path / "bids", tmp_path / "out", "participant", "-w", tmp_path / "work",
                  "--participant-label", "sub-01", "--session-label", "b", "--models", "msdki",
                  "--methods", "lsq", "--use-plugin", plugin, "--skip-bids-validation")
    assert code == 0
    out = tmp_path / "out" / "sub-01"
    assert not (out / "ses-a").exists()
    for run_idx in (1, 2):
        prefix = f"sub-01_ses-b_acq-hcp_run-{run_idx}"
        assert (out / "ses-b/dwi" / f"{prefix}_model-msdki_desc-lsq_param-msd_dwimap.nii.gz").is_file()
        summary = json.loads((out / "ses-b/log" / f"{prefix}_summary.json").read_text())
        assert summary["session"] == "b" and summary["entities"]["run"] == str(run_idx)
        assert summary["entities"]["acquisition"] == "hcp"
    toml = list((tmp_path / "work").glob("config-*.toml"))
    assert len(toml) == 1 and 'plugin = "Linear"' in toml[0].read_text()


def test_console_script_exit_code(tmp_path):
    """The installed entry point returns the code (not just the in-process main())."""
    exe = Path(sys.executable).with_name("vaemap")
    if not exe.exists():
        pytest.skip("the vaemap console script is not installed in this environment")
    proc = subprocess.run([str(exe), str(tmp_path / "missing"), str(tmp_path / "out"),
                           "participant"], capture_output=True, text=True)
    assert proc.returncode == 66 and "BIDS_DIR" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_given_derivative_mask_is_used(tmp_path):
    """A QSIPrep-style desc-brain_mask in --derivatives replaces median_otsu and is written out."""
    phantom = write_phantom_dataset(tmp_path / "bids", tmp_path / "truth", shape=(10, 12, 9),
                                    seed=6)
    deriv = tmp_path / "qsiprep" / "sub-01" / "dwi"
    deriv.mkdir(parents=True)
    given = deriv / "sub-01_desc-brain_mask.nii.gz"
    truth_mask = nib.load(phantom["series"][0]["mask"])
    data = np.asanyarray(truth_mask.dataobj).copy()
    data[: data.shape[0] // 2] = 0  # half a brain: clearly not what median_otsu would find
    nib.save(nib.Nifti1Image(data, truth_mask.affine, truth_mask.header), str(given))
    code = vaemap(tmp_path / "bids", tmp_path / "out", "participant", "-w", tmp_path / "work",
                  "--derivatives", tmp_path / "qsiprep", "--models", "msdki", "--methods", "lsq",
                  "--nprocs", "1", "--skip-bids-validation")
    assert code == 0
    written = nib.load(tmp_path / "out/sub-01/dwi/sub-01_desc-brain_mask.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(written.dataobj) > 0, data > 0)
    summary = json.loads((tmp_path / "out/sub-01/log/sub-01_summary.json").read_text())
    assert summary["inputs"]["mask_source"] == f"given: {given}"
    assert summary["mask"]["n_voxels"] == int((data > 0).sum())
    msd = _load(tmp_path / "out", "lsq", "msd")
    assert (msd[data > 0] > 0).all() and (msd[data == 0] == 0).all()  # 0 outside the mask
    valid = nib.load(tmp_path / "out/sub-01/dwi/sub-01_desc-valid_mask.nii.gz").get_fdata()
    np.testing.assert_array_equal(valid > 0, data > 0)


def test_calibration_check_in_the_fit_records_and_the_report(run):
    """Every method with a std carries the simulated coverage check of its intervals (the
    report's calibration panel); ssl (no std) carries none."""
    log = run["out"] / "sub-01" / "log"
    for method in ("lsq", "vaegmm"):
        rec = json.loads((log / f"sub-01_model-msdki_desc-{method}_fit.json").read_text())
        cal = rec["calibration"]
        assert cal["n_voxels"] > 100 and set(cal["coverage"]) == {"msd", "msk"}, method
        for param, levels in cal["coverage"].items():
            assert all(0.0 <= v <= 1.0 for v in levels.values()), (method, param)
            assert levels["0.99"] >= levels["0.5"], (method, param)
    ssl = json.loads((log / "sub-01_model-msdki_desc-ssl_fit.json").read_text())
    assert ssl["calibration"] is None
    html = (run["out"] / "sub-01.html").read_text()
    assert 'id="calibration"' in html and "_calibration.png" in html
