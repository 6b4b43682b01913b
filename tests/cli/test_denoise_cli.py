"""``--denoise``: the option, its settings round trip, and both dipy denoisers through the graph."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from vaemap_bids.cli.parser import parse_args
from vaemap_bids.cli.run import build_config, main
from vaemap_bids.config import Config

PHANTOM = {"shape": (10, 12, 9), "seed": 3}  # the ``base`` fixture (conftest.py)
PREFIX = "sub-01/dwi/sub-01"


def _run(capsys, base, out, *extra):
    code = main([str(base / "bids"), str(out), "participant", "-w", str(out.parent / (out.name + "_w")),
                 "--nprocs", "1", "--skip-bids-validation", "--models", "msdki", "--methods",
                 "lsq", "--device", "cpu", *extra])
    return code, capsys.readouterr().err


def test_bad_denoise_value_exits_64(capsys, base, tmp_path):
    code, err = _run(capsys, base, tmp_path / "out", "--denoise", "nlmeans")
    assert code == 64 and "--denoise" in err and "nlmeans" in err and "Traceback" not in err
    code, err = _run(capsys, base, tmp_path / "out", "--denoise-output")
    assert code == 64 and "--denoise-output" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("sub-*"))


def test_denoise_settings_round_trip(tmp_path, base):
    args = parse_args([str(base / "bids"), str(tmp_path / "o"), "participant", "-w",
                       str(tmp_path / "w"), "--denoise", "patch2self", "--denoise-output"])
    config = build_config(args)
    assert (config.denoise, config.denoise_output) == ("patch2self", True)
    back = Config.from_toml(config.write_toml(config.toml_path()))
    assert (back.denoise, back.denoise_output) == ("patch2self", True)
    again = build_config(parse_args(["--config-file", str(config.toml_path())]))
    assert (again.denoise, again.denoise_output) == ("patch2self", True)
    assert build_config(parse_args([str(base / "bids"), str(tmp_path / "o"), "participant",
                                    "-w", str(tmp_path / "w")])).denoise == "none"


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("denoise_runs")
    done = {}
    for method, extra in (("none", ()), ("mppca", ("--denoise-output",)), ("patch2self", ())):
        out = root / method
        args = [str(base / "bids"), str(out), "participant", "-w", str(root / f"{method}_w"),
                "--nprocs", "1", "--skip-bids-validation", "--models", "msdki", "--methods",
                "lsq", "--device", "cpu", *extra]
        if method != "none":
            args += ["--denoise", method]
        done[method] = (main(args), out)
    return done


@pytest.mark.parametrize("method", ["mppca", "patch2self"])
def test_denoisers_run_through_the_graph(runs, method):
    code, out = runs[method]
    assert code == 0
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["vaemap"]["denoise"] == method
    assert method in desc["GeneratedBy"][0]["Description"].lower()
    side = json.loads((out / f"{PREFIX}_model-msdki_desc-lsq_param-msd_dwimap.json").read_text())
    assert side["Denoising"]["Method"] == method
    record = json.loads((out / f"{PREFIX}_model-msdki_desc-lsq_fit.json".replace("/dwi/", "/log/"))
                        .read_text())
    assert record["denoise"] == method
    summary = json.loads((out / f"{PREFIX}_summary.json".replace("/dwi/", "/log/")).read_text())
    assert summary["denoise"]["method"] == method
    assert "Denoising (--denoise)" in (out / "sub-01.html").read_text()
    # the fits read the denoised series: the maps differ from the run without denoising
    mine = np.asarray(nib.load(out / f"{PREFIX}_model-msdki_desc-lsq_param-msd_dwimap.nii.gz").dataobj)
    plain = np.asarray(nib.load(runs["none"][1] / f"{PREFIX}_model-msdki_desc-lsq_param-msd_dwimap.nii.gz").dataobj)
    assert mine.shape == plain.shape and not np.allclose(mine, plain)
    # the denoised series is a derivative only on request
    denoised = out / f"{PREFIX}_desc-denoised_dwi.nii.gz"
    if method == "mppca":
        img = nib.load(denoised)
        assert img.shape[3] == len(np.loadtxt(str(denoised).replace(".nii.gz", ".bval")))
        side = json.loads(denoised.with_name(denoised.name.replace(".nii.gz", ".json")).read_text())
        assert side["Denoising"]["Method"] == "mppca" and side["Denoising"]["sigma_median"] > 0
    else:
        assert not denoised.exists()


def test_no_denoise_records_none(runs):
    code, out = runs["none"]
    assert code == 0
    side = json.loads((out / f"{PREFIX}_model-msdki_desc-lsq_param-msd_dwimap.json").read_text())
    assert "Denoising" not in side
    assert json.loads((out / "dataset_description.json").read_text())["vaemap"]["denoise"] == "none"
