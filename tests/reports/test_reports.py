"""QC reports: the participant HTML report and the group level.

End to end: a real ``vaemap`` participant run of two phantom subjects (few epochs), then both
report entry points on its outputs; the HTML is parsed (every src/href resolves, nothing from the
network, every section present) and loaded in headless chromium (screenshots kept in
``test-artifacts/``). A synthetic output dir written to the workflow's documented contract adds
what the tiny run has not: sessions, a flipped affine, an outlier subject, a subject that failed.
"""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import nibabel as nib
import numpy as np
import pytest
from lxml import html as lxml_html

from vaemap_bids import naming
from vaemap_bids.atomic import TEMP_SUFFIX
from vaemap_bids.fitting.base import ESTIMATORS
from vaemap_bids.outputs.table import output
from vaemap_bids.reports import metrics
from vaemap_bids.reports.collect import load_canonical
from vaemap_bids.config import ExitCode
from vaemap_bids.reports.group import run_group
from vaemap_bids.reports.participant import SECTIONS, generate_participant_report

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
SECTION_IDS = [sid for sid, _ in SECTIONS]
FIGURE_SECTIONS = ("maps", "fit-quality", "agreement", "training", "latent", "clusters")


# ---- metrics: plain functions ------------------------------------------------------------------
def test_robust_z_and_outliers():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0, np.nan])
    z = metrics.robust_z(x)
    # median 3, MAD = median(|x - 3|) = median(2, 1, 0, 1, 97) = 1
    np.testing.assert_allclose(z[:5], (x[:5] - 3.0) / 1.4826)
    assert np.isnan(z[5])
    assert metrics.outliers(x).tolist() == [False, False, False, False, True, False]
    same = metrics.robust_z([2.0, 2.0, 2.0, 5.0])  # MAD 0: only the lone deviation is flagged
    assert same.tolist()[:3] == [0.0, 0.0, 0.0] and np.isposinf(same[3])
    assert metrics.outliers([1.0, 1.1, 0.9, 1.05]).sum() == 0


def test_median_iqr_agreement_and_angles():
    med, iqr = metrics.median_iqr([np.nan, 1, 2, 3, 4, 5])
    assert med == 3 and iqr == 2
    assert all(np.isnan(metrics.median_iqr([np.nan])))
    ref = np.linspace(0, 1, 101)
    a = metrics.agreement(ref, ref + 0.1)
    assert a["n"] == 101 and a["r"] == pytest.approx(1.0) and a["bias"] == pytest.approx(0.1)
    assert a["loa_low"] == pytest.approx(0.1) and a["loa_high"] == pytest.approx(0.1)
    noisy = ref + np.random.default_rng(0).normal(0, 0.05, ref.size)
    b = metrics.agreement(ref, noisy)
    sd = np.std(noisy - ref, ddof=1)
    assert b["loa_high"] - b["loa_low"] == pytest.approx(2 * 1.96 * sd)
    with pytest.raises(ValueError, match="differ in size"):
        metrics.agreement([1, 2], [1, 2, 3])
    n = np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]])
    m = np.array([[-1.0, 0, 0], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_allclose(metrics.angular_difference_deg(n, m), [0, 90, 45], atol=1e-9)


def test_msdki_validity_count_uses_largest_shell_up_to_2500():
    shells = [{"bval_smm2": 0}, {"bval_smm2": 1000}, {"bval_smm2": 2005}, {"bval_smm2": 3000}]
    assert metrics.msdki_b_max(shells) == 2005
    assert metrics.msdki_b_max([{"bval_smm2": 0}, {"bval_smm2": 3000}]) is None
    d = np.array([1.0, 1.0, 1.0, np.nan])
    k = np.array([1.0, 1.49, 1.5, 2.0])
    # b D K >= 3 with b = 2 ms/um^2: K >= 1.5 at D = 1
    assert metrics.msdki_outside_validity(d, k, 2000.0) == 1
    assert metrics.msdki_outside_validity(d, k, 3000.0) == 3  # 3 * 1 * 1 = 3 is already outside


def test_pca_and_per_label_statistics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 5)) * np.array([5.0, 2.0, 0.1, 0.1, 0.1])
    scores, ratio = metrics.pca_2d(x)
    assert scores.shape == (500, 2) and ratio[0] > ratio[1] > 0 and ratio.sum() <= 1
    np.testing.assert_allclose(np.abs(np.corrcoef(scores[:, 0], x[:, 0])[0, 1]), 1, atol=0.01)
    with pytest.raises(ValueError):
        metrics.pca_2d(np.ones((1, 3)))
    vals = np.array([1.0, 2.0, 3.0, 10.0, 20.0, np.nan])
    labels = np.array([1, 1, 1, 2, 2, 0])
    stats = metrics.per_label_median_iqr(vals, labels)
    assert stats == {1: (3, 2.0, 1.0), 2: (2, 15.0, 5.0)}


