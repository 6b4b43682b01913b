"""The participant report: ``OUTPUT_DIR/sub-<L>.html`` with its figures in ``sub-<L>/figures/``.

It reads only what the participant workflow wrote (names from :mod:`vaemap_bids.naming`); every
session and run of the subject appears on one page. The page is self-contained: inline CSS, no
script, figures as PNG files linked by relative paths.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..fitting.base import NETWORK_METHODS
from . import figures as F
from .. import naming
from .collect import VAE_METHODS, Series, find_series, sort_methods
from .metrics import (agreement, angular_difference_deg, finite, median_iqr,
                      msdki_b_max, msdki_outside_validity, per_label_median_iqr)
from ..atomic import write_text_atomic as write_text
from .render import render

log = logging.getLogger("vaemap.reports")

SECTIONS = (("summary", "Summary"), ("maps", "Maps side by side"), ("fit-quality", "Fit quality"),
            ("agreement", "Agreement with LSQ"), ("training", "Training"),
            ("latent", "Latent space"), ("clusters", "vaegmm clusters and uncertainty"),
            ("calibration", "Uncertainty calibration"),
            ("methods", "Methods and citations"))

REFERENCES = (
    ("xu2024", "Xu S, et al. MRI Parameter Mapping via Gaussian Mixture VAE: Breaking the "
               "Assumption of Independent Pixels. arXiv:2411.10772, 2024."),
    ("dipy", "Garyfallidis E, Brett M, Amirbekian B, et al. Dipy, a library for the analysis of "
             "diffusion MRI data. Front Neuroinform 2014;8:8. doi:10.3389/fninf.2014.00008"),
    ("dmipy", "Fick RHJ, Wassermann D, Deriche R. The Dmipy Toolbox: Diffusion MRI Multi-Compartment "
              "Modeling and Microstructure Recovery Made Easy. Front Neuroinform 2019;13:64. "
              "doi:10.3389/fninf.2019.00064"),
    ("nipype", "Gorgolewski K, Burns CD, Madison C, et al. Nipype: a flexible, lightweight and "
               "extensible neuroimaging data processing framework in Python. Front Neuroinform "
               "2011;5:13. doi:10.3389/fninf.2011.00013"),
    ("msdki", "Henriques RN, Jespersen SN, Shemesh N. Microscopic anisotropy misestimation in "
              "spherical-mean single diffusion encoding MRI. Magn Reson Med 2019;81:3245-3261. "
              "doi:10.1002/mrm.27606"),
    ("ballstick", "Behrens TEJ, Woolrich MW, Jenkinson M, et al. Characterization and propagation "
                  "of uncertainty in diffusion-weighted MR imaging. Magn Reson Med "
                  "2003;50:1077-1088. doi:10.1002/mrm.10609"),
    ("ssl", "Lim JP, Blumberg SB, Narayan N, et al. Fitting a directional microstructure model to "
            "diffusion-relaxation MRI data with self-supervised machine learning. NeuroImage "
            "2022;251:118982."),
    ("pytorch", "Paszke A, Gross S, Massa F, et al. PyTorch: An Imperative Style, High-Performance "
                "Deep Learning Library. NeurIPS 2019."),
)


def _fmt(value, digits: int = 3) -> str:
    """A number for a table: n/a for missing, integers as such, floats with ``digits`` significant."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}"


def _units(spec) -> str:
    return F.pretty_units(spec.units)


def vaegmm_components(gmm: dict | None, index: np.ndarray) -> np.ndarray | None:
    """The vaegmm component (argmax responsibility, 0-based) of each voxel in ``index``, matched
    through the latent files' ``index`` arrays; -1 where vaegmm's subsample lacks the voxel."""
    if gmm is None or "responsibilities" not in gmm:
        return None
    resp = np.asarray(gmm["responsibilities"])
    gidx = np.asarray(gmm.get("index", np.arange(len(resp))))
    order = np.argsort(gidx, kind="stable")
    pos = np.clip(np.searchsorted(gidx[order], index), 0, len(gidx) - 1)
    found = gidx[order][pos] == index
    comp = np.argmax(resp, axis=1)[order][pos]
    return np.where(found, comp, -1)


