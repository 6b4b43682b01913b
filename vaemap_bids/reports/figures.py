"""Report figures drawn with matplotlib's object API (no pyplot state, safe in worker processes).

Each ``*_figure`` function takes arrays, writes one PNG atomically and returns its path. Slices are
axial, taken from volumes in RAS+ orientation (see :func:`collect.load_canonical`), drawn with the
subject's right on the image's right and anterior at the top.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, NullFormatter

from ..atomic import write_bytes_atomic
from .metrics import finite, pca_2d

#: One colour per method, the same in every figure.
METHOD_COLOURS = {"lsq": "#555555", "ssl": "#1f77b4", "vaeunig": "#ff7f0e", "vaegmm": "#2ca02c"}
CLUSTER_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628",
                   "#f781bf", "#999999", "#66c2a5", "#ffd92f")
DPI = 96
#: Slices narrower than this (voxels, inside the mask's bounding box) get no zoomed inset.
MIN_INSET_VOXELS = 20


#: The kinds of participant figures (the last part of their file names).
FIGURE_KINDS = ("maps", "nrmse", "agreement", "training", "latent", "clusters", "std",
                "calibration")


def figure_name(prefix: str, model: str | None, kind: str) -> str:
    """File name of a report figure: ``<prefix>[_model-<model>]_<kind>.png``."""
    if kind not in FIGURE_KINDS:
        raise ValueError(f"unknown figure kind {kind!r}")
    return f"{prefix}{f'_model-{model}' if model else ''}_{kind}.png"


def pretty_units(units: str | None) -> str:
    """Units for a label: ``um^2/ms`` -> ``µm²/ms``; empty for ``arbitrary``."""
    if not units or units == "arbitrary":
        return ""
    return units.replace("um^2", "\u00b5m\u00b2").replace("mm^2", "mm\u00b2")


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, "#8c564b")


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG via a temporary file and a rename (never a half-written figure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png", facecolor="white")
    return write_bytes_atomic(path, buf.getvalue())


# ---- slices --------------------------------------------------------------------------------------
def choose_slice(mask: np.ndarray) -> int:
    """The axial slice with the most mask voxels (the middle one when the mask is empty)."""
    area = mask.reshape(-1, mask.shape[2]).sum(axis=0)
    return int(np.argmax(area)) if area.any() else mask.shape[2] // 2


def crop_box(mask2d: np.ndarray, pad: int = 2) -> tuple[slice, slice]:
    """Rows and columns of the mask's bounding box in a 2-D slice, plus ``pad`` voxels."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return slice(None), slice(None)
    return (slice(max(rows.min() - pad, 0), rows.max() + pad + 1),
            slice(max(cols.min() - pad, 0), cols.max() + pad + 1))


class SliceView:
    """One axial slice of a volume, cropped to the mask, as a displayable 2-D array."""

    def __init__(self, mask: np.ndarray, k: int | None = None):
        self.k = choose_slice(mask) if k is None else int(k)
        m2 = mask[:, :, self.k].T  # rows: y (posterior -> anterior), cols: x (left -> right)
        self.box = crop_box(m2)
        self.mask2d = m2[self.box]
        # a zoom of a slice only a few voxels across shows nothing new (e.g. dipy's 6x10x10 crop)
        self.inset = _inset_region(self.mask2d) if min(self.mask2d.shape) >= MIN_INSET_VOXELS else None

    def __call__(self, vol: np.ndarray | None) -> np.ndarray | None:
        """2-D (or 2-D x channels) slice of ``vol``, NaN outside the mask."""
        if vol is None:
            return None
        sl = np.swapaxes(vol[:, :, self.k], 0, 1)[self.box].astype(np.float64)
        sl[~self.mask2d] = np.nan
        return sl


