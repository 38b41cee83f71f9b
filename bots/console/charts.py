"""Small server-rendered SVG charts (no script, no CDN): lines over days, and bars.

They scale to the page's width (a viewBox) and carry <title> tooltips on their points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from markupsafe import Markup

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563",
           "#ca8a04")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def line_chart(xs: Sequence[str], series: Mapping[str, Sequence[float | None]], *,
               y_max: float | None = None, percent: bool = False, height: int = 180,
               label: str = "", width: int = 640) -> Markup:
    """One line per series over the labels `xs` (None: no point that day)."""
    left, right, top, bottom = 44, 10, 10, 24
    values = [v for ys in series.values() for v in ys if v is not None]
    top_value = y_max if y_max is not None else max(values, default=1.0) or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(xs), 1)

    def x(i: int) -> float:
        return left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / top_value)

    def fmt(v: float) -> str:
        return f"{v:.0%}" if percent else (f"{v:.0f}" if top_value >= 10 else f"{v:.2f}")

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(label)}">']
    for frac in (0, 0.5, 1):
        yy = y(top_value * frac)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     'class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{yy + 4:.1f}" text-anchor="end">'
                     f'{fmt(top_value * frac)}</text>')
    step = max(1, n // 7)
    for i, label_x in enumerate(xs):
        if i % step == 0 or i == n - 1:
            parts.append(f'<text x="{x(i):.1f}" y="{height - 6}" text-anchor="middle">'
                         f'{escape(label_x)}</text>')
    for k, (name, ys) in enumerate(series.items()):
        segments: list[list[str]] = [[]]
        for i, v in enumerate(ys):
            if v is None:
                segments.append([])
                continue
            segments[-1].append(f"{x(i):.1f},{y(v):.1f}")
            parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{color(k)}">'
                         f'<title>{escape(name)} {escape(xs[i])}: {fmt(v)}</title></circle>')
        for seg in segments:
            if len(seg) > 1:
                parts.append(f'<polyline points="{" ".join(seg)}" fill="none" '
                             f'stroke="{color(k)}" stroke-width="2"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bar_chart(labels: Sequence[str], values: Sequence[float], *, height: int = 160,
              label: str = "", stacked: Sequence[float] | None = None,
              width: int = 640) -> Markup:
    """Vertical bars; `stacked`: a second value drawn in red on top of the first's base
    (e.g. failures among answers)."""
    left, right, top, bottom = 44, 10, 10, 24
    top_value = max(values, default=1) or 1
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(labels), 1)
    bar = plot_w / n
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(label)}">',
             f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{top_value:.0f}</text>',
             f'<text x="{left - 4}" y="{top + plot_h + 4}" text-anchor="end">0</text>']
    step = max(1, n // 7)
    for i, (name, v) in enumerate(zip(labels, values, strict=True)):
        h = plot_h * v / top_value
        xx = left + i * bar + bar * 0.1
        parts.append(f'<rect x="{xx:.1f}" y="{top + plot_h - h:.1f}" width="{bar * 0.8:.1f}" '
                     f'height="{h:.1f}" fill="{color(0)}"><title>{escape(name)}: {v:.0f}'
                     '</title></rect>')
        if stacked is not None and stacked[i]:
            hs = plot_h * stacked[i] / top_value
            parts.append(f'<rect x="{xx:.1f}" y="{top + plot_h - hs:.1f}" '
                         f'width="{bar * 0.8:.1f}" height="{hs:.1f}" fill="{color(1)}">'
                         f'<title>{escape(name)}: {stacked[i]:.0f} failed</title></rect>')
        if i % step == 0 or i == n - 1:
            parts.append(f'<text x="{xx + bar * 0.4:.1f}" y="{height - 6}" '
                         f'text-anchor="middle">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(names: Sequence[str]) -> Markup:
    return Markup("".join(f'<span class="key"><i style="background:{color(i)}"></i>'
                          f"{escape(n)}</span>" for i, n in enumerate(names)))
