"""The reports a run leaves render in Chromium with no network: GX Data Docs (icons, the index
table), the DVC plots (vega draws every chart) and the monitor's Evidently drift report."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flows.plots import show_plots
from tests.browser.harness import assert_clean
from tests.conftest import Reproduced

pytestmark = pytest.mark.slow  # the session's reproduced pipeline (one dvc repro)

DRAWN_S = 30  # vega and Evidently draw after "load": how long to wait for their output


def _fonts_loaded(page) -> list[str]:
    return page.evaluate(
        "document.fonts.ready.then(() => [...document.fonts]"
        ".filter(f => f.status === 'loaded').map(f => f.family))"
    )


def test_data_docs_offline(pipeline_run: Reproduced, open_page) -> None:
    docs = pipeline_run.repo / "reports" / "validation" / "docs"
    index = open_page((docs / "index.html").as_uri(), name="data-docs-index")
    rows = index.page.locator("table.ge-index-page-validation-results-table tbody tr")
    rows.first.wait_for(timeout=DRAWN_S * 1000)
    assert rows.count() >= 1
    assert index.page.locator("tbody i.fa-check-circle").first.is_visible()  # passed: green
    assert any("Font Awesome" in family for family in _fonts_loaded(index.page))
    assert_clean(index)

    validation = next(docs.glob("validations/**/*.html"))
    shown = open_page(validation.as_uri(), name="data-docs-validation")
    assert shown.page.locator("i.fa-check-circle").count() >= 1
    assert any("Font Awesome" in family for family in _fonts_loaded(shown.page))
    assert_clean(shown)


def test_dvc_plots_offline(pipeline_run: Reproduced, open_page) -> None:
    out = pipeline_run.repo / "reports" / "plots"
    assert show_plots(pipeline_run.repo, out) == 0
    visit = open_page((out / "index.html").as_uri(), name="dvc-plots")
    visit.page.wait_for_function(
        "document.querySelectorAll('.vega-embed svg, .vega-embed canvas').length >= 4",
        timeout=DRAWN_S * 1000,
    )
    for image in visit.page.locator("img").all():  # the PNGs DVC copies beside the page
        assert image.evaluate("i => i.complete && i.naturalWidth > 0"), image.get_attribute("src")
    assert_clean(visit)


def test_drift_report_offline(pipeline_run: Reproduced, open_page, tmp_path: Path) -> None:
    from monitoring.drift import detect_drift

    features = pipeline_run.repo / "data" / "features"
    reference = pd.read_parquet(features / "train.parquet").drop(columns="target")
    current = pd.read_parquet(features / "test.parquet").drop(columns="target")
    current[current.columns[:5]] *= 1.5  # some features drift
    result = detect_drift(reference, current, dict.fromkeys(reference.columns, "num"), 0.3)
    report = tmp_path / "drift.html"
    report.write_text(result.html(), encoding="utf-8")

    visit = open_page(report.as_uri(), name="evidently-drift")
    visit.page.get_by_text("Dataset Drift").first.wait_for(timeout=DRAWN_S * 1000)
    assert visit.page.get_by_text("Drifted Columns").first.is_visible()
    assert visit.page.locator("svg, canvas").count() >= 1
    assert_clean(visit)