def _inset_region(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of a square around the centre of the mask for the zoomed inset."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return 0, mask2d.shape[0], 0, mask2d.shape[1]
    half = max(2, int(round(0.09 * min(np.ptp(rows) + 1, np.ptp(cols) + 1))))
    r, c = int(np.median(rows)), int(np.median(cols))
    r0, c0 = max(r - half, 0), max(c - half, 0)
    return r0, min(r0 + 2 * half, mask2d.shape[0]), c0, min(c0 + 2 * half, mask2d.shape[1])


def robust_range(arrays, lo: float = 1.0, hi: float = 99.0) -> tuple[float, float]:
    """Shared colour limits of several maps: the ``lo``-``hi`` percentiles of their pooled values."""
    pooled = np.concatenate([finite(a) for a in arrays if a is not None] or [np.empty(0)])
    if pooled.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(pooled, [lo, hi])
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return float(vmin), float(vmax)


def direction_rgb(direction: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """Direction-encoded colour of a 2-D slice of unit vectors (H, W, 3): |x|, |y|, |z| as red,
    green and blue, brightness scaled by ``weight`` (e.g. the stick fraction) when given."""
    rgb = np.abs(np.nan_to_num(direction, nan=0.0))
    norm = np.linalg.norm(rgb, axis=-1, keepdims=True)
    rgb = np.divide(rgb, norm, out=np.zeros_like(rgb), where=norm > 0)
    if weight is not None:
        rgb = rgb * np.clip(np.nan_to_num(weight, nan=0.0), 0, 1)[..., None]
    return np.clip(rgb, 0, 1)


def _blank(ax, text: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if text:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#888888",
                fontsize=9)


def _show(ax, image, view: SliceView, *, cmap=None, vmin=None, vmax=None, inset: bool = True,
          interpolation: str = "nearest"):
    """Draw a slice with a zoomed inset in the lower-right corner; returns the image artist."""
    kw = dict(origin="lower", interpolation=interpolation, cmap=cmap, vmin=vmin, vmax=vmax)
    if image.ndim == 3:
        kw.pop("cmap"), kw.pop("vmin"), kw.pop("vmax")
    art = ax.imshow(image, **kw)
    ax.set_facecolor("black")
    _blank(ax)
    if inset and view.inset is not None:
        r0, r1, c0, c1 = view.inset
        ins = ax.inset_axes([0.6, 0.0, 0.4, 0.4])  # about 2.2x the box: the paper's zoom
        ins.imshow(image, **kw)
        ins.set_xlim(c0 - 0.5, c1 - 0.5)
        ins.set_ylim(r0 - 0.5, r1 - 0.5)
        ins.set_facecolor("black")
        ins.set_xticks([])
        ins.set_yticks([])
        for spine in ins.spines.values():
            spine.set_edgecolor("white")
            spine.set_linewidth(1.2)
        ax.indicate_inset_zoom(ins, edgecolor="white", alpha=0.9)
    return art


def _grid(n_rows: int, n_cols: int, cell: float = 2.6, extra_w: float = 0.9, extra_h: float = 0.5,
          **adjust):
    """A figure of plot panels with fixed margins (constrained layout costs a second draw)."""
    fig = Figure(figsize=(n_cols * cell + extra_w, n_rows * cell + extra_h))
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    W, H = fig.get_size_inches()
    opts = dict(left=0.7 / W, right=1 - 0.25 / W, bottom=0.55 / H, top=1 - 0.4 / H, wspace=0.35,
                hspace=0.45)
    opts.update(adjust)
    fig.subplots_adjust(**opts)
    return fig, axes


class ImageGrid:
    """Image panels of ``cell`` inches laid out by hand: a label margin on the left, titles on
    top and a colour bar at the right of every row."""

    def __init__(self, n_rows: int, n_cols: int, cell: float = 2.5, left: float = 0.45,
                 right: float = 1.0, top: float = 0.35, bottom: float = 0.1, gap: float = 0.06,
                 extra_bottom: float = 0.0):
        self.n_rows, self.n_cols, self.cell, self.gap = n_rows, n_cols, cell, gap
        self.left, self.top, self.bottom = left, top, bottom + extra_bottom
        self.W = left + n_cols * cell + (n_cols - 1) * gap + right
        self.H = top + n_rows * cell + (n_rows - 1) * gap + self.bottom
        self.fig = Figure(figsize=(self.W, self.H))
        self.axes = np.empty((n_rows, n_cols), dtype=object)
        for i in range(n_rows):
            for j in range(n_cols):
                self.axes[i, j] = self.fig.add_axes(self._rect(i, j))

    def _rect(self, i: int, j: int) -> list[float]:
        x = self.left + j * (self.cell + self.gap)
        y = self.H - self.top - (i + 1) * self.cell - i * self.gap
        return [x / self.W, y / self.H, self.cell / self.W, self.cell / self.H]

    def colourbar(self, art, i: int, label: str | None = None):
        x = self.left + self.n_cols * self.cell + (self.n_cols - 1) * self.gap + 0.1
        y = self.H - self.top - (i + 1) * self.cell - i * self.gap + 0.1 * self.cell
        cax = self.fig.add_axes([x / self.W, y / self.H, 0.12 / self.W, 0.8 * self.cell / self.H])
        cb = self.fig.colorbar(art, cax=cax)
        cb.ax.tick_params(labelsize=8)
        if label:
            cb.set_label(label, fontsize=8)
        return cb


# ---- maps side by side (Fig. 2) ------------------------------------------------------------------
def maps_figure(path, view: SliceView, rows: list[dict], methods: list[str], *,
                cmap: str = "viridis", colourbar_label: str | None = None) -> Path:
    """One row per parameter, one column per method, one colour scale per row.

    ``rows``: ``[{"label": str, "units": str, "maps": {method: 3-D or 4-D array or None},
    "weight": {method: 3-D array} (directions only)}]``. A 4-D map with 3 volumes is drawn as
    direction-encoded colour.
    """
    grid = ImageGrid(len(rows), len(methods))
    axes = grid.axes
    for i, row in enumerate(rows):
        slices = {m: view(row["maps"].get(m)) for m in methods}
        is_dir = any(s is not None and s.ndim == 3 for s in slices.values())
        vmin, vmax = (0, 1) if is_dir else robust_range(slices.values())
        art = None
        for j, method in enumerate(methods):
            ax = axes[i, j]
            sl = slices[method]
            if sl is None:
                _blank(ax, "not available")
            elif is_dir:
                w = view((row.get("weight") or {}).get(method))
                _show(ax, direction_rgb(sl, w), view)
            else:
                art = _show(ax, sl, view, cmap=cmap, vmin=vmin, vmax=vmax)
            if i == 0:
                ax.set_title(method, fontsize=12, fontweight="bold", color=method_colour(method))
            if j == 0:
                units = f" ({pretty_units(row.get('units'))})" if pretty_units(row.get("units")) else ""
                ax.set_ylabel(f"{row['label']}{units}", fontsize=11)
        if art is not None:
            grid.colourbar(art, i, colourbar_label)
        elif is_dir:
            axes[i, -1].text(1.04, 0.5, "RGB =\n|x| |y| |z|\nbrightness:\nstick\nfraction",
                             transform=axes[i, -1].transAxes, fontsize=7, va="center")
    fig = grid.fig
    return save(fig, path)


# ---- fit quality ----------------------------------------------------------------------------------
def nrmse_figure(path, view: SliceView, nrmse: dict[str, np.ndarray | None],
                 mask: np.ndarray) -> Path:
    """Top: NRMSE maps per method on one scale; bottom: the voxelwise NRMSE distribution per
    method inside the mask."""
    methods = list(nrmse)
    grid = ImageGrid(1, len(methods), extra_bottom=2.6)
    fig = grid.fig
    slices = {m: view(v) for m, v in nrmse.items()}
    vmin, vmax = robust_range(slices.values(), 1, 99)
    vmin = 0.0
    art = None
    for j, method in enumerate(methods):
        ax = grid.axes[0, j]
        if slices[method] is None:
            _blank(ax, "not available")
        else:
            art = _show(ax, slices[method], view, cmap="magma", vmin=vmin, vmax=vmax)
        ax.set_title(method, fontsize=12, fontweight="bold", color=method_colour(method))
    if art is not None:
        grid.colourbar(art, 0, "NRMSE")
    W, H = grid.W, grid.H
    ax = fig.add_axes([0.75 / W, 0.5 / H, (W - 1.9) / W, 2.0 / H])
    data, labels, colours = [], [], []
    for method, vol in nrmse.items():
        if vol is None:
            continue
        v = finite(vol[mask])
        if v.size:
            data.append(v)
            labels.append(method)
            colours.append(method_colour(method))
    if data:
        hi = max(np.percentile(np.concatenate(data), 99.5), 1e-6)
        bins = np.linspace(0, hi, 60)
        for v, lab, col in zip(data, labels, colours):
            ax.hist(np.clip(v, 0, hi), bins=bins, histtype="step", linewidth=1.8, color=col,
                    label=f"{lab} (median {np.median(v):.3f})")
        ax.legend(fontsize=8, frameon=False)
        ax.set_xlabel("voxelwise NRMSE inside the mask")
        ax.set_ylabel("voxels")
    else:
        _blank(ax, "no NRMSE maps")
    return save(fig, path)


# ---- agreement with LSQ -------------------------------------------------------------------------
def agreement_figure(path, params: list[dict], methods: list[str], mask: np.ndarray,
                     max_points: int = 4000, seed: int = 0) -> Path:
    """Scatter of each network method (rows: parameters, columns: methods) against LSQ with the
    identity line; ``params``: ``[{"label", "units", "maps": {method: 3-D array}}]``."""
    fig, axes = _grid(len(params), len(methods), cell=2.7, extra_w=0.4)
    rng = np.random.default_rng(seed)
    for i, p in enumerate(params):
        ref = p["maps"].get("lsq")
        for j, method in enumerate(methods):
            ax = axes[i, j]
            est = p["maps"].get(method)
            if ref is None or est is None:
                _blank(ax, "not available")
                continue
            a, b = ref[mask].astype(np.float64), est[mask].astype(np.float64)
            ok = np.isfinite(a) & np.isfinite(b)
            a, b = a[ok], b[ok]
            if a.size == 0:
                _blank(ax, "no common voxels")
                continue
            if a.size > max_points:
                pick = rng.choice(a.size, max_points, replace=False)
                a, b = a[pick], b[pick]
            ax.scatter(a, b, s=3, alpha=0.35, color=method_colour(method), rasterized=True,
                       linewidths=0)
            lo = min(np.percentile(a, 0.5), np.percentile(b, 0.5))
            hi = max(np.percentile(a, 99.5), np.percentile(b, 99.5))
            pad = 0.05 * (hi - lo) if hi > lo else 0.5
            lo, hi = lo - pad, hi + pad
            ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, linestyle="--")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.tick_params(labelsize=7)
            ax.set_aspect("equal", adjustable="box")
            if i == 0:
                ax.set_title(method, fontsize=12, fontweight="bold", color=method_colour(method))
            units = f" ({pretty_units(p.get('units'))})" if pretty_units(p.get("units")) else ""
            ax.set_xlabel(f"lsq {p['label']}{units}", fontsize=8)
            ax.set_ylabel(f"{method} {p['label']}", fontsize=8)
    return save(fig, path)


# ---- training -------------------------------------------------------------------------------------
TRAINING_PANELS = (("loss", "loss (train, dashed: validation)", True),
                   ("recon", "reconstruction (noise-model NLL)", False), ("kl", "KL", True),
                   ("beta", "beta (KL weight)", False),
                   ("sigma", "sigma (learnt noise level)", False))


def training_figure(path, histories: dict[str, dict]) -> Path:
    """Loss, reconstruction and KL curves, the beta schedule and the learnt noise level, one line
    per method."""
    fig, axes = _grid(1, len(TRAINING_PANELS), cell=2.9, extra_w=0.2, extra_h=0.6)
    for ax, (key, title, log_scale) in zip(axes[0], TRAINING_PANELS):
        drawn = False
        for method, hist in histories.items():
            y = np.asarray(hist.get(key) or [], dtype=np.float64)
            if y.size and np.isfinite(y).any():
                ax.plot(np.arange(1, y.size + 1), y, color=method_colour(method), label=method,
                        linewidth=1.5)
                drawn = True
            if key == "loss":
                val = np.asarray(hist.get("val_loss") or [], dtype=np.float64)
                if val.size and np.isfinite(val).any():
                    ax.plot(np.linspace(1, max(y.size, 1), val.size) if y.size else
                            np.arange(1, val.size + 1), val, color=method_colour(method),
                            linestyle="--", linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if not drawn:
            _blank(ax, "not recorded")
            continue
        if log_scale and all(np.all(finite(l.get_ydata()) > 0) for l in ax.get_lines()):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if key == "loss":
            ax.legend(fontsize=7, frameon=False)
    return save(fig, path)


def calibration_figure(path, coverage: dict[str, dict], params: list[str]) -> Path:
    """Coverage of each method's intervals against their nominal level, one panel per parameter
    (``coverage[method][param][level]``); a calibrated method lies on the diagonal."""
    fig, axes = _grid(1, len(params), cell=2.6, extra_w=0.2, extra_h=0.6)
    for ax, param in zip(axes[0], params):
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle=":")
        drawn = False
        for method, table in coverage.items():
            levels = sorted((table.get(param) or {}).items(), key=lambda kv: float(kv[0]))
            if levels:
                ax.plot([float(k) for k, _ in levels], [v for _, v in levels], marker="o",
                        markersize=3, color=method_colour(method), label=method, linewidth=1.3)
                drawn = True
        ax.set_title(param, fontsize=9)
        ax.set_xlabel("nominal level", fontsize=8)
        ax.set_ylabel("coverage", fontsize=8)
        ax.set_xlim(0.4, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.tick_params(labelsize=7)
        if not drawn:
            _blank(ax, "no std")
        elif param == params[0]:
            ax.legend(fontsize=7, frameon=False, loc="lower right")
    return save(fig, path)


# ---- latent space (Fig. 3) ------------------------------------------------------------------------
def cluster_cmap(k: int) -> ListedColormap:
    return ListedColormap([CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i in range(k)])


def latent_figure(path, latents: dict[str, dict], max_points: int = 5000, seed: int = 0) -> Path:
    """Posterior means of each VAE method projected on their first two principal components,
    coloured by the vaegmm component of the same voxel (matched through ``index``); a
    one-dimensional latent space is drawn as histograms per component.

    ``latents``: ``{method: {"latent_mean": (n, L), "index": (n,), "component": (n,) or None}}``.
    """
    methods = list(latents)
    fig, axes = _grid(1, len(methods), cell=3.6, extra_w=0.4, extra_h=0.4)
    rng = np.random.default_rng(seed)
    for ax, method in zip(axes[0], methods):
        lat = latents[method]
        z = np.asarray(lat["latent_mean"], dtype=np.float64)
        if z.ndim == 1:
            z = z[:, None]
        comp = lat.get("component")
        keep = np.all(np.isfinite(z), axis=1)
        idx = np.nonzero(keep)[0]
        if idx.size > max_points:
            idx = np.sort(rng.choice(idx, max_points, replace=False))
        if idx.size < 2:
            _blank(ax, "too few voxels")
            continue
        z = z[idx]
        c = None if comp is None else comp[idx]
        k = int(c.max()) + 1 if c is not None and c.size and c.max() >= 0 else 0
        if k == 0:
            c = None
        ax.set_title(f"{method} (latent dim {z.shape[1]})", fontsize=11, fontweight="bold",
                     color=method_colour(method))
        if z.shape[1] == 1:
            bins = np.linspace(*np.percentile(z[:, 0], [0.5, 99.5]), 50)
            groups = [z[c == i, 0] for i in range(k)] if c is not None else [z[:, 0]]
            colours = [CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i in range(len(groups))]
            if c is not None and (c < 0).any():
                groups.append(z[c < 0, 0])
                colours.append("#bbbbbb")
            ax.hist(groups, bins=bins, stacked=True, color=colours)
            ax.set_xlabel("z")
            ax.set_ylabel("voxels")
        else:
            scores, ratio = pca_2d(z)
            order = rng.permutation(len(scores))  # no component drawn wholly on top of another
            if c is None:
                ax.scatter(scores[order, 0], scores[order, 1], s=3, alpha=0.5, color="#444444",
                           linewidths=0, rasterized=True)
            else:
                o = order[c[order] < 0]  # voxels that vaegmm's subsample does not have
                ax.scatter(scores[o, 0], scores[o, 1], s=3, alpha=0.4, color="#bbbbbb",
                           linewidths=0, rasterized=True)
                o = order[c[order] >= 0]
                ax.scatter(scores[o, 0], scores[o, 1], s=3, alpha=0.6, c=c[o],
                           cmap=cluster_cmap(k), vmin=-0.5, vmax=k - 0.5, linewidths=0,
                           rasterized=True)
            lab = "PC" if z.shape[1] > 2 else "z"
            ax.set_xlabel(f"{lab}1" + (f" ({100 * ratio[0]:.0f} % var.)" if lab == "PC" else ""), fontsize=8)
            ax.set_ylabel(f"{lab}2" + (f" ({100 * ratio[1]:.0f} % var.)" if lab == "PC" else ""), fontsize=8)
        ax.tick_params(labelsize=7)
        if c is not None:
            ax.legend(handles=[Patch(color=CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)],
                                     label=f"component {i + 1}")
                               for i in np.unique(c[c >= 0]).astype(int)],
                      fontsize=7, frameon=False, loc="best")
    return save(fig, path)