# ---- a synthetic output dir that follows the workflow's contract --------------------------------
SHAPE = (22, 26, 10)
AFFINE = np.diag([-2.0, 2.0, 2.5, 1.0])  # x runs right -> left: the reports must reorient
TISSUE = {1: (0.9, 1.1), 2: (1.2, 0.7), 3: (2.9, 0.1)}  # msd, msk: physical up to b = 2000
SHELLS = [{"bval_smm2": 0.0, "n_volumes": 6, "n_directions": 0},
          {"bval_smm2": 1000.0, "n_volumes": 30, "n_directions": 30},
          {"bval_smm2": 2000.0, "n_volumes": 30, "n_directions": 30},
          {"bval_smm2": 3000.0, "n_volumes": 30, "n_directions": 30}]


def _phantom():
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + (z * 0.8) ** 2)
    mask = r < 0.9
    tissue = np.where(mask, 2, 0)
    tissue[mask & (r < 0.55)] = 1
    tissue[mask & (((np.abs(x) - 0.22) ** 2 / 0.02 + y ** 2 / 0.12 + z ** 2 / 0.5) < 1)] = 3
    return mask, tissue


def _map(ent: dict, model: str, method: str, param: str) -> str:
    return output("param", ent, model=model, method=method, param=param).path


def _save(path: Path, data, dtype=np.float32):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), AFFINE), str(path))
    Path(naming.sidecar(str(path))).write_text("{}")