class _SeriesReport:
    """Figures and tables of one series."""

    def __init__(self, series: Series, fig_dir: Path, fig_href: str):
        self.s = series
        self.fig_dir = fig_dir
        self.fig_href = fig_href
        self.mask = series.mask()
        self.written: set[str] = set()

    def _fig(self, model: str | None, kind: str) -> tuple[Path, str]:
        name = F.figure_name(self.s.prefix, model, kind)
        self.written.add(name)
        return self.fig_dir / name, f"{self.fig_href}/{name}"

    # ---- summary -----------------------------------------------------------------------------
    def summary(self) -> dict:
        sm = self.s.summary
        acq = sm.get("acquisition") or {}
        mask = sm.get("mask") or {}
        inputs = sm.get("inputs") or {}
        rows = [("Subject", self.s.subject), ("Session", self.s.session or "n/a")]
        for key, name in (("acquisition", "Acquisition (acq-)"), ("run", "Run"), ("space", "Space")):
            if self.s.entity_value(key) is not None:
                rows.append((name, str(self.s.entity_value(key))))
        rows += [(f"Input {k}", str(v)) for k, v in inputs.items()]
        rows += [
            ("Volumes", _fmt(acq.get("n_volumes"))),
            ("Image shape", " x ".join(str(x) for x in sm.get("shape") or []) or "n/a"),
            ("Voxel size (mm)", " x ".join(_fmt(x) for x in sm.get("voxel_size_mm") or []) or "n/a"),
            ("Brain mask", f"{_fmt(mask.get('n_voxels'))} voxels, {_fmt(mask.get('volume_ml'))} ml"),
            ("Voxels excluded (non-finite signal)", _fmt(mask.get("excluded_nonfinite"))),
            ("Voxels excluded (implausible values)", _fmt(mask.get("excluded_implausible"))),
            ("Voxels excluded (mean b0 not positive)", _fmt(mask.get("excluded_nonpositive_b0"))),
        ]
        noise = sm.get("noise") or {}
        if noise:
            rows.append(("Noise sigma (image units)",
                         f"{_fmt(noise.get('value'))} from {noise.get('method')}" + (
                             f" ({noise.get('n_b0')} b0 volumes)" if noise.get("method") == "b0"
                             else f": {noise.get('reason', '')}")))
        for index, why in (acq.get("excluded_volumes") or {}).items():
            rows.append((f"Volume {index} left out (WARNING)", str(why)))
        denoise = sm.get("denoise") or {"method": "none"}
        rows.append(("Denoising (--denoise)", str(denoise.get("method", "none"))
                     + (f", MP-PCA median noise sd {_fmt(denoise['sigma_median'])}"
                        if "sigma_median" in denoise else "")))
        rows += [
            ("Device", str(sm.get("device", "n/a"))),
            ("Seed", str(sm.get("seed", "n/a"))),
            ("Input validation", str(sm.get("validator", "n/a"))),
            ("Run started (all series)", str(sm.get("started", "n/a"))),
            ("This series finished", str(sm.get("finished", "n/a"))),
        ]
        fit_seconds = [self.s.fit_timing(m, meth)[0] for m, ms in self.s.ran().items()
                       for meth in ms]
        fit_seconds = [t for t in fit_seconds if t is not None]
        if fit_seconds:
            rows.append(("Fitting time of this series (sum of its fits)",
                         f"{sum(fit_seconds) / 60:.1f} min"))
        shells = [(_fmt(s.get("bval_smm2"), 4), _fmt(s.get("n_volumes")), _fmt(s.get("n_directions")))
                  for s in acq.get("shells") or []]
        models = []
        for name, info in self.s.models.items():
            models.append({"model": name, "status": info.get("status", "n/a"),
                           "reason": info.get("reason") or "",
                           "methods": ", ".join(sort_methods(info.get("methods") or [])) or "none",
                           "n_measurements": _fmt(info.get("n_measurements"))})
        nodes = []
        for model, methods in self.s.ran().items():
            for method in methods:
                rec = self.s.fit_record(model, method) or {}
                seconds, rate = self.s.fit_timing(model, method)
                nodes.append([model, method, str(rec.get("device", "n/a")),
                              _fmt(seconds), _fmt(rate),
                              _fmt(rec.get("n_voxels")), _fmt(rec.get("seed"))])
        versions = sorted((str(k), str(v)) for k, v in (sm.get("versions") or {}).items())
        return {"rows": rows, "shells": shells, "models": models, "nodes": nodes,
                "versions": versions, "problems": self.s.problems()}

    # ---- per model ---------------------------------------------------------------------------
    def model(self, model: str, methods: list[str]) -> dict:
        specs = self.s.param_specs(model)
        out = {"name": model, "methods": methods, "figures": {}, "notes": {}}
        if self.mask is None:
            out["notes"]["maps"] = "The brain mask is missing, so no map could be drawn."
            return out
        view = F.SliceView(self.mask)
        out["slice"] = view.k
        scalars = [p for p in specs if not p.is_direction]
        maps = {p.label: {m: self.s.map(model, m, p.label) for m in methods} for p in specs}

        # maps side by side
        rows = []
        for p in specs:
            row = {"label": p.label, "units": _units(p), "maps": maps[p.label]}
            if p.is_direction and "stickfrac" in maps:
                row["weight"] = maps["stickfrac"]
            rows.append(row)
        path, href = self._fig(model, "maps")
        F.maps_figure(path, view, rows, methods)
        out["figures"]["maps"] = href
        out["map_stats"] = [[p.label, _units(p)] + [
            "{} [{}]".format(*(_fmt(x) for x in median_iqr(v[self.mask]))) if v is not None else "n/a"
            for v in (maps[p.label][m] for m in methods)] for p in scalars]

        # fit quality
        nrmse = {m: self.s.nrmse(model, m) for m in methods}
        path, href = self._fig(model, "nrmse")
        F.nrmse_figure(path, view, nrmse, self.mask)
        out["figures"]["nrmse"] = href
        b_max = msdki_b_max((self.s.summary.get("acquisition") or {}).get("shells") or []) \
            if model == "msdki" else None
        quality = []
        for m in methods:
            rec = self.s.fit_record(model, m) or {}
            v = finite(nrmse[m][self.mask]) if nrmse[m] is not None else np.empty(0)
            row = [m, _fmt(np.median(v) if v.size else None), _fmt(v.mean() if v.size else None),
                   _fmt(rec.get("n_invalid")), _fmt(rec.get("n_at_bound"))]
            if model == "msdki":
                d, k = maps.get("msd", {}).get(m), maps.get("msk", {}).get(m)
                row.append(_fmt(msdki_outside_validity(d[self.mask], k[self.mask], b_max))
                           if d is not None and k is not None and b_max else "n/a")
            quality.append(row)
        out["quality"] = quality
        out["b_max"] = b_max

        # agreement with LSQ
        networks = [m for m in methods if m != "lsq"]
        if "lsq" in methods and networks:
            params = [{"label": p.label, "units": _units(p), "maps": maps[p.label]} for p in scalars]
            path, href = self._fig(model, "agreement")
            F.agreement_figure(path, params, networks, self.mask, seed=0)
            out["figures"]["agreement"] = href
            table = []
            for m in networks:
                for p in specs:
                    ref, est = maps[p.label]["lsq"], maps[p.label][m]
                    if ref is None or est is None:
                        continue
                    if p.is_direction:
                        ang = angular_difference_deg(ref[self.mask], est[self.mask])
                        med, iqr = median_iqr(ang)
                        table.append([m, p.label, _fmt(int(np.isfinite(ang).sum())), "", "",
                                      f"angle {_fmt(med)} deg (IQR {_fmt(iqr)})"])
                        continue
                    a = agreement(ref[self.mask], est[self.mask])
                    table.append([m, p.label, _fmt(a["n"]), _fmt(a["r"]), _fmt(a["bias"]),
                                  f"[{_fmt(a['loa_low'])}, {_fmt(a['loa_high'])}]"])
            out["agreement"] = table
        else:
            out["notes"]["agreement"] = ("LSQ and at least one network method must both have run "
                                         "to compare them.")

        # training
        histories = {m: (self.s.fit_record(model, m) or {}).get("history") or {}
                     for m in methods if m in NETWORK_METHODS}
        histories = {m: h for m, h in histories.items() if any(h.get(k) for k in h)}
        if histories:
            path, href = self._fig(model, "training")
            F.training_figure(path, histories)
            out["figures"]["training"] = href
            out["hyper"] = [[m, ", ".join(f"{k}={v}" for k, v in sorted(
                ((self.s.fit_record(model, m) or {}).get("hyperparameters") or {}).items()))]
                for m in methods]
        else:
            out["notes"]["training"] = "No network method ran for this model (LSQ has no training curve)."

        # latent space
        latents = {m: self.s.latent(model, m) for m in methods if m in VAE_METHODS}
        latents = {m: z for m, z in latents.items() if z is not None and "latent_mean" in z}
        if latents:
            prepared = {}
            for m, z in latents.items():
                idx = np.asarray(z.get("index", np.arange(len(z["latent_mean"]))))
                prepared[m] = {"latent_mean": z["latent_mean"], "index": idx,
                               "component": vaegmm_components(latents.get("vaegmm"), idx)}
            path, href = self._fig(model, "latent")
            F.latent_figure(path, prepared, seed=0)
            out["figures"]["latent"] = href
        else:
            out["notes"]["latent"] = "No VAE method (vaeunig, vaegmm) ran for this model."

        # vaegmm clusters and uncertainty
        dseg = self.s.dseg(model) if "vaegmm" in methods else None
        if dseg is not None:
            path, href = self._fig(model, "clusters")
            F.clusters_figure(path, view, dseg, self.s.probseg(model))
            out["figures"]["clusters"] = href
            labels = np.where(self.mask, dseg, 0)
            cluster_rows = []
            per_param = {p.label: per_label_median_iqr(maps[p.label]["vaegmm"], labels)
                         for p in scalars if maps[p.label].get("vaegmm") is not None}
            for label in sorted(set(int(x) for x in np.unique(labels) if x > 0)):
                n = int((labels == label).sum())
                cluster_rows.append([str(label), _fmt(n)] + [
                    "{} [{}]".format(_fmt(per_param[p.label][label][1]), _fmt(per_param[p.label][label][2]))
                    if p.label in per_param and label in per_param[p.label] else "n/a"
                    for p in scalars])
            out["cluster_table"] = cluster_rows
            out["cluster_params"] = [p.label for p in scalars]
        else:
            out["notes"]["clusters"] = "vaegmm did not run for this model, so there is no cluster map."
        std_rows, std_methods = [], [m for m in methods if any(
            self.s.map(model, m, p.label, "std") is not None for p in scalars)]
        if std_methods:
            for p in scalars:
                std_rows.append({"label": f"std {p.label}", "units": _units(p),
                                 "maps": {m: self.s.map(model, m, p.label, "std") for m in std_methods}})
            path, href = self._fig(model, "std")
            F.maps_figure(path, view, std_rows, std_methods, cmap="inferno")
            out["figures"]["std"] = href
        else:
            out["notes"]["std"] = "No posterior standard-deviation maps were written for this model."
        self._calibration(model, methods, [p.label for p in scalars], out)
        return out

    def _calibration(self, model: str, methods: list[str], params: list[str], out: dict) -> None:
        checks = {m: (self.s.fit_record(model, m) or {}).get("calibration") for m in methods}
        checks = {m: c for m, c in checks.items() if c and c.get("coverage")}
        if not checks:
            out["notes"]["calibration"] = ("No method with a standard deviation ran for this "
                                           "model, so there is no coverage to check.")
            return
        path, href = self._fig(model, "calibration")
        F.calibration_figure(path, {m: c["coverage"] for m, c in checks.items()}, params)
        out["figures"]["calibration"] = href
        out["calibration"] = [[m, _fmt(c.get("n_voxels"))] + [
            _fmt((c["coverage"].get(p) or {}).get("0.95")) for p in params]
            for m, c in checks.items()]
        out["calibration_params"] = params

    def build(self) -> dict:
        ctx = {"prefix": self.s.prefix, "summary": self.summary(), "models": [],
               "skipped": [(n, i.get("reason") or "") for n, i in self.s.models.items()
                           if i.get("status") != "ran"]}
        for model, methods in self.s.ran().items():
            try:
                ctx["models"].append(self.model(model, methods))
            except Exception as exc:  # one broken output must not hide the rest of the report
                log.exception("report of %s model %s failed", self.s.prefix, model)
                ctx["models"].append({"name": model, "methods": methods, "figures": {},
                                      "error": f"{type(exc).__name__}: {exc}", "notes": {}})
            self.s.drop_images()  # one model's maps in memory at a time
        return ctx