# ---- vaegmm clusters ----------------------------------------------------------------------------
def clusters_figure(path, view: SliceView, dseg: np.ndarray, probseg: np.ndarray | None) -> Path:
    """Hard cluster map (dseg) and the largest responsibility per voxel (how sure the
    assignment is)."""
    grid = ImageGrid(1, 2, cell=3.2, gap=1.0)
    axes = grid.axes
    sl = view(dseg)
    labels = finite(sl)
    k = int(max(labels.max() if labels.size else 1, 1))
    img = np.where(np.isfinite(sl) & (sl > 0), sl - 1, np.nan)
    _show(axes[0, 0], img, view, cmap=cluster_cmap(k), vmin=-0.5, vmax=k - 0.5)
    axes[0, 0].set_title("vaegmm clusters (dseg)", fontsize=10)
    present = np.unique(labels[labels > 0]).astype(int) - 1
    axes[0, 0].legend(handles=[Patch(color=CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)],
                                     label=f"{i + 1}") for i in present], fontsize=7,
                      loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title="cluster",
                      title_fontsize=7)
    if probseg is not None and probseg.ndim == 4:
        conf = view(np.max(probseg, axis=3))
        art = _show(axes[0, 1], conf, view, cmap="cividis", vmin=0, vmax=1)
        grid.colourbar(art, 0, "max responsibility")
        axes[0, 1].set_title("assignment confidence (probseg)", fontsize=10)
    else:
        _blank(axes[0, 1], "no probseg")
    fig = grid.fig
    return save(fig, path)


