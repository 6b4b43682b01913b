"""Inline SVG strip charts of the group report: one point per series, each with hover text.

Every point carries an SVG ``<title>`` (the browser's tooltip: series label, method, value and
robust z), so a cohort of hundreds of subjects stays readable without a label per point; outliers
are red diamonds and also named in the chart. Plain markup, no script, nothing loaded: the page
stays self-contained. The horizontal jitter of a point comes from its label (CRC32), so the same
subject sits at the same place in every chart and every run.
"""
from __future__ import annotations

import zlib
from html import escape

import numpy as np

from .figures import method_colour

#: Chart geometry (pixels).
COLUMN_W, PLOT_H, LEFT, TOP, BOTTOM, RIGHT = 120, 220, 64, 28, 34, 12


def _jitter(label: str) -> float:
    """A fixed offset in [-0.32, 0.32] of a column width, from the label."""
    return (zlib.crc32(label.encode("utf-8")) / 0xFFFFFFFF - 0.5) * 0.64


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    if not hi > lo:
        return [lo]
    step = (hi - lo) / (n - 1)
    magnitude = 10 ** np.floor(np.log10(step))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step),
               default=step)
    first = np.ceil(lo / step) * step
    return [float(t) for t in np.arange(first, hi + step * 1e-9, step)]


def strip_chart(title: str, methods: list[str], points: dict, quantity: str = "") -> str:
    """An ``<svg>`` of ``points[method] = [(label, value, flagged, z), ...]`` (NaN values are
    left out), one column per method, with a box from the quartiles and the median; a point's
    tooltip reads ``<label> · <method> · <quantity> = <value>, robust z <z>``."""
    finite = [v for m in methods for _, v, _, _ in points.get(m, []) if np.isfinite(v)]
    width = LEFT + COLUMN_W * max(1, len(methods)) + RIGHT
    height = TOP + PLOT_H + BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="strip" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}: one point per series, hover for its label">',
             f'<text x="{LEFT}" y="16" class="strip-title">{escape(title)}</text>']
    if not finite:
        parts.append(f'<text x="{LEFT}" y="{TOP + PLOT_H / 2:.0f}">no finite value</text></svg>')
        return "".join(parts)
    lo, hi = float(min(finite)), float(max(finite))
    pad = 0.06 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 1e-3)
    lo, hi = lo - pad, hi + pad

    def y(v: float) -> float:
        return TOP + PLOT_H * (1 - (v - lo) / (hi - lo))

    parts.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + PLOT_H}" class="axis"/>')
    for t in _ticks(lo, hi):
        parts.append(f'<line x1="{LEFT - 4}" y1="{y(t):.1f}" x2="{width - RIGHT}" '
                     f'y2="{y(t):.1f}" class="grid"/><text x="{LEFT - 6}" y="{y(t) + 3:.1f}" '
                     f'class="tick" text-anchor="end">{t:.4g}</text>')
    for i, method in enumerate(methods):
        cx = LEFT + COLUMN_W * (i + 0.5)
        colour = method_colour(method)
        values = np.array([v for _, v, _, _ in points.get(method, []) if np.isfinite(v)])
        parts.append(f'<text x="{cx:.1f}" y="{TOP + PLOT_H + 20}" class="tick" '
                     f'text-anchor="middle">{escape(method)} (n={values.size})</text>')
        if values.size:
            q1, med, q3 = np.percentile(values, [25, 50, 75])
            parts.append(f'<rect x="{cx - 0.38 * COLUMN_W:.1f}" y="{y(q3):.1f}" '
                         f'width="{0.76 * COLUMN_W:.1f}" height="{max(y(q1) - y(q3), 1):.1f}" '
                         f'class="box"/><line x1="{cx - 0.38 * COLUMN_W:.1f}" y1="{y(med):.1f}" '
                         f'x2="{cx + 0.38 * COLUMN_W:.1f}" y2="{y(med):.1f}" class="median"/>')
        for label, value, flagged, z in points.get(method, []):
            if not np.isfinite(value):
                continue
            px, py = cx + _jitter(label) * COLUMN_W, y(value)
            z_text = f", robust z {z:+.1f}" if np.isfinite(z) else ""
            tip = escape(f"{label} · {method} · {quantity or title} = {value:.4g}{z_text}"
                         + (" · outlier" if flagged else ""))
            if flagged:
                parts.append(f'<g class="pt out"><path d="M{px:.1f} {py - 5:.1f}l5 5l-5 5l-5 -5z"'
                             f'/><title>{tip}</title></g><text x="{px + 6:.1f}" '
                             f'y="{py - 4:.1f}" class="out-label">{escape(label)}</text>')
            else:
                parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.2" class="pt" '
                             f'fill="{colour}"><title>{tip}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["strip_chart"]
