"""Sensitivity curves as a picture: HTML with inline SVG (no dependency), or PNG (matplotlib).

One line per unit: the quality drop (y) against the fraction of its items removed (x).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from onnxprune.errors import InputError
from onnxprune.io.files import atomic_path
from onnxprune.search.analyze import Analysis

__all__ = ["write_plot"]

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")


def _series(analysis: Analysis) -> list[tuple[str, list[tuple[float, float]]]]:
    out = []
    for a in analysis.units:
        pts = [(0.0, 0.0)] + [(k / a.unit.items, a.curve[k]) for k in sorted(a.curve)]
        out.append((f"{a.unit.kind}: {a.unit.name}", pts))
    return out


def _svg(analysis: Analysis) -> str:
    series = _series(analysis)
    w, h, left, bottom, top, right = 760, 420, 60, 40, 20, 20
    ymax = max([y for _, pts in series for _, y in pts] + [1e-6]) * 1.05
    ymin = min([y for _, pts in series for _, y in pts] + [0.0])

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + x * (w - left - right),
                top + (1 - (y - ymin) / (ymax - ymin)) * (h - top - bottom))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             'font-family="sans-serif" font-size="11">']
    x0, y0 = px(0, ymin)
    x1, y1 = px(1, ymax)
    parts.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" '
                 'fill="none" stroke="#444"/>')
    for i in range(6):
        f = i / 5
        gx, _ = px(f, ymin)
        _, gy = px(0, ymin + f * (ymax - ymin))
        parts.append(f'<text x="{gx}" y="{y0 + 15}" text-anchor="middle">{f:.0%}</text>')
        parts.append(f'<text x="{x0 - 5}" y="{gy + 4}" text-anchor="end">'
                     f'{ymin + f * (ymax - ymin):.3g}</text>')
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{gy}" y2="{gy}" stroke="#ddd"/>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{h - 5}" text-anchor="middle">fraction of the '
                 'unit removed</text>')
    parts.append(f'<text x="12" y="{(y0 + y1) / 2}" transform="rotate(-90 12 {(y0 + y1) / 2})" '
                 f'text-anchor="middle">{html.escape(analysis.evaluator.name)} drop</text>')
    for i, (label, pts) in enumerate(series):
        c = _COLOURS[i % len(_COLOURS)]
        dash = ' stroke-dasharray="5,3"' if label.startswith("heads") else ""
        path = " ".join(f"{px(x, y)[0]:.1f},{px(x, y)[1]:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.5"'
                     f'{dash}><title>{html.escape(label)}</title></polyline>')
    parts.append("</svg>")
    return "\n".join(parts)


def _html(analysis: Analysis) -> str:
    rows = []
    for i, a in enumerate(analysis.units):
        c = _COLOURS[i % len(_COLOURS)]
        drops = ", ".join(f"{k / a.unit.items:.0%}: {a.curve[k]:.4f}" for k in sorted(a.curve))
        rows.append(f'<tr><td style="color:{c}">&#9632;</td><td>{a.unit.kind}</td>'
                    f"<td>{html.escape(a.unit.name)}</td><td>{a.unit.items}</td>"
                    f"<td>{drops}</td></tr>")
    return ("<!doctype html><meta charset='utf-8'><title>onnxprune sensitivity</title>"
            "<h2>Quality drop per unit, each pruned alone (with least-squares repair)</h2>"
            f"<p>metric: {html.escape(analysis.evaluator.name)}; held out: "
            f"{html.escape(analysis.holdout_source)}. Dashed lines: attention heads.</p>"
            + _svg(analysis)
            + "<table border='1' cellpadding='3' style='border-collapse:collapse'>"
            "<tr><th></th><th>kind</th><th>unit</th><th>items</th><th>drop</th></tr>"
            + "".join(rows) + "</table>\n")


def _png(analysis: Analysis, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("a PNG plot needs matplotlib (pip install 'onnxprune[plot]'); "
                         "or give --plot FILE.html, which needs nothing") from None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, pts in _series(analysis):
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3,
                linestyle="--" if label.startswith("heads") else "-", label=label)
    ax.set_xlabel("fraction of the unit removed")
    ax.set_ylabel(f"{analysis.evaluator.name} drop")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_plot(analysis: Analysis, path: str | os.PathLike[str]) -> None:
    """Writes FILE.html or FILE.png (atomically); the suffix decides."""
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise InputError(f"--plot {out}: use a .html or .png file name")
    with atomic_path(out) as tmp:
        if suffix == ".png":
            _png(analysis, tmp)
        else:
            tmp.write_text(_html(analysis))
