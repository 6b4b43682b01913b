"""The QSM section of a participant's report (from the outputs in OUTPUT_DIR): the local field,
the chi map of every method, each method's residual field (local field minus the dipole model
of its map), the DIP training curve, and a table of run times. Figures go to
``sub-<L>/figures/``; the section is inserted into ``sub-<L>.html`` (before ``</main>``), or
makes the page when the subject has no DWI outputs."""
from __future__ import annotations

import html
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure

from .. import naming
from ..atomic import write_text_atomic
from . import figures as F

_START, _END = "<!-- vaemap-qsm-start -->", "<!-- vaemap-qsm-end -->"


def _records(output_dir: Path, subject: str) -> list[dict]:
    out = []
    for path in sorted((output_dir / f"sub-{subject}").glob("**/log/*_desc-qsmrecord_qsm.json")):
        out.append(json.loads(path.read_text()))
    return out


def _mid(vol, mask):
    z = int(np.argmax(mask.sum((0, 1)))) if mask.any() else vol.shape[2] // 2
    return np.rot90(vol[:, :, z]), np.rot90(mask[:, :, z])


def qsm_figures(output_dir, record: dict, fig_dir: Path) -> dict:
    """Write the figures of one MEGRE series; returns ``{kind: file name}``."""
    from ..qsm.dipole import forward_field
    output_dir = Path(output_dir)
    ents = record["entities"]
    load = lambda kind, method=None: nib.load(output_dir / naming.qsm_path(ents, kind, method))  # noqa: E731
    mask_img = load("mask")
    mask = np.asanyarray(mask_img.dataobj) > 0
    local = np.asanyarray(load("localfield").dataobj, dtype=float)
    methods = list(record["methods"])
    chis = {m: np.asanyarray(load("chi", m).dataobj, dtype=float) for m in methods}
    prefix = record["prefix"]
    names = {}
    pad = float(record["plan"].get("options", {}).get("qsm", {}).get("pad", 0.5))
    # maps: local field, each chi, each residual
    fig = Figure(figsize=(2.6 * (1 + len(methods)), 5.4))
    lim_f = float(np.percentile(np.abs(local[mask]), 99)) if mask.any() else 1.0
    chi_all = np.concatenate([c[mask] for c in chis.values()]) if chis and mask.any() else [1.0]
    lim_c = float(np.percentile(np.abs(chi_all), 99)) or 1.0
    img, m2 = _mid(local, mask)
    ax = fig.add_subplot(2, 1 + len(methods), 1)
    ax.imshow(np.where(m2, img, np.nan), cmap="RdBu_r", vmin=-lim_f, vmax=lim_f)
    ax.set_title("local field (ppm)", fontsize=8)
    ax.axis("off")
    for i, m in enumerate(methods, start=2):
        ax = fig.add_subplot(2, 1 + len(methods), i)
        img, _ = _mid(chis[m], mask)
        ax.imshow(np.where(m2, img, np.nan), cmap="gray", vmin=-lim_c, vmax=lim_c)
        ax.set_title(f"chi {m} (ppm, +-{lim_c:.2g})", fontsize=8)
        ax.axis("off")
        resid = np.where(mask, local - forward_field(chis[m], mask_img.affine, pad=pad), 0.0)
        ax = fig.add_subplot(2, 1 + len(methods), len(methods) + 1 + i)
        img, _ = _mid(resid, mask)
        ax.imshow(np.where(m2, img, np.nan), cmap="RdBu_r", vmin=-lim_f / 4, vmax=lim_f / 4)
        rms = float(np.sqrt(np.mean(resid[mask] ** 2))) if mask.any() else 0.0
        ax.set_title(f"residual {m} (rms {rms:.2g} ppm)", fontsize=8)
        ax.axis("off")
    names["maps"] = F.save(fig, fig_dir / f"{prefix}_model-qsm_maps.png").name
    dip = record["methods"].get("dip")
    if dip and dip.get("curve", {}).get("iteration"):
        c = dip["curve"]
        fig = Figure(figsize=(5.0, 3.0))
        ax = fig.add_subplot(1, 1, 1)
        ax.semilogy(c["iteration"], c["train_loss"], label="training voxels")
        if any(np.isfinite(v) for v in c["holdout_loss"]):
            ax.semilogy(c["iteration"], c["holdout_loss"], label="held-out voxels")
        ax.axvline(dip.get("best_iteration", 0), color="k", lw=0.8, ls="--", label="kept")
        ax.set_xlabel("iteration")
        ax.set_ylabel("field MSE (ppm$^2$)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        names["dip_curve"] = F.save(fig, fig_dir / f"{prefix}_model-qsm_dipcurve.png").name
    return names


def qsm_section(output_dir, subject: str) -> str:
    """The HTML of the QSM section (figures written as a side effect); '' without QSM outputs."""
    output_dir = Path(output_dir)
    records = _records(output_dir, subject)
    if not records:
        return ""
    fig_dir = output_dir / f"sub-{subject}" / "figures"
    parts = [_START, '<section id="qsm"><h2>QSM (susceptibility)</h2>']
    for rec in records:
        names = qsm_figures(output_dir, rec, fig_dir)
        plan = rec["plan"]
        parts.append(f"<h3>{html.escape(rec['prefix'])}</h3>")
        parts.append(
            f"<p>B0 {plan['b0_tesla']:g} T; echo times "
            f"{', '.join(f'{t * 1e3:.2f}' for t in plan['echo_times_s'])} ms; phase units "
            f"{html.escape(', '.join(sorted(set(plan['phase_units']))))}; mask: "
            f"{html.escape(rec['mask_source'])} ({rec['n_voxels']} voxels after background "
            f"removal); chi referenced to the mask mean.</p>")
        rows = "".join(f"<tr><td>{html.escape(m)}</td><td>{r.get('seconds', 0):.1f}</td>"
                       f"<td>{html.escape(str(r.get('stopped_by', '')))}</td></tr>"
                       for m, r in rec["methods"].items())
        parts.append("<table><tr><th>method</th><th>seconds</th><th>stopped by</th></tr>"
                     f"{rows}</table>")
        for kind, name in names.items():
            parts.append(f'<figure><img src="sub-{subject}/figures/{name}" alt="{kind}" '
                         f'style="max-width:100%"><figcaption>{kind.replace("_", " ")}'
                         "</figcaption></figure>")
    parts.append("</section>" + _END)
    return "\n".join(parts)


def add_qsm_report(output_dir, subject: str) -> Path:
    """Put the QSM section into ``OUTPUT_DIR/sub-<L>.html`` (replacing an earlier one)."""
    output_dir = Path(output_dir)
    page = output_dir / f"sub-{subject}.html"
    section = qsm_section(output_dir, subject)
    if not section:
        raise ValueError(f"no QSM outputs of participant {subject!r} in {output_dir}")
    if page.is_file():
        text = page.read_text()
        if _START in text and _END in text:
            text = text[:text.index(_START)] + text[text.index(_END) + len(_END):]
        anchor = "</main>" if "</main>" in text else "</body>"
        text = text.replace(anchor, section + "\n" + anchor, 1)
    else:
        text = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vaemap: sub-"
                f"{html.escape(subject)}</title></head><body><main><h1>vaemap: sub-"
                f"{html.escape(subject)}</h1>\n{section}\n</main></body></html>")
    return write_text_atomic(page, text)