def write_synthetic_series(out: Path, entities: dict, seed: int, shift: float = 0.0,
                           offset: float = 0.0, methods=("lsq", "vaeunig", "vaegmm"),
                           n_unphysical: int = 0):
    """One MS-DKI series (ball-stick skipped) with every file of the derivatives table;
    ``offset`` is added to both parameters (between-subject spread), ``shift`` to the
    diffusivity only (an outlier subject); ``n_unphysical`` lsq voxels get b D K >= 3 at b = 2000."""
    rng = np.random.default_rng(seed)
    mask, tissue = _phantom()
    n = int(mask.sum())
    dwi, logd = out / naming.subject_dir(entities) / "dwi", out / naming.subject_dir(entities) / "log"
    logd.mkdir(parents=True, exist_ok=True)
    _save(dwi / output("mask", entities).name, mask, np.uint8)
    _save(dwi / output("valid_mask", entities).name, mask, np.uint8)
    truth = {"msd": np.zeros(SHAPE), "msk": np.zeros(SHAPE)}
    for label, (d, k) in TISSUE.items():
        truth["msd"][tissue == label] = d + shift + offset
        truth["msk"][tissue == label] = k + offset
    noise = {"lsq": 0.05, "ssl": 0.04, "vaeunig": 0.02, "vaegmm": 0.015}
    for method in methods:
        maps = {p: np.where(mask, np.clip(truth[p] + rng.normal(0, noise[method], SHAPE), 0.01, 3),
                            0.0) for p in truth}
        if method == "lsq":
            for idx in np.argwhere(tissue == 1)[:n_unphysical]:
                maps["msd"][tuple(idx)], maps["msk"][tuple(idx)] = 1.2, 1.3  # 2 * 1.2 * 1.3 > 3
        rel = {}
        for p, v in maps.items():
            name = output("param", entities, model="msdki", method=method, param=p).name
            _save(dwi / name, v)
            rel[p] = f"{naming.subject_dir(entities)}/dwi/{name}"
            if "std" in ESTIMATORS[method].outputs:  # the VAE methods and lsq
                std = np.where(mask, np.abs(rng.normal(0.05, 0.02, SHAPE)) * tissue, 0)
                _save(dwi / output("std", entities, model="msdki", method=method, param=p).name,
                      std)
        nrmse = np.where(mask, np.abs(rng.normal(0.02 + noise[method] / 4, 0.01, SHAPE)), 0)
        _save(dwi / output("nrmse", entities, model="msdki", method=method).name, nrmse)
        history = {k: [] for k in ("loss", "recon", "kl", "beta", "sigma", "val_loss")}
        if method != "lsq":
            ep = np.arange(12)
            recon = 0.01 + 0.2 * np.exp(-ep / 4)
            history = {"loss": (recon + 1e-3).tolist(), "recon": recon.tolist(),
                       "kl": (1 + np.exp(-ep / 5)).tolist(), "beta": np.clip(ep / 6, 0, 1).tolist(),
                       "sigma": np.geomspace(0.08, 0.05, 12).tolist(),
                       "val_loss": (recon * 1.1).tolist()}
        record = {"model": "msdki", "method": method, "hyperparameters": {"epochs": 12},
                  "history": history, "timings": {"fit_seconds": 2.0, "voxels_per_second": n / 2},
                  "device": "cpu", "seed": 3, "n_voxels": n, "n_invalid": 0, "n_at_bound": 1,
                  "nrmse_median": float(np.median(nrmse[mask])),
                  "nrmse_mean": float(np.mean(nrmse[mask])), "maps": rel}
        (logd / output("fit_record", entities, model="msdki", method=method).name).write_text(
            json.dumps(record))
        if method.startswith("vae"):
            index = np.flatnonzero(mask)[::3]
            lab = tissue.ravel()[index]
            arrays = {"latent_mean": rng.normal(0, 0.3, (index.size, 4)) + np.eye(4)[lab] * 2,
                      "index": index}
            if method == "vaegmm":
                arrays["responsibilities"] = np.eye(3)[lab - 1] * 0.9 + 0.1 / 3
            np.savez(logd / output("latent", entities, model="msdki", method=method).name,
                     **arrays)
    if "vaegmm" in methods:
        _save(dwi / output("dseg", entities, model="msdki", method="vaegmm").name, tissue,
              np.int16)
        _save(dwi / output("probseg", entities, model="msdki", method="vaegmm").name,
              np.stack([np.where(mask, (tissue == i) * 0.9 + 0.05, 0) for i in (1, 2, 3)], -1))
        (dwi / output("dseg_tsv", entities, model="msdki", method="vaegmm").name).write_text(
            "index\tname\n1\tcomponent1\n2\tcomponent2\n3\tcomponent3\n")
    summary = {"subject": entities["subject"], "session": entities.get("session"),
               "entities": entities, "prefix": naming.prefix(entities),
               "inputs": {"dwi": "dwi.nii.gz", "bval": "dwi.bval", "bvec": "dwi.bvec",
                          "mask_source": "dipy median_otsu"},
               "acquisition": {"n_volumes": 96, "shells": SHELLS}, "shape": list(SHAPE) + [96],
               "voxel_size_mm": [2.0, 2.0, 2.5],
               "mask": {"n_voxels": n, "volume_ml": n * 0.01, "excluded_nonfinite": 0},
               "models": {"msdki": {"status": "ran", "reason": None, "methods": list(methods),
                                    "n_measurements": 66},
                          "ballstick": {"status": "skipped", "reason": "not requested",
                                        "methods": [], "n_measurements": 0}},
               "device": "cpu", "seed": 3, "versions": {"vaemap": "0.1.0", "torch": "2.13.0"},
               "validator": "skipped", "started": "2026-01-01T00:00:00+00:00",
               "finished": "2026-01-01T00:01:00+00:00"}
    (logd / output("summary", entities).name).write_text(json.dumps(summary))