def _lsq_solver(series: list[Series]) -> str | None:
    for s in series:
        for model, methods in s.ran().items():
            if "lsq" in methods:
                hyper = (s.fit_record(model, "lsq") or {}).get("hyperparameters") or {}
                if hyper.get("solver"):
                    return str(hyper["solver"])
    return None


def _network_settings(series: list[Series], method: str) -> str:
    """``epochs ..., latent dimension ..., K components`` of the first fit record of ``method``."""
    for s in series:
        for model, methods in s.ran().items():
            if method in methods:
                h = (s.fit_record(model, method) or {}).get("hyperparameters") or {}
                parts = []
                if h.get("epochs_run") is not None:
                    parts.append(f"{h['epochs_run']} epochs (at most {h.get('epochs', 'n/a')})")
                elif h.get("epochs") is not None:
                    parts.append(f"at most {h['epochs']} epochs")
                if h.get("latent_dim") is not None:
                    parts.append(f"latent dimension {h['latent_dim']}")
                if h.get("n_components") is not None:
                    parts.append(f"K = {h['n_components']} mixture components")
                if h.get("beta") is not None:
                    parts.append(f"final KL weight {h['beta']}")
                return ", ".join(parts)
    return ""


def methods_text(series: list[Series]) -> dict:
    """The boilerplate Methods paragraph, from what actually ran, and the references it cites."""
    ran: dict[str, set] = {}
    versions: dict[str, str] = {}
    devices, seeds, masks = set(), set(), set()
    for s in series:
        for model, methods in s.ran().items():
            ran.setdefault(model, set()).update(methods)
        versions.update({str(k): str(v) for k, v in (s.summary.get("versions") or {}).items()})
        devices.add(str(s.summary.get("device") or ""))
        seeds.add(str(s.summary.get("seed", "")))
        masks.add(str((s.summary.get("inputs") or {}).get("mask_source") or ""))
    ver = lambda k: f" {versions[k]}" if versions.get(k) else ""  # noqa: E731
    all_methods = sort_methods(set().union(*ran.values())) if ran else []
    text = [f"Diffusion parameter maps were estimated with vaemap{ver('vaemap') or ' ' + __version__} "
            f"[xu2024], a BIDS-App whose workflow is built with Nipype{ver('nipype')} [nipype]. "]
    if any("median_otsu" in m for m in masks):
        text.append(f"Brain masks were computed with median_otsu from dipy{ver('dipy')} [dipy] on "
                    "the mean b0 image. ")
    elif any(masks):
        text.append(f"Brain masks were taken from {'; '.join(sorted(m for m in masks if m))}. ")
    denoisers = {str((s.summary.get("denoise") or {}).get("method", "none")) for s in series}
    from ..dataset.denoise import DESCRIPTIONS
    for name in sorted(denoisers - {"none"}):
        text.append(f"The series were denoised with dipy{ver('dipy')} [dipy]: "
                    f"{DESCRIPTIONS[name]} ")
    text.append("Signals were divided by each voxel's mean b0. ")
    for model in sorted(ran):
        params = ", ".join(p.label for p in Series.param_specs(model))
        methods = ", ".join(sort_methods(ran[model]))
        if model == "msdki":
            text.append("Mean-signal diffusion kurtosis imaging (MS-DKI) [msdki] was fitted to the "
                        "direction-averaged signal of the shells with b <= 2500 s/mm^2, "
                        f"S(b)/S0 = exp(-bD + b^2 D^2 K / 6) ({params}; with {methods}). ")
        elif model == "ballstick":
            text.append("The ball-and-stick model [ballstick], S/S0 = f exp(-b Dpar (g.n)^2) + "
                        f"(1 - f) exp(-b Diso), was fitted to all volumes ({params}; with {methods}). ")
        else:
            text.append(f"The {model} model was fitted ({params}; with {methods}). ")
    if "lsq" in all_methods:
        solver = _lsq_solver(series)
        if solver == "reference":
            text.append(f"The least-squares (lsq) estimates come from the reference implementations "
                        f"of dipy{ver('dipy')} [dipy] (MS-DKI) and dmipy{ver('dmipy')} [dmipy] "
                        "(ball and stick). ")
        else:
            text.append("The least-squares (lsq) estimates come from vaemap's batched "
                        "Levenberg-Marquardt solver, which is tested against the reference "
                        "implementations of dipy [dipy] and dmipy [dmipy]. ")
    else:
        text.append("Reference least-squares implementations exist in dipy [dipy] and dmipy "
                    "[dmipy]; no least-squares fit ran here. ")
    net = [m for m in all_methods if m in NETWORK_METHODS]
    if net:
        desc = {"ssl": "a voxelwise self-supervised network (ssl) [ssl]",
                "vaeunig": "a variational autoencoder with a univariate Gaussian prior (vaeunig) [xu2024]",
                "vaegmm": "a variational autoencoder with a Gaussian-mixture prior (vaegmm) [xu2024]"}
        items = []
        for m in net:
            settings = _network_settings(series, m)
            items.append(desc[m] + (f", {settings}" if settings else ""))
        text.append("Self-supervised networks were trained on each subject's own signals with "
                    f"PyTorch{ver('torch')} [pytorch] on "
                    f"{', '.join(sorted(d for d in devices if d)) or 'an unrecorded device'}: "
                    + "; ".join(items) + ". ")
        if set(net) & {"vaeunig", "vaegmm"}:
            text.append("VAE maps are posterior means (decoder of the latent mean); the per-voxel "
                        "posterior standard deviation was estimated from samples of the latent "
                        "variable. ")
    text.append(f"Random seed: {', '.join(sorted(x for x in seeds if x)) or 'n/a'}.")
    cited = {"xu2024", "nipype", "dipy", "dmipy", "msdki", "ballstick"}
    if "ssl" in net:
        cited.add("ssl")
    if net:
        cited.add("pytorch")
    refs = [(k, t) for k, t in REFERENCES if k in cited]
    return {"text": " ".join("".join(text).split()), "references": refs,
            "versions": sorted(versions.items())}