__all__ = ["qsm_figures", "qsm_section", "add_qsm_report"]


def group_qsm_rows(output_dir) -> list[dict]:
    """One row per (MEGRE series, method) from the QSM outputs in ``output_dir``: the chi
    distribution in the mask (median, 5th and 95th percentiles, ppm), the local field's RMS and
    the run time."""
    output_dir = Path(output_dir)
    rows = []
    for path in sorted(output_dir.glob("sub-*/**/log/*_desc-qsmrecord_qsm.json")):
        rec = json.loads(path.read_text())
        ents = rec["entities"]
        mask = np.asanyarray(nib.load(output_dir / naming.qsm_path(ents, "mask")).dataobj) > 0
        local = np.asanyarray(nib.load(output_dir / naming.qsm_path(ents, "localfield")).dataobj)
        for method, mrec in rec["methods"].items():
            chi = np.asanyarray(nib.load(output_dir / naming.qsm_path(ents, "chi", method)).dataobj)
            v = chi[mask]
            rows.append({"subject": ents["subject"], "session": ents.get("session") or "",
                         "acquisition": ents.get("acquisition") or "", "run": ents.get("run") or "",
                         "method": method, "n_voxels": int(mask.sum()),
                         "chi_median_ppm": float(np.median(v)),
                         "chi_p05_ppm": float(np.percentile(v, 5)),
                         "chi_p95_ppm": float(np.percentile(v, 95)),
                         "localfield_rms_ppm": float(np.sqrt(np.mean(local[mask] ** 2))),
                         "seconds": float(mrec.get("seconds") or 0.0)})
    return rows


def group_qsm_html(rows: list[dict]) -> str:
    """The QSM table of ``group.html`` (the same rows as ``group_qsm.tsv``)."""
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td>{v:.4g}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
        for v in r.values()) + "</tr>" for r in rows)
    return (f'{_START}<section id="qsm"><h2>QSM</h2><p>chi in ppm inside each series\' mask '
            f"(referenced to the mask mean); table also in <code>group_qsm.tsv</code>.</p>"
            f"<table><tr>{head}</tr>{body}</table></section>{_END}")


def write_group_qsm_tsv(path, rows: list[dict]) -> Path:
    cols = list(rows[0])
    lines = ["\t".join(cols)] + ["\t".join(f"{v:.6g}" if isinstance(v, float) else str(v)
                                           for v in r.values()) for r in rows]
    return write_text_atomic(path, "\n".join(lines) + "\n")