# ---- HTML checks -------------------------------------------------------------------------------
def check_html(path: Path) -> lxml_html.HtmlElement:
    """Parse ``path``; every src/href must resolve locally (data: URIs, #ids of the page or files
    that exist) and nothing may come from the network."""
    text = path.read_text(encoding="utf-8")
    doc = lxml_html.fromstring(text)
    ids = set(doc.xpath("//@id"))
    for el in doc.xpath("//*[@src or @href]"):
        for attr in ("src", "href"):
            ref = el.get(attr)
            if ref is None:
                continue
            assert not re.match(r"^\s*(https?:)?//", ref, re.I), f"{path.name}: network {attr} {ref}"
            if ref.startswith("data:"):
                assert ref.startswith("data:image/"), f"{path.name}: unexpected data URI {ref[:40]}"
                continue
            if ref.startswith("#"):
                assert ref[1:] in ids, f"{path.name}: anchor {ref} has no target"
                continue
            parsed = urlparse(ref)
            assert parsed.scheme == "", f"{path.name}: {attr} {ref} is not a relative path"
            assert (path.parent / unquote(parsed.path)).is_file(), f"{path.name}: {ref} missing"
    assert not doc.xpath("//script[@src] | //link[@rel='stylesheet'] | //iframe | //object")
    for style in doc.xpath("//style/text()") + doc.xpath("//@style"):
        assert not re.search(r"url\(|@import", style), f"{path.name}: external CSS resource"
    return doc


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(args: list[str], url: str, tmp: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


PROBE = """<script>
window.__vaemapErrors = [];
window.addEventListener('error', function (e) { var t = e.target;
  window.__vaemapErrors.push(t && (t.src || t.href) ? 'failed to load ' + (t.src || t.href) : String(e.message)); }, true);
window.addEventListener('load', function () {
  var bad = Array.prototype.filter.call(document.images, function (i) { return !(i.complete && i.naturalWidth > 0); })
    .map(function (i) { return i.getAttribute('src').slice(0, 120); });
  var out = document.createElement('pre'); out.id = 'vaemap-probe'; out.hidden = true;
  out.textContent = JSON.stringify({images: document.images.length, broken: bad, errors: window.__vaemapErrors});
  document.body.appendChild(out);
});
</script>"""


def browser_check(page: Path, tmp: Path, png: Path | None = None) -> tuple[dict, np.ndarray | None]:
    """Load a copy of ``page`` (same folder, so relative links resolve the same) with a probe that
    records every resource that failed to load and every image that did not decode; with ``png``
    also take a 1400 x 3000 screenshot. Returns (probe result, screenshot RGB array or None)."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1),
                     encoding="utf-8")
    args = ["--virtual-time-budget=10000", "--dump-dom"]
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        png.unlink(missing_ok=True)
        args += [f"--screenshot={png}", "--window-size=1400,3000", "--hide-scrollbars"]
    try:
        res = _browser(args, probe.as_uri(), tmp)
    finally:
        probe.unlink()

    m = re.search(r'<pre id="vaemap-probe"[^>]*>(.*?)</pre>', res.stdout, re.S)
    assert m, f"the probe did not run in chromium: {res.stderr[-2000:]}"
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    result["log_errors"] = [line for line in res.stderr.splitlines()
                            if re.search(r"Failed to load resource|ERR_FILE_NOT_FOUND|net::ERR_", line)]
    if png is None:
        return result, None
    assert png.is_file(), f"chromium wrote no screenshot: {res.stderr[-2000:]}"
    from PIL import Image
    return result, np.asarray(Image.open(png).convert("RGB"))


# ---- end to end on a real vaemap run -----------------------------------------------------------
HYPER = """\
lsq: {max_iter: 8, n_starts: 1}
ssl: {epochs: 3, patience: 2}
vaeunig: {epochs: 3, warmup_epochs: 1, ramp_epochs: 1, n_posterior_samples: 3, latent_dim: 4}
vaegmm: {epochs: 3, warmup_epochs: 1, ramp_epochs: 1, n_posterior_samples: 3, latent_dim: 4}
"""


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Two phantom subjects through ``vaemap ... participant`` (ball-stick, whose 4-D direction
    map is the odd one; all four methods, 3 epochs), then the participant reports and the group
    level. MS-DKI is covered by the synthetic outputs below."""
    import torch

    from vaemap_bids.cli.run import main
    from vaemap_bids.simulate.phantom import write_phantom_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("reports_real")
    bids, out = root / "bids", root / "out"
    write_phantom_dataset(bids, root / "truth", subjects=("01", "02"), model="ballstick",
                          shape=(12, 14, 10), seed=4)
    (root / "hp.yaml").write_text(HYPER)
    code = main([str(bids), str(out), "participant", "-w", str(root / "work"), "--config",
                 str(root / "hp.yaml"), "--models", "ballstick", "--device", "cpu", "--nprocs", "2",
                 "--omp-nthreads", "1",
                 "--skip-bids-validation", "--seed", "1"])
    assert code == 0, f"vaemap participant failed with exit code {code}"
    pages = {s: generate_participant_report(out, s, bids_dir=bids) for s in ("01", "sub-02")}
    group_code = run_group(out, bids_dir=bids)
    return {"root": root, "bids": bids, "out": out, "pages": pages, "group_code": group_code}


def test_participant_reports_are_complete_and_offline(real_run):
    out = real_run["out"]
    for label, page in real_run["pages"].items():
        sub = label.replace("sub-", "")
        assert page == out / f"sub-{sub}.html" and page.is_file()
        doc = check_html(page)
        for sid in SECTION_IDS:
            section = doc.get_element_by_id(sid)
            assert section is not None and section.tag == "section"
            if sid in FIGURE_SECTIONS:  # every method ran: every section has its figures
                srcs = section.xpath(".//img/@src")
                assert len(srcs) >= (2 if sid == "clusters" else 1), f"{sid} of sub-{sub}: {srcs}"
                assert all(s.startswith(f"sub-{sub}/figures/") for s in srcs)
        figures = sorted(p.name for p in (out / f"sub-{sub}" / "figures").iterdir())
        for model in ("ballstick",):
            for kind in ("maps", "nrmse", "agreement", "training", "latent", "clusters", "std"):
                assert f"sub-{sub}_model-{model}_{kind}.png" in figures
        text = doc.text_content()
        assert "Incomplete outputs" not in text
        assert "arXiv:2411.10772" in text and "Behrens" in text and "Garyfallidis" in text
        assert "Nipype" in text and "dmipy" in text and "2.13.0" in text  # torch version that ran
        assert not list(out.rglob(f".*{TEMP_SUFFIX}"))


def test_report_numbers_match_the_maps(real_run):
    """The table under the maps and the group TSV hold the masked median of the written maps."""
    out = real_run["out"]
    ent = {"subject": "01"}
    mask = load_canonical(out / output("mask", ent).path) > 0
    vol = load_canonical(out / _map(ent, "ballstick", "vaegmm", "dpar"))
    med, iqr = metrics.median_iqr(vol[mask])
    rows = list(csv.DictReader((out / "group_ballstick.tsv").open(), delimiter="\t"))
    row = [r for r in rows if r["subject"] == "01" and r["method"] == "vaegmm" and r["param"] == "dpar"]
    assert len(row) == 1
    assert float(row[0]["median"]) == pytest.approx(med, rel=1e-5)
    assert float(row[0]["iqr"]) == pytest.approx(iqr, rel=1e-5, abs=1e-7)
    dseg = load_canonical(out / output("dseg", ent, model="ballstick", method="vaegmm").path)
    for k, (n, cmed, ciqr) in metrics.per_label_median_iqr(vol, np.where(mask, dseg, 0)).items():
        assert int(row[0][f"cluster{k}_n"]) == n
        assert float(row[0][f"cluster{k}_median"]) == pytest.approx(cmed, rel=1e-5)


def test_group_level_tables_and_page(real_run):
    out = real_run["out"]
    assert real_run["group_code"] == ExitCode.OK
    assert not (out / "group_msdki.tsv").exists()  # only models that ran get a table
    for model, params in (("ballstick", ("stickfrac", "dpar", "diso")),):
        rows = list(csv.DictReader((out / f"group_{model}.tsv").open(), delimiter="\t"))
        assert len(rows) == 2 * 4 * len(params)  # subjects x methods x scalar parameters
        assert {(r["subject"], r["method"], r["param"]) for r in rows} == {
            (s, m, p) for s in ("01", "02") for m in ("lsq", "ssl", "vaeunig", "vaegmm")
            for p in params}
        header = rows[0].keys()
        for col in ("session", "model", "median", "iqr", "cluster1_median", "nrmse_mean",
                    "n_invalid", "fit_seconds", "vaemap_version", "torch_version"):
            assert col in header
        assert all(np.isfinite(float(r["median"])) and float(r["fit_seconds"]) > 0 for r in rows)
        assert all(r["session"] == "n/a" for r in rows)
    doc = check_html(out / "group.html")
    hrefs = doc.xpath("//a/@href")
    assert "sub-01.html" in hrefs and "sub-02.html" in hrefs
    assert doc.get_element_by_id("model-ballstick") is not None
    assert len(doc.xpath("//img[starts-with(@src, 'data:image/png;base64,')]")) == 1
    assert "All 2 expected subjects have complete outputs" in doc.text_content()
    bidsignore = (out / ".bidsignore").read_text().splitlines()
    assert "group_*.tsv" in bidsignore and "*.html" in bidsignore  # the workflow's lines are kept


def test_pages_render_in_headless_chromium(real_run, tmp_path):
    if _chromium() is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's chromium "
                    "with apt-get when run as root)")
    out = real_run["out"]
    # the probe itself must catch a missing file, or a pass below would mean nothing
    bad = tmp_path / "bad.html"
    bad.write_text("<html><head></head><body><img src='nope.png'></body></html>")
    caught, _ = browser_check(bad, tmp_path)
    assert caught["broken"] == ["nope.png"] and any("nope.png" in e for e in caught["errors"])
    for page in (out / "sub-01.html", out / "group.html"):
        png = ARTIFACTS / f"report_{page.stem}.png"
        probe, img = browser_check(page, tmp_path, png)
        assert probe["images"] > 0 and probe["broken"] == [] and probe["errors"] == [], probe
        assert probe["log_errors"] == []
        assert img.shape[:2] == (3000, 1400)
        colours = np.unique(img.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1]))
        assert img.std() > 10 and colours.size > 50  # not blank: text, tables and figures drawn