def generate_participant_report(output_dir, subject_label, *, bids_dir=None) -> Path:
    """Write ``OUTPUT_DIR/sub-<L>.html`` and ``OUTPUT_DIR/sub-<L>/figures/*`` for every session and
    run of one participant and return the HTML path.

    ``bids_dir`` (optional) is only used to list input series that have no outputs.
    Raises ValueError when the label is invalid or the subject has no outputs in ``output_dir``.
    """
    output_dir = Path(output_dir)
    subject = naming.clean_label(subject_label, 'sub')
    series = find_series(output_dir, subject)
    if not series:
        raise ValueError(f"no outputs of participant {subject!r} in {output_dir} "
                         f"(no sub-{subject}[/ses-*]/log/*_summary.json)")
    missing = []
    if bids_dir is not None:
        from .collect import expected_prefixes
        have = {s.prefix for s in series}
        missing = [p for p in expected_prefixes(bids_dir, subject) if p not in have]
    fig_href = f"sub-{subject}/figures"
    fig_dir = output_dir / fig_href
    fig_dir.mkdir(parents=True, exist_ok=True)
    reports = [_SeriesReport(s, fig_dir, fig_href) for s in series]
    blocks = [r.build() for r in reports]
    # figures of an earlier run that this page no longer shows (e.g. a model not run this time)
    written = set().union(*(r.written for r in reports))
    for old in fig_dir.glob(f"sub-{subject}*_*.png"):
        if old.name not in written and old.stem.rsplit("_", 1)[-1] in F.FIGURE_KINDS:
            old.unlink()
    ctx = {
        "title": f"vaemap: sub-{subject}",
        "subject": subject,
        "sections": SECTIONS,
        "series": blocks,
        "missing_series": missing,
        "methods": methods_text(series),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "vaemap_version": __version__,
        "min_inset": F.MIN_INSET_VOXELS,
    }
    out = output_dir / f"sub-{subject}.html"
    write_text(out, render("participant.html", ctx))
    log.info("participant report written to %s", out)
    return out
