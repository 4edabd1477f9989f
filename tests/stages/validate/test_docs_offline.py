"""The validate stage's Data Docs load nothing from the network (stages/validate/docs_offline.py).

Real gate runs (GX writes the docs, the stage makes them offline): one where GX fails one
expectation of many, so both icons appear, and sklearn's digits table. Checked statically:
every script, stylesheet and image a page loads is a relative path to a file in the docs
folder, and so is every url() in the vendored CSS (the icon fonts). The browser test under
tests/browser/ renders the pages.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from stages.common.config import parse_params
from stages.common.errors import GateError
from stages.ingest.stage import load_sklearn_dataset
from stages.validate.docs_offline import make_docs_offline, offline_html
from tests.builders import SUITE
from tests.stages.validate.test_stage import (
    ROOT,
    good_table,
    make_params,
    run_gate,
    stage_dirs,
    write_raw,
    write_suite_file,
)

LOADED = re.compile(r"""<(?:script|link|img)\b[^>]*?\b(?:src|href)=["']([^"']+)["']""", re.I)
CSS_URL = re.compile(r"""url\(\s*["']?([^"')]+)["']?\s*\)""")
FAILING = {
    "type": "expect_column_mean_to_be_between",
    "kwargs": {"column": "x", "min_value": 50, "max_value": 60},
}


def assert_loads_only_local_files(page: Path, docs: Path) -> None:
    html = page.read_text(encoding="utf-8")
    for url in LOADED.findall(html) + CSS_URL.findall(html):
        assert not re.match(r"(?:https?:)?//", url), f"{page}: loads {url}"
        target = (page.parent / url.split("?")[0]).resolve()
        assert target.is_file() and target.is_relative_to(docs.resolve()), f"{page}: {url}"


def test_every_page_loads_only_files_in_the_docs_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run GX fails (one expectation of many): its docs show both icons."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    dirs = stage_dirs(tmp_path)
    write_raw(dirs["raw"], good_table())
    failing = {**SUITE, "expectations": [*SUITE["expectations"], FAILING]}
    with pytest.raises(GateError):
        run_gate(dirs, make_params(write_suite_file(tmp_path / "fail.json", failing)))
    docs = dirs["report"] / "docs"

    pages = sorted(docs.rglob("*.html"))
    [validation] = [p for p in pages if "validations" in p.parts]
    for page in pages:
        assert_loads_only_local_files(page, docs)
    index = (docs / "index.html").read_text(encoding="utf-8")
    assert "bootstrapTable(" in index and "static/vendor/docs_table.js" in index
    assert "fa-times" in index  # the failed run's icon in the index table
    shown = validation.read_text(encoding="utf-8")
    assert "fa-check-circle" in shown and "fa-times" in shown  # passed and failed expectations
    for css in (docs / "static" / "vendor").rglob("*.css"):  # the icon fonts, ../webfonts/*
        for url in CSS_URL.findall(css.read_text(encoding="utf-8")):
            if not url.startswith("data:"):
                assert (css.parent / url.split("?")[0].split("#")[0]).resolve().is_file(), url
    assert make_docs_offline(docs) == 0  # idempotent: nothing left to rewrite


def test_an_unknown_cdn_asset_is_dropped_and_gx_links_are_kept() -> None:
    html = (
        '<script src="https://cdn.example.org/new-lib.js"></script>'
        '<link rel="stylesheet" href="https://unpkg.com/bootstrap-table@1.19.1/dist/'
        'bootstrap-table.min.css">'
        '<a href="https://greatexpectations.io">GX</a>'
        '<link rel="shortcut icon" href="../../../static/images/favicon.ico"/>'
    )

    offline = offline_html(html, "../../../../static/")

    assert offline == (
        '<a href="https://greatexpectations.io">GX</a>'
        '<link rel="shortcut icon" href="../../../../static/images/favicon.ico"/>'
    )


def test_a_page_with_a_chart_gets_the_vega_libraries(tmp_path: Path) -> None:
    vega = "".join(
        f'<script src="https://cdn.jsdelivr.net/npm/{lib}"></script>'
        for lib in ("vega@5", "vega-lite@5", "vega-embed@6")
    )
    (tmp_path / "index.html").write_text(f"<head>{vega}</head><p>no chart</p>")
    (tmp_path / "expectations").mkdir()
    (tmp_path / "expectations/s.html").write_text(f"<head>{vega}</head><script>vegaEmbed(</script>")

    assert make_docs_offline(tmp_path) == 2

    assert "vega" not in (tmp_path / "index.html").read_text()
    assert_loads_only_local_files(tmp_path / "expectations/s.html", tmp_path)
    assert "vega-embed-bundle.js" in (tmp_path / "expectations/s.html").read_text()


def test_a_real_tables_docs_load_only_local_files(tmp_path: Path) -> None:
    """sklearn's digits with its committed suite (64 pixel columns: a long validation page)."""
    dirs = stage_dirs(tmp_path)
    table = pa.Table.from_pandas(load_sklearn_dataset("digits"), preserve_index=False)
    write_raw(dirs["raw"], table)
    params = parse_params({"validate": {"suite_path": str(ROOT / "suites" / "digits.json")}})

    assert run_gate(dirs, params)["gx"]["success"]

    docs = dirs["report"] / "docs"
    for page in docs.rglob("*.html"):
        assert_loads_only_local_files(page, docs)