def test_group_level_lists_missing_and_incomplete_subjects(real_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(real_run["out"], out)
    shutil.rmtree(out / "sub-02")
    (out / "sub-02.html").unlink()
    ent = {"subject": "01"}
    (out / _map(ent, "ballstick", "ssl", "dpar")).unlink()
    code = run_group(out, bids_dir=real_run["bids"])
    assert code == ExitCode.NOINPUT != 0
    doc = check_html(out / "group.html")
    missing = doc.get_element_by_id("missing").text_content()
    assert "sub-02" in missing and "no outputs" in missing
    assert Path(_map(ent, "ballstick", "ssl", "dpar")).name in missing
    assert "2 of 2 subjects" in missing
    rows = list(csv.DictReader((out / "group_ballstick.tsv").open(), delimiter="\t"))
    assert {r["subject"] for r in rows} == {"01"}
    # labels given explicitly: only those are expected
    (out / _map(ent, "ballstick", "ssl", "dpar")).write_bytes(
        (real_run["out"] / _map(ent, "ballstick", "ssl", "dpar")
         ).read_bytes())
    assert run_group(out, participant_labels=["sub-01"]) == ExitCode.OK
    assert run_group(out, participant_labels=["01", "02"]) == ExitCode.NOINPUT


# ---- the synthetic contract: sessions, reorientation, outliers ----------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports_synthetic") / "out"
    for i, sub in enumerate(("01", "02", "03", "04", "05")):
        for j, ses in enumerate(("pre", "post") if sub == "01" else ("pre",)):
            write_synthetic_series(out, {"subject": sub, "session": ses}, seed=10 * i + j,
                                   shift=0.8 if sub == "05" else 0.0, offset=0.01 * i,
                                   n_unphysical=5 if sub == "01" else 0)
    return out


def test_participant_report_with_sessions(synthetic):
    stale = synthetic / "sub-01" / "figures" / "sub-01_ses-pre_model-ballstick_maps.png"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"from an earlier run")  # ball-stick did not run this time
    page = generate_participant_report(synthetic, "sub-01")
    assert not stale.exists()
    doc = check_html(page)
    text = doc.text_content()
    assert "sub-01_ses-pre" in text and "sub-01_ses-post" in text
    assert "not requested" in text  # the skipped model and its reason
    figs = {p.name for p in (synthetic / "sub-01" / "figures").iterdir()}
    assert {"sub-01_ses-pre_model-msdki_maps.png", "sub-01_ses-post_model-msdki_maps.png"} <= figs
    # MS-DKI validity recomputed at b = 2000 (3000 is above MS-DKI's 2500 limit): the 5 voxels
    quality = doc.get_element_by_id("fit-quality")
    header = quality.xpath(".//table[1]//th/text()")
    assert any("b = 2000 s/mm" in h for h in header), header
    lsq_row = quality.xpath(".//table[1]//tr[td[1]='lsq']/td/text()")
    assert lsq_row[-1] == "5"
    # the agreement section says there is no network method without LSQ... here there is LSQ
    assert doc.get_element_by_id("agreement").xpath(".//img")


