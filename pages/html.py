"""What every section uses: the anchors, a titled section, tables, cells, badges, notes."""

from __future__ import annotations

import re
from html import escape
from typing import Any

from pages.read import Broken

ANCHORS = {
    "stages": "Stages",
    "models": "Champion vs challenger",
    "gate": "Data gate",
    "quarantine": "Quarantine",
    "curves": "Training curves",
    "monitor": "Drift over time",
}
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]?\d+)?%?")  # a cell right-aligned as a number


def section(anchor: str, body: str) -> str:
    """A titled ``<section>`` with the anchor the navigation links to."""
    return f'<section id="{anchor}"><h2>{escape(ANCHORS[anchor])}</h2>{body}</section>'


def table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """An HTML table; cells are markup already (escape text first), ``classes`` per row."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        f'<tr class="{(classes or [""] * len(rows))[i]}">' + "".join(cells) + "</tr>"
        for i, cells in enumerate(
            [[_cell(value) for value in row] for row in rows]  # numbers right-aligned
        )
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: str) -> str:
    numeric = NUMBER.fullmatch(re.sub(r"<[^>]+>", "", value)) is not None
    return f'<td class="num">{value}</td>' if numeric else f"<td>{value}</td>"


def fmt(value: Any, digits: int = 4) -> str:
    """A value for a cell: floats to ``digits`` decimals, None as a dash, text escaped."""
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return escape(str(value))


def badge(text: str, kind: str) -> str:
    """A coloured label: ``kind`` is ok, fail, warn or na."""
    return f'<span class="badge {kind}">{escape(text)}</span>'


def not_available(what: str, value: Any) -> str:
    """Why ``what`` is not shown: a missing file, or a broken one (named)."""
    if isinstance(value, Broken):
        return f'<p class="fail">{escape(what)}: {escape(str(value))}</p>'
    return f'<p class="na">{escape(what)}: not available.</p>'


def side_by_side(parts: list[str]) -> str:
    """Blocks side by side (wrapping on a narrow screen)."""
    return '<div class="cols">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"
