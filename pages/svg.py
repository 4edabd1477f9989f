"""Inline SVG charts: a line chart and a confusion matrix, as markup strings.

No script and no external file: each chart is one ``<svg>`` element the page embeds. Values
show on hover through SVG ``<title>`` elements (the browser's own tooltip).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from html import escape

# Colour-blind-safe (Okabe-Ito), in the order series are drawn.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000")
WIDTH, HEIGHT = 460, 260
MARGIN = {"left": 56, "right": 16, "top": 16, "bottom": 44}
TICKS = 5


@dataclass(frozen=True)
class Series:
    """One line: its name (the legend) and its ``(x, y)`` points; None y values are gaps."""

    name: str
    points: Sequence[tuple[float, float | None]]
    dashed: bool = False


@dataclass(frozen=True)
class Chart:
    """What a line chart shows. ``x_ticks`` labels chosen x values (e.g. dates) instead of
    numbers; ``thresholds`` draw a dashed horizontal line each, with its label."""

    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    x_ticks: dict[float, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    y_range: tuple[float, float] | None = None  # fixed axis, e.g. (0, 1) for a share


def line_chart(chart: Chart) -> str:
    """The chart as an ``<svg>`` element (a note instead when it has no point)."""
    xs = [x for s in chart.series for x, y in s.points if _finite(y)]
    ys = [y for s in chart.series for _, y in s.points if _finite(y)]
    if not xs:
        return f'<p class="na">{escape(chart.title)}: no data points.</p>'
    y_ticks = nice_ticks(*(chart.y_range or (min(ys), max(ys))), extra=chart.thresholds.values())
    if chart.x_ticks:  # labelled positions (checks in time): all of them, with data or not
        x_lo, x_hi = min(chart.x_ticks), max(chart.x_ticks)
        x_lo, x_hi = (x_lo - 0.5, x_hi + 0.5) if x_hi == x_lo else (x_lo, x_hi)
        x_labels = chart.x_ticks
    else:
        x_values = nice_ticks(min(xs), max(xs))
        x_lo, x_hi = x_values[0], x_values[-1]
        x_labels = {x: _tick_label(x, x_values) for x in x_values}
    y_lo, y_hi = y_ticks[0], y_ticks[-1]
    plot_w = WIDTH - MARGIN["left"] - MARGIN["right"]
    plot_h = HEIGHT - MARGIN["top"] - MARGIN["bottom"]

    def px(x: float) -> float:
        return MARGIN["left"] + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return MARGIN["top"] + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [_axes(chart, px, py, x_labels, y_ticks)]
    for name, value in chart.thresholds.items():
        parts.append(
            f'<line class="threshold" x1="{px(x_lo):.1f}" x2="{px(x_hi):.1f}" '
            f'y1="{py(value):.1f}" y2="{py(value):.1f}"><title>{escape(name)} = '
            f"{value:g}</title></line>"
            f'<text class="threshold-label" x="{px(x_hi) - 2:.1f}" y="{py(value) - 3:.1f}" '
            f'text-anchor="end">{escape(name)} {value:g}</text>'
        )
    for index, series in enumerate(chart.series):
        parts.append(_series(series, PALETTE[index % len(PALETTE)], px, py, chart.x_ticks))
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{PALETTE[i % len(PALETTE)]}">'
        f"</span>{escape(s.name)}</span>"
        for i, s in enumerate(chart.series)
    )
    return (
        f'<figure class="chart"><svg xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
        f"<title>{escape(chart.title)}</title>{''.join(parts)}</svg>"
        f"<figcaption>{escape(chart.title)}<br>{legend}</figcaption></figure>"
    )


def nice_ticks(lo: float, hi: float, extra: Iterable[float] = ()) -> list[float]:
    """About ``TICKS`` round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering ``lo``..``hi``
    and every value of ``extra`` (thresholds drawn on the chart)."""
    values = [lo, hi, *extra]
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / TICKS
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def _tick_label(value: float, ticks: Sequence[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (
        1 if f"{step:g}".endswith("25") else 0
    )
    if abs(value) >= 10_000 or (value and abs(value) < 1e-3):
        return f"{value:.2g}"
    return f"{value:.{decimals}f}"


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _axes(chart: Chart, px, py, x_labels: dict[float, str], y_ticks: Sequence[float]) -> str:
    left, bottom = MARGIN["left"], HEIGHT - MARGIN["bottom"]
    right = WIDTH - MARGIN["right"]
    out = [
        f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}"/>',
        f'<line class="axis" x1="{left}" x2="{left}" y1="{MARGIN["top"]}" y2="{bottom}"/>',
    ]
    for value in y_ticks:
        y = py(value)
        out.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">'
            f"{_tick_label(value, y_ticks)}</text>"
        )
    shown = list(x_labels.items())
    step = max(1, math.ceil(len(shown) / (TICKS + 1)))  # at most ~6 labels, never crowded
    for x, label in shown[::step]:
        out.append(
            f'<text class="tick" x="{px(x):.1f}" y="{bottom + 14}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    out.append(
        f'<text class="label" x="{(left + right) / 2:.1f}" y="{HEIGHT - 6}" '
        f'text-anchor="middle">{escape(chart.x_label)}</text>'
        f'<text class="label" transform="translate(14 {(MARGIN["top"] + bottom) / 2:.1f}) '
        f'rotate(-90)" text-anchor="middle">{escape(chart.y_label)}</text>'
    )
    return "".join(out)


def _series(series: Series, colour: str, px, py, x_ticks: dict[float, str]) -> str:
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in series.points:
        if _finite(y):
            runs[-1].append((x, y))  # type: ignore[arg-type]
        elif runs[-1]:
            runs.append([])  # a gap: the line breaks here
    dash = ' stroke-dasharray="5 3"' if series.dashed else ""
    out = []
    for run in runs:
        if len(run) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
            out.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} '
                f'points="{coords}"/>'
            )
    for x, y in (point for run in runs for point in run):
        where = x_ticks.get(x, _number(x))
        out.append(
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}">'
            f"<title>{escape(series.name)} at {escape(where)}: {_number(y)}</title></circle>"
        )
    return "".join(out)


def _number(value: float) -> str:
    if value == 0 or 0.001 <= abs(value) < 10_000:
        return f"{value:.4g}"
    return f"{value:.2e}"


def confusion_matrix(pairs: Sequence[tuple[object, object]], title: str) -> str:
    """A confusion matrix from ``(actual, predicted)`` pairs: rows actual, columns predicted
    (as evaluate's PNG), each cell its count, shaded by its share of the actual class."""
    if not pairs:
        return f'<p class="na">{escape(title)}: no rows.</p>'
    labels = sorted({value for pair in pairs for value in pair}, key=str)
    counts = Counter(pairs)
    size = 44
    left, top = 70, 40
    width, height = left + size * len(labels) + 10, top + size * len(labels) + 10
    cells = []
    for row, actual in enumerate(labels):
        total = sum(counts[(actual, p)] for p in labels) or 1
        for col, predicted in enumerate(labels):
            count = counts[(actual, predicted)]
            share = count / total
            ink = "#fff" if share > 0.5 else "#111"
            x, y = left + col * size, top + row * size
            cells.append(
                f'<rect x="{x}" y="{y}" width="{size}" height="{size}" '
                f'fill="rgba(0,114,178,{0.08 + 0.92 * share:.3f})" stroke="#fff">'
                f"<title>actual {escape(str(actual))}, predicted {escape(str(predicted))}: "
                f"{count}</title></rect>"
                f'<text x="{x + size / 2}" y="{y + size / 2 + 4}" text-anchor="middle" '
                f'fill="{ink}">{count}</text>'
            )
    heads = "".join(
        f'<text class="tick" x="{left + i * size + size / 2}" y="{top - 6}" '
        f'text-anchor="middle">{escape(str(v))}</text>'
        f'<text class="tick" x="{left - 6}" y="{top + i * size + size / 2 + 4}" '
        f'text-anchor="end">{escape(str(v))}</text>'
        for i, v in enumerate(labels)
    )
    axes = (
        f'<text class="label" x="{left + size * len(labels) / 2}" y="14" '
        f'text-anchor="middle">predicted</text>'
        f'<text class="label" transform="translate(14 {top + size * len(labels) / 2}) '
        f'rotate(-90)" text-anchor="middle">actual</text>'
    )
    return (
        f'<figure class="chart"><svg xmlns="http://www.w3.org/2000/svg" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
        f"<title>{escape(title)}</title>{axes}{heads}{''.join(cells)}</svg>"
        f"<figcaption>{escape(title)}</figcaption></figure>"
    )