def test_maps_are_drawn_in_ras_orientation(synthetic):
    """The x-flipped affine must come out as the canonical image (left/right not swapped)."""
    from vaemap_bids.reports.figures import SliceView
    ent = {"subject": "02", "session": "pre"}
    raw = nib.load(str(synthetic / output("mask", ent).path))
    can = load_canonical(synthetic / output("mask", ent).path)
    np.testing.assert_array_equal(can, np.asarray(raw.dataobj)[::-1])
    view = SliceView(can > 0)
    assert view.mask2d.any() and view(can).shape == view.mask2d.shape


def test_group_flags_the_outlier_subject(synthetic):
    assert run_group(synthetic) == ExitCode.OK
    rows = list(csv.DictReader((synthetic / "group_msdki.tsv").open(), delimiter="\t"))
    assert len(rows) == 6 * 3 * 2  # 6 series x 3 methods x 2 parameters
    assert {r["session"] for r in rows} == {"pre", "post"}
    assert "acquisition" not in rows[0] and "ballstick" not in {r["model"] for r in rows}
    doc = check_html(synthetic / "group.html")
    flagged = doc.xpath("//td[contains(@class, 'flag')]/ancestor::tr/td[1]/text()")
    assert "sub-05_ses-pre" in flagged
    assert all(label == "sub-05_ses-pre" for label in flagged), flagged
    # no participant report was made for 02..05: the table says so instead of a dead link
    assert "sub-03.html" not in doc.xpath("//a/@href")


