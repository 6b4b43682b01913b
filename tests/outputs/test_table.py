"""The derivatives table and the products of a fit: names, kinds, and the science of turning
estimates into files (direction frame, hard clusters, background, the record last)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.fitting.base import ESTIMATORS, Estimator
from vaemap_bids.outputs.products import (fit_products, hard_clusters, latent_subsample,
                                          rows_to_volume, series_products, write_products)
from vaemap_bids.outputs.table import KINDS, fit_outputs, output, series_outputs

SERIES = {"subject": "01", "session": "pre", "acquisition": "ms", "run": "02"}


def test_names_follow_the_contract():
    pre = "sub-01_ses-pre_acq-ms_run-02"
    assert output("param", SERIES, model="msdki", method="lsq", param="msd").path == \
        f"sub-01/ses-pre/dwi/{pre}_model-msdki_desc-lsq_param-msd_dwimap.nii.gz"
    assert output("std", SERIES, model="msdki", method="vaegmm", param="msk").name == \
        f"{pre}_model-msdki_desc-vaegmm_param-msk_stat-std_dwimap.nii.gz"
    assert output("nrmse", SERIES, model="ballstick", method="ssl").name == \
        f"{pre}_model-ballstick_desc-ssl_stat-nrmse_dwimap.nii.gz"
    assert output("mask", SERIES).name == f"{pre}_desc-brain_mask.nii.gz"
    assert output("valid_mask", SERIES).sidecar_path == \
        f"sub-01/ses-pre/dwi/{pre}_desc-valid_mask.json"
    assert output("fit_record", SERIES, model="msdki", method="lsq").path == \
        f"sub-01/ses-pre/log/{pre}_model-msdki_desc-lsq_fit.json"
    assert output("summary", {"subject": "01"}).path == "sub-01/log/sub-01_summary.json"
    with pytest.raises(ValueError, match="unknown output kind"):
        output("maps", SERIES)
    with pytest.raises(ValueError, match="invalid"):
        output("param", SERIES, model="msdki", method="l_s_q", param="msd").name


def test_fit_outputs_follow_the_parameters_and_the_estimator(monkeypatch):
    kinds = lambda model, method: [o.kind for o in fit_outputs(SERIES, model, method)]  # noqa: E731
    assert kinds("msdki", "lsq") == ["param", "param", "std", "std", "nrmse", "fit_record"]
    assert kinds("ballstick", "vaegmm") == (["param"] * 4 + ["std"] * 3 + ["nrmse", "dseg",
                                            "dseg_tsv", "probseg", "latent", "fit_record"])
    # a direction has no std map; every file is required except the latent subsample
    params = [o.entities["param"] for o in fit_outputs(SERIES, "ballstick", "vaeunig")
              if o.kind == "std"]
    assert params == ["stickfrac", "dpar", "diso"]
    assert [o.kind for o in fit_outputs(SERIES, "msdki", "vaegmm") if not o.required] == ["latent"]
    # a new estimator's outputs come from its registry row, nothing else
    monkeypatch.setitem(ESTIMATORS, "toy", Estimator("toy", "a toy", False, ("std",)))
    assert kinds("msdki", "toy") == ["param", "param", "std", "std", "nrmse", "fit_record"]
    assert [o.kind for o in series_outputs(SERIES)] == ["mask", "valid_mask", "summary"]
    assert set(KINDS) >= {"mask", "valid_mask", "param", "std", "nrmse", "dseg", "probseg"}


def test_rows_clusters_and_latent_subsample():
    mask = np.zeros((4, 5, 3), bool)
    mask[1:3, 1:4, 1] = True
    rows = np.arange(6, dtype=np.float32)
    vol = rows_to_volume(rows, mask)
    assert vol[~mask].sum() == 0 and np.array_equal(vol[mask], rows)
    resp = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [np.nan] * 3, [0.2, 0.5, 0.3],
                     [0.3, 0.3, 0.4], [0.6, 0.3, 0.1]])
    assert hard_clusters(resp).tolist() == [1, 3, 0, 2, 3, 1]
    latent = np.arange(12, dtype=np.float32).reshape(6, 2)
    latent[2] = np.nan
    sub = latent_subsample(latent, mask, seed=0, responsibilities=resp, limit=3)
    assert sub["latent_mean"].shape == (3, 2) and sub["responsibilities"].shape == (3, 3)
    flat = np.flatnonzero(mask.ravel())
    assert set(sub["index"]) <= set(flat) and flat[2] not in sub["index"]  # unfitted left out
    assert tuple(sub["shape"]) == mask.shape


@pytest.mark.parametrize("det_sign", [1, -1])
def test_fit_products_write_the_table_with_background_zero(tmp_path, det_sign):
    mask = np.zeros((5, 4, 3), bool)
    mask[1:4, 1:3, 1] = True
    n = int(mask.sum())
    affine = np.diag([2.0 * det_sign, 2.0, 2.0, 1.0])
    params = np.tile(np.array([[0.6, 1.5, 0.8, 1.0, 0.0, 0.0]], np.float32), (n, 1))
    params[0] = np.nan  # an excluded voxel
    arrays = {"params": params, "nrmse": np.full(n, 0.05, np.float32),
              "std": np.full((n, 6), 0.1, np.float32),
              "responsibilities": np.tile([[0.1, 0.9]], (n, 1)),
              "latent_mean": np.zeros((n, 3), np.float32)}
    record = {"model": "ballstick", "method": "vaegmm", "hyperparameters": {"epochs": 3},
              "seed": 4, "device": "cpu", "n_measurements": 30}
    ents = {"subject": "01"}
    products = fit_products(arrays, record, ents, mask, affine, ["bids:raw:x"])
    assert [p.output for p in products] == fit_outputs(ents, "ballstick", "vaegmm")
    ref = nib.Nifti1Image(mask.astype(np.uint8), affine)
    ref.header.set_qform(affine, 1)
    ref.header.set_sform(affine, 2)
    written = write_products(products, tmp_path, ref)
    assert written[-1].name == "sub-01_model-ballstick_desc-vaegmm_fit.json"
    dwi = tmp_path / "sub-01" / "dwi"
    f = nib.load(dwi / "sub-01_model-ballstick_desc-vaegmm_param-stickfrac_dwimap.nii.gz")
    data = np.asanyarray(f.dataobj)
    assert data.dtype == np.float32 and (data[~mask] == 0).all()
    assert data[mask][0] == 0 and np.allclose(data[mask][1:], 0.6)  # excluded voxel: 0
    assert int(f.header["qform_code"]) == 1 and int(f.header["sform_code"]) == 2
    direction = np.asanyarray(nib.load(dwi / "sub-01_model-ballstick_desc-vaegmm_param-dir"
                                       "_dwimap.nii.gz").dataobj)
    # .bvec frame -> voxel axes: x flips where det(affine) > 0
    assert np.allclose(direction[mask][1:, 0], -1.0 if det_sign > 0 else 1.0)
    dseg = np.asanyarray(nib.load(dwi / "sub-01_model-ballstick_desc-vaegmm_dseg.nii.gz").dataobj)
    assert dseg.dtype == np.int16 and set(np.unique(dseg[mask])) == {2} and (dseg[~mask] == 0).all()
    side = json.loads((dwi / "sub-01_model-ballstick_desc-vaegmm_param-dir_dwimap.json").read_text())
    assert side["OrientationEncoding"] == {"Type": "unit3vector", "Reference": "ijk"}
    assert side["RandomSeed"] == 4 and side["Model"]["Parameters"] == {"epochs": 3}
    final = json.loads(written[-1].read_text())
    assert set(final["maps"]) == {"stickfrac", "dpar", "diso", "dir"}
    assert all((tmp_path / p).is_file() for p in final["maps"].values())
    assert final["probseg"].endswith("_probseg.nii.gz") and final["latent"].endswith(".npz")


def test_series_products_masks(tmp_path):
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    valid = mask.copy()
    valid[1, 1, 1] = False
    products = series_products({"subject": "01"}, mask, valid, "given: m.nii.gz",
                               {"nonfinite": 1, "nonpositive_b0": 0}, ["bids:raw:x"])
    write_products(products, tmp_path, nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)))
    got = nib.load(tmp_path / "sub-01/dwi/sub-01_desc-valid_mask.nii.gz")
    assert np.array_equal(np.asanyarray(got.dataobj) > 0, valid)
    side = json.loads((tmp_path / "sub-01/dwi/sub-01_desc-valid_mask.json").read_text())
    assert side["ExcludedVoxels"] == {"nonfinite": 1, "nonpositive_b0": 0}
    assert "1 nonfinite" in side["Description"]
