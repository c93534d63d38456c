"""Charts as SVG, rendered on the server (no script, every label escaped)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Final

from markupsafe import Markup

W: Final = 640
H: Final = 220
PAD: Final = 40


def line_chart(title: str, series: Mapping[str, Sequence[tuple[float, float]]]) -> Markup:
    """One polyline per series over a shared x range (e.g. time) and y from 0."""
    points = [p for values in series.values() for p in values]
    parts = [_open(title)]
    if not points:
        parts.append(_empty())
    else:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y1 = max(1.0, *(p[1] for p in points))
        span = (x1 - x0) or 1.0
        parts.append(_axes(y1))
        for n, (name, values) in enumerate(series.items()):
            coords = " ".join(
                f"{PAD + (x - x0) / span * (W - 2 * PAD):.1f},"
                f"{H - PAD - y / y1 * (H - 2 * PAD):.1f}"
                for x, y in values
            )
            parts.append(
                f'<polyline class="series s{n % 6}" points="{coords}"'
                f' data-series="{escape(name)}"/>'
            )
            parts.append(
                f'<text class="legend s{n % 6}" x="{W - PAD}" y="{PAD + 14 * n}"'
                f' text-anchor="end">{escape(name)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text above is escaped


def bar_chart(title: str, bars: Sequence[tuple[str, float]], unit: str = "") -> Markup:
    parts = [_open(title)]
    if not bars:
        parts.append(_empty())
    else:
        top = max(1.0, *(v for _, v in bars))
        width = (W - 2 * PAD) / len(bars)
        parts.append(_axes(top))
        for n, (label, value) in enumerate(bars):
            height = value / top * (H - 2 * PAD)
            x = PAD + n * width + width * 0.15
            parts.append(
                f'<rect class="bar s{n % 6}" x="{x:.1f}" y="{H - PAD - height:.1f}"'
                f' width="{width * 0.7:.1f}" height="{height:.1f}"/>'
                f'<text x="{x + width * 0.35:.1f}" y="{H - PAD + 14}" text-anchor="middle">'
                f"{escape(label)}</text>"
                f'<text x="{x + width * 0.35:.1f}" y="{H - PAD - height - 4:.1f}"'
                f' text-anchor="middle">{value:.1f}{escape(unit)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text above is escaped


def _open(title: str) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}"'
        f' xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
        f'<text class="caption" x="{PAD}" y="{PAD - 16}">{escape(title)}</text>'
    )


def _axes(top: float) -> str:
    return (
        f'<line class="axis" x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}"/>'
        f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}"/>'
        f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{top:g}</text>'
        f'<text x="{PAD - 4}" y="{H - PAD}" text-anchor="end">0</text>'
    )


def _empty() -> str:
    return f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data yet</text>'
