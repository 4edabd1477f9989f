"""reports/index.html from tiny files: every section, failures marked, nothing external, and a
missing or broken file is said, never an error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pages.index import ModelFiles, Other, PageInputs, RunStatus, build_page, write_page
from pages.svg import nice_ticks

# What a browser would fetch: src/href/url(...) values, and CSS imports.
EXTERNAL = re.compile(
    r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import"""
)


def _json(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def _model_files(folder: Path, wrong: int) -> ModelFiles:
    pairs = [{"actual": a, "predicted": a} for a in (0, 1, 1, 0, 1)]
    pairs += [{"actual": 0, "predicted": 1}] * wrong
    history = folder / "history.csv"
    folder.mkdir(parents=True)
    history.write_text("epoch,train_loss,val_loss,val_accuracy\n1,0.7,0.69,0.6\n2,0.4,0.45,0.8\n")
    return ModelFiles(
        metrics=_json(
            folder / "metrics.json", {"accuracy": 0.9, "baseline_majority_accuracy": 0.6}
        ),
        confusion=_json(folder / "confusion.json", pairs),
        roc=_json(
            folder / "roc.json",
            [{"fpr": 0, "tpr": 0}, {"fpr": 0.1, "tpr": 0.9}, {"fpr": 1, "tpr": 1}],
        ),
        pr=_json(
            folder / "pr.json", [{"recall": 0, "precision": 1}, {"recall": 1, "precision": 0.7}]
        ),
        history=history,
    )


def _gate_files(root: Path) -> tuple[Path, Path]:
    summary = _json(
        root / "validation" / "summary.json",
        {
            "success": False,
            "rows": 100,
            "bad_rows": 30,
            "bad_fraction": 0.3,
            "max_bad_fraction": 0.01,
            "gx": {"evaluated_expectations": 2, "rows": 70},
            "failed": [{"column": "age", "rule": "between", "message": "30% of rows out of range"}],
        },
    )
    result = _json(
        root / "validation" / "result.json",
        {
            "results": [
                {
                    "success": True,
                    "expectation_config": {
                        "type": "expect_column_values_to_not_be_null",
                        "kwargs": {"column": "age"},
                    },
                    "result": {"unexpected_count": 0},
                },
                {
                    "success": False,
                    "expectation_config": {
                        "type": "expect_column_values_to_be_between",
                        "kwargs": {"column": "age"},
                    },
                    "result": {"unexpected_count": 3, "partial_unexpected_list": [-4, 212, 999]},
                },
            ]
        },
    )
    return summary, result


def _quarantine(root: Path) -> tuple[Path, Path]:
    summary = _json(
        root / "quarantine" / "summary.json",
        {
            "data": "data/raw",
            "rows": 100,
            "bad_rows": 30,
            "bad_fraction": 0.3,
            "rules": [{"column": "age", "rule": "between", "rows": 30}],
        },
    )
    rows = root / "quarantine" / "rows.parquet"
    pq.write_table(
        pa.table(
            {"age": [-4.0, 212.0], "_rule": ["between", "between"], "_column": ["age", "age"]}
        ),
        rows,
    )
    return summary, rows


def _history(root: Path) -> Path:
    (root / "reports" / "monitor" / "20260102T000000Z").mkdir(parents=True)
    (root / "reports" / "monitor" / "20260102T000000Z" / "drift.html").write_text("<html></html>")
    checks = [
        {
            "checked_at": "2026-01-01T00:00:00+00:00",
            "rows": 50,
            "decision": "waiting",
            "report_dir": None,
        },
        {
            "checked_at": "2026-01-01T12:00:00+00:00",
            "rows": 400,
            "model_version": "3",
            "drift_share": 0.05,
            "drifted_columns": [],
            "psi": 0.01,
            "bad_row_share": 0.0,
            "accuracy": 0.93,
            "accuracy_source": "estimated",
            "decision": "ok",
            "reasons": [],
        },
        {
            "checked_at": "2026-01-02T00:00:00+00:00",
            "rows": 500,
            "model_version": "3",
            "drift_share": 0.6,
            "drifted_columns": ["mean_radius", "mean_area"],
            "psi": 0.41,
            "bad_row_share": 0.01,
            "accuracy": 0.71,
            "accuracy_source": "labels",
            "decision": "retrain",
            "reasons": ["2 of 3 features drifted (mean_radius, mean_area): share 0.60 > 0.3"],
            "service": {
                "available": True,
                "requests": 1200.0,
                "error_share": 0.005,
                "latency_p95_s": 0.042,
            },
            "report_dir": "reports/monitor/20260102T000000Z",
        },
    ]
    path = root / "reports" / "monitor" / "history.jsonl"
    path.write_text(
        "\n".join(json.dumps(c) for c in checks) + '\n{"checked_at": "2026-01-0', encoding="utf-8"
    )
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> PageInputs:
    gate_summary, gate_result = _gate_files(tmp_path)
    quarantine_summary, quarantine_rows = _quarantine(tmp_path)
    registration = _json(
        tmp_path / "registration.json",
        {
            "model_name": "clf",
            "version": 4,
            "decision": "challenger",
            "reason": "worse than v3",
            "metrics": {"f1_macro": 0.8, "log_loss": 0.3},
            "champion_metrics": {"f1_macro": 0.9, "log_loss": 0.2},
            "baselines": {"majority": {"f1_macro": 0.4, "log_loss": 0.7}},
        },
    )
    return PageInputs(
        root=tmp_path,
        registration=registration,
        model=_model_files(tmp_path / "run", wrong=2),
        validation_summary=gate_summary,
        validation_result=gate_result,
        quarantine_summary=quarantine_summary,
        quarantine_rows=quarantine_rows,
        monitor_history=_history(tmp_path),
        run=RunStatus(
            {"validate": "ran", "train": "failed", "register": "not run"},
            "Prefect flow run x",
            failed=True,
            error="stage train failed: out of memory",
        ),
        other=Other("3", "champion", _model_files(tmp_path / "champion", wrong=0)),
        compare_metric="f1_macro",
        thresholds={"drift_share": 0.3, "psi_threshold": 0.2},
        links={"Data Docs": tmp_path / "validation" / "docs" / "index.html"},
        generated_at="2026-01-02 00:00 UTC",
    )


def test_every_section_with_failures_marked(inputs: PageInputs, tmp_path: Path) -> None:
    out = write_page(inputs, tmp_path / "reports" / "index.html")
    html = out.read_text(encoding="utf-8")
    for anchor in ("stages", "models", "gate", "quarantine", "curves", "monitor"):
        assert f'id="{anchor}"' in html
    assert "stage train failed: out of memory" in html  # the run's error, quoted
    assert '<tr class="fail"><td>train</td>' in html
    # champion beside the challenger: the better value bold, the gate's metric named
    assert "champion v3 (same test data)" in html and "f1_macro (gate)" in html
    assert "<strong>0.9000</strong>" in html and "<strong>0.2000</strong>" in html
    assert html.count("<svg") >= 2 + 2 + 2 + 3  # 2 matrices, ROC + PR, 2 history charts, 3 monitor
    # the data gate: failed, its failure and the failed expectation marked (failures first)
    assert 'class="badge fail">failed' in html
    assert "30% of rows out of range" in html
    assert re.search(
        r'<tr class="fail"><td>.{0,60}fail</span></td><td>expect_column_values_to_be_between', html
    )
    assert "[-4, 212, 999]" in html
    assert "30 of 100 rows quarantined" in html and "212.0" in html
    # drift over time: the retrain row marked with its reason and a relative link to its report
    assert '<tr class="retrain">' in html and "share 0.60 &gt; 0.3" in html
    assert 'href="monitor/20260102T000000Z/drift.html"' in html
    assert "0.7100 (labels)" in html and "retraining triggered 1 time(s)" in html
    assert "psi_threshold 0.2" in html  # the threshold line is labelled
    assert "1200 requests<br>0.50% errors<br>p95 42 ms" in html
    assert "Data Docs" not in html.split("<main>")[0]  # a link to a missing file is left out


def test_self_contained(inputs: PageInputs, tmp_path: Path) -> None:
    html = build_page(inputs, tmp_path)
    assert "<script" not in html.lower()
    assert not EXTERNAL.findall(html), EXTERNAL.findall(html)
    assert "default-src 'none'" in html  # and the browser is told to load nothing else


def test_missing_and_broken_files_are_said(tmp_path: Path) -> None:
    broken = tmp_path / "registration.json"
    broken.write_text("{not json")
    missing = tmp_path / "absent.json"
    inputs = PageInputs(
        root=tmp_path,
        registration=broken,
        model=ModelFiles(metrics=missing),
        validation_summary=missing,
        validation_result=None,
        quarantine_summary=missing,
        quarantine_rows=None,
        monitor_history=missing,
    )
    html = build_page(inputs, tmp_path)
    assert f"{broken}: not readable JSON" in html
    assert "The validation summary: not available." in html
    assert "Training history: not available." in html
    assert "No monitor checks yet" in html
    assert "Stage results: not available." in html


@pytest.mark.parametrize(
    ("lo", "hi", "ticks"),
    [
        (0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1]),
        (1, 77, [0, 20, 40, 60, 80]),
        (0.004, 0.73, [0, 0.2, 0.4, 0.6, 0.8]),
    ],
)
def test_nice_ticks(lo: float, hi: float, ticks: list[float]) -> None:
    assert nice_ticks(lo, hi) == ticks