# ---- group level ----------------------------------------------------------------------------------
def group_figure(path, params: list[str], methods: list[str], values: dict, labels: dict,
                 flagged: dict, units: dict | None = None, seed: int = 0) -> Path:
    """Box plot per method for each parameter with every subject as a jittered point; outliers
    are red and named. ``values[(param, method)]`` is an array, ``labels[(param, method)]`` the
    matching subject labels and ``flagged[(param, method)]`` a boolean array."""
    n_cols = min(3, len(params))
    n_rows = int(np.ceil(len(params) / n_cols))
    fig, axes = _grid(n_rows, n_cols, cell=3.6, extra_w=1.2, extra_h=0.5, hspace=0.35, wspace=0.3)
    axes = axes.ravel()
    rng = np.random.default_rng(seed)
    for ax, param in zip(axes, params):
        data = [np.asarray(values.get((param, m), []), dtype=np.float64) for m in methods]
        pos = np.arange(1, len(methods) + 1)
        nonempty = [d[np.isfinite(d)] for d in data]
        ax.boxplot([d if d.size else [np.nan] for d in nonempty], positions=pos, widths=0.55,
                   showfliers=False, medianprops={"color": "black"})
        for x, method, d in zip(pos, methods, data):
            flags = np.asarray(flagged.get((param, method), np.zeros(d.size, bool)))
            names = labels.get((param, method), [])
            jitter = x + rng.uniform(-0.15, 0.15, d.size)
            ax.scatter(jitter[~flags], d[~flags], s=18, color=method_colour(method), alpha=0.8,
                       zorder=3, edgecolors="white", linewidths=0.4)
            ax.scatter(jitter[flags], d[flags], s=30, color="#d62728", zorder=4, marker="D")
            for xj, yj, f, name in zip(jitter, d, flags, names):
                if f:
                    ax.annotate(name, (xj, yj), fontsize=7, color="#d62728",
                                xytext=(4, 2), textcoords="offset points")
        ax.set_xticks(pos, methods, fontsize=8)
        u = pretty_units((units or {}).get(param))
        ax.set_title(f"{param}" + (f" ({u})" if u else ""), fontsize=10)
        ax.set_ylabel("median in mask", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(params):]:
        ax.set_visible(False)
    return save(fig, path)
