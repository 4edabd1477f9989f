"""``reports/index.html``: the last run and the monitor's history on one self-contained page.

``build_page`` turns ``PageInputs`` (paths of the files a run left, the stage statuses, the
champion's files when the caller fetched them) into HTML; ``write_page`` writes it atomically.
Inline CSS and inline SVG only: no script, no external URL, so it renders with no network, as a
file or as an MLflow artifact. Links to the other reports (Data Docs, plots, the monitor's
drift reports) are relative, so they work where the page sits beside them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from pages import models, monitor, sections
from pages.html import ANCHORS


@dataclass(frozen=True)
class ModelFiles:
    """One model's evaluation files (any may be missing): evaluate's ``metrics.json``,
    ``confusion.json`` (``{actual, predicted}`` per row), ``roc.json``, ``pr.json``, and
    train's ``history.csv`` (one row per epoch)."""

    metrics: Path | None = None
    confusion: Path | None = None
    roc: Path | None = None
    pr: Path | None = None
    history: Path | None = None


@dataclass(frozen=True)
class Other:
    """The model the run's model is set beside: the champion (or, when the run's model was
    promoted, the champion it replaced). ``files`` are from its own training run (its own
    test split); None with ``note`` saying why they are not available."""

    version: str
    role: str  # "champion" or "previous champion"
    files: ModelFiles | None
    note: str = ""


@dataclass(frozen=True)
class RunStatus:
    """The stages of the last run: ``stages`` maps each stage to its result; ``source`` says
    where that came from (a Prefect flow run, or ``dvc status``)."""

    stages: dict[str, str]
    source: str
    failed: bool | None = None  # None: no run verdict (the stages as dvc status sees them)
    error: str | None = None


@dataclass(frozen=True)
class PageInputs:
    """Everything the page shows; paths may point at missing files."""

    root: Path  # paths recorded relative in reports (monitor report_dir) are under it
    registration: Path | None
    model: ModelFiles
    validation_summary: Path | None
    validation_result: Path | None
    quarantine_summary: Path | None
    quarantine_rows: Path | None
    monitor_history: Path | None
    run: RunStatus | None = None
    other: Other | None = None
    compare_metric: str | None = None  # register's metric: the row the gate compares
    thresholds: dict[str, float] = field(default_factory=dict)  # monitor: drift_share, psi...
    links: dict[str, Path] = field(default_factory=dict)  # other reports: name -> file
    generated_at: str = ""
    title: str = "Pipeline report"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9cfda}header a{color:#9cd1ff}
nav{padding:6px 24px;background:#e8ebf0;font-size:13px}nav a{margin-right:14px;color:#174ea6}
main{padding:8px 24px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;margin:14px 0}
h2{font-size:17px;margin:2px 0 10px}h3{font-size:14px;margin:12px 0 6px}
table{border-collapse:collapse;margin:6px 0}th,td{border-bottom:1px solid #e5e8ec;padding:3px 10px;
text-align:left;vertical-align:top}th{background:#f1f3f6;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#0b6b2f}.fail{color:#b00020;font-weight:600}.warn{color:#9a5b00}.na{color:#6b7280}
tr.fail td{background:#fdecee}tr.retrain td{background:#fff4e0}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.badge.ok{background:#dff3e6}.badge.fail{background:#fbdde1}.badge.warn{background:#fff0d0}
.badge.na{background:#eceef1}
.cols{display:flex;flex-wrap:wrap;gap:18px}.cols>div{flex:1 1 420px;min-width:0}
figure.chart{margin:6px 0}figure.chart svg{max-width:100%;height:auto;font-size:11px}
figcaption{font-size:12px;color:#4b5563}
.key{margin-right:10px}.swatch{display:inline-block;width:10px;height:10px;margin-right:4px}
svg .axis{stroke:#6b7280}svg .grid{stroke:#eceef1}svg .tick{fill:#4b5563}
svg .label{fill:#1d2330;font-weight:600}svg .threshold{stroke:#b00020;stroke-dasharray:4 3}
svg .threshold-label{fill:#b00020}
pre{white-space:pre-wrap;background:#fdecee;padding:8px;border-radius:4px}
details summary{cursor:pointer;color:#174ea6}
"""


def build_page(inputs: PageInputs, out_dir: Path) -> str:
    """The page's HTML; ``out_dir`` is where it will sit (links are made relative to it)."""
    body = [
        sections.stages_section(inputs.run),
        models.models_section(inputs),
        sections.gate_section(inputs.validation_summary, inputs.validation_result),
        sections.quarantine_section(inputs.quarantine_summary, inputs.quarantine_rows),
        sections.curves_section(inputs),
        monitor.monitor_section(inputs, out_dir),
    ]
    nav = "".join(f'<a href="#{anchor}">{escape(name)}</a>' for anchor, name in ANCHORS.items())
    nav += "".join(
        f'<a href="{escape(_relative(path, out_dir))}">{escape(name)}</a>'
        for name, path in inputs.links.items()
        if path.exists()
    )
    when = f"Written {escape(inputs.generated_at)}. " if inputs.generated_at else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No network, no script: anything else the page tried to load would be refused.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{escape(inputs.title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{escape(inputs.title)}</h1><p>{when}{sections.headline(inputs)}</p>"
        f"</header><nav>{nav}</nav><main>{''.join(body)}</main></body></html>\n"
    )


def write_page(inputs: PageInputs, out: Path) -> Path:
    """Write the page to ``out`` atomically (a reader never sees half a page); returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = build_page(inputs, out.parent)
    handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(html)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _relative(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())).as_posix()