def test_vaegmm_components_are_matched_by_voxel_index():
    from vaemap_bids.reports.participant import vaegmm_components
    gmm = {"index": np.array([40, 10, 30]),
           "responsibilities": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])}
    np.testing.assert_array_equal(vaegmm_components(gmm, np.array([10, 20, 30, 40, 99])),
                                  [0, -1, 1, 1, -1])
    assert vaegmm_components(None, np.arange(3)) is None


def test_participant_report_degrades_gracefully(tmp_path):
    """LSQ only in one series, a lost map in the other: the page still builds, says what is
    missing and why sections are empty, and the group level calls the subject incomplete."""
    out = tmp_path / "out"
    a, b = {"subject": "07", "session": "a"}, {"subject": "07", "session": "b"}
    write_synthetic_series(out, a, seed=1, methods=("lsq",))
    write_synthetic_series(out, b, seed=2, methods=("lsq", "vaegmm"))
    lost = output("param", b, model="msdki", method="vaegmm", param="msk").name
    (out / _map(b, "msdki", "vaegmm", "msk")).unlink()
    doc = check_html(generate_participant_report(out, "07"))
    summary = doc.get_element_by_id("summary").text_content()
    assert "Incomplete outputs" in summary and lost in summary
    assert "No network method ran" in doc.get_element_by_id("training").text_content()
    assert "No VAE method" in doc.get_element_by_id("latent").text_content()
    assert "vaegmm did not run" in doc.get_element_by_id("clusters").text_content()
    assert doc.get_element_by_id("agreement").xpath(".//img")  # series b: lsq vs vaegmm msd
    assert run_group(out) == ExitCode.NOINPUT
    assert lost in (out / "group.html").read_text()


def test_bad_labels_and_empty_output(tmp_path, synthetic):
    with pytest.raises(ValueError, match="letters and digits"):
        generate_participant_report(synthetic, "../01")
    with pytest.raises(ValueError, match="no outputs of participant '99'"):
        generate_participant_report(synthetic, "99")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_group(empty) == ExitCode.NO_DATA
    assert "No participant to summarise" in (empty / "group.html").read_text()
    assert run_group(tmp_path / "nope") == ExitCode.NOINPUT


def test_report_lists_every_fit_with_its_recorded_wall_time(real_run):
    """The summary's table of fit nodes: one row per fit that ran, with the wall time and the
    voxel count of its fit record."""
    from vaemap_bids.reports.participant import _fmt
    out = real_run["out"]
    doc = check_html(out / "sub-01.html")
    rows = {tuple(td.text_content().strip() for td in tr.findall("td"))
            for tr in doc.iter("tr") if len(tr.findall("td")) == 7}
    for record_path in sorted((out / "sub-01" / "log").glob("*_fit.json")):
        record = json.loads(record_path.read_text())
        row = (record["model"], record["method"], record["device"],
               _fmt(record["timings"]["fit_seconds"]), _fmt(record["timings"]["voxels_per_second"]),
               _fmt(record["n_voxels"]), _fmt(record["seed"]))
        assert row in rows, (row, rows)
