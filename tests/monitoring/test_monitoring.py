"""monitoring/ on tiny in-memory data and one real table (palmerpenguins): PSI, the service's
figures from a real ``ServiceMetrics`` exposition, CBPE and live performance, labels files,
contract quality, the log window's watermark, Evidently drift and its offline HTML, the
reference lookup in a real DVC cache, the decision's sentences."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitoring import check, drift, performance, psi, quality, reference, service, window


@pytest.fixture(scope="module")
def penguins() -> pd.DataFrame:
    from palmerpenguins import load_penguins

    return load_penguins()


# --- PSI ---------------------------------------------------------------------------------------


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    ref = rng.beta(2, 5, 5000)
    assert psi.psi(ref, rng.beta(2, 5, 5000), 10) < 0.02
    assert psi.psi(ref, rng.beta(5, 2, 5000), 10) > 1.0


def test_psi_stays_finite_when_live_values_fill_no_reference_bin_or_the_reference_is_constant():
    assert np.isfinite(psi.psi(np.linspace(0, 0.5, 100), np.full(50, 0.9), 10))
    # a confident model: the reference is all 1.0, the quantile bins collapse into one edge
    assert psi.psi(np.ones(100), np.ones(80), 10) == pytest.approx(0.0)
    assert psi.psi(np.ones(100), np.full(80, 0.4), 10) > 0.2


def test_proba_psi_reports_the_worst_class_column() -> None:
    ref = pd.DataFrame({"proba_a": np.linspace(0, 1, 200), "proba_b": np.linspace(1, 0, 200)})
    cur = pd.DataFrame({"proba_a": np.full(100, 0.95), "proba_b": np.linspace(1, 0, 100)})
    result = psi.proba_psi(ref, cur, 10)
    assert result.worst == "proba_a" and result.value == result.per_class["proba_a"]
    assert result.per_class["proba_b"] < 0.05


# --- the service's /metrics ----------------------------------------------------------------------


def test_service_figures_from_the_services_own_metrics_text() -> None:
    from serving.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    for seconds in [0.004] * 90 + [0.2] * 10:
        metrics.observe_request("predict", 200, "3", seconds)
    metrics.observe_request("predict", 422, "3", 0.001)
    metrics.observe_request("predict", 500, "3", 0.001)
    text, _ = metrics.render()
    figures = service.parse_metrics(text.decode())
    assert figures.available and figures.requests == 102
    assert figures.errors == 1 and figures.client_errors == 1
    assert figures.error_share == pytest.approx(1 / 102)
    assert 0.0025 < figures.latency_p50_s <= 0.005  # inside the bucket of the 4 ms requests
    assert 0.1 < figures.latency_p95_s <= 0.25


def test_an_unreachable_service_is_recorded_as_unavailable_not_raised() -> None:
    figures = service.read_service("http://127.0.0.1:9/metrics", timeout_s=2)
    assert not figures.available and figures.error
    assert not service.read_service(None).available


# --- performance ---------------------------------------------------------------------------------


def test_cbpe_expects_the_mean_top_probability_and_f1_from_the_probabilities() -> None:
    rows = pd.DataFrame({"proba_a": [0.9, 0.6, 0.2], "proba_b": [0.1, 0.4, 0.8]})
    est = performance.estimate_performance(rows)
    assert est.source == "estimated" and est.rows == 3
    assert est.accuracy == pytest.approx((0.9 + 0.6 + 0.8) / 3)
    # a: TP .9+.6, FP .1+.4, FN .2 -> F1 3/3.7; b: TP .8, FP .2, FN .1+.4
    f1_a, f1_b = 2 * 1.5 / (3.0 + 0.5 + 0.2), 2 * 0.8 / (1.6 + 0.2 + 0.5)
    assert est.f1_macro == pytest.approx((f1_a + f1_b) / 2)


def _logged(day: str, request: str, prediction: str | None) -> dict:
    return {
        "logged_at": pd.Timestamp(day, tz="UTC"),
        "request_id": request,
        "prediction": prediction,
    }


def test_live_performance_per_day_joins_a_requests_rows_in_order() -> None:
    current = pd.DataFrame(
        [
            _logged("2025-01-01 10:00", "r1", "a"),
            _logged("2025-01-01 10:00", "r1", "b"),  # second row of r1: its second label
            _logged("2025-01-02 09:00", "r2", "a"),
            _logged("2025-01-02 09:00", "r3", "b"),  # no label: left out
            _logged("2025-01-02 09:00", "r4", None),  # rejected: left out
        ]
    )
    labels = pd.DataFrame({"request_id": ["r1", "r1", "r2", "r4"], "label": ["a", "a", "a", "a"]})
    live = performance.live_performance(current, labels)
    assert live.source == "labels" and live.rows == 3
    assert live.accuracy == pytest.approx(2 / 3)
    assert [(d["day"], d["rows"], d["accuracy"]) for d in live.by_day] == [
        ("2025-01-01", 2, 0.5),
        ("2025-01-02", 1, 1.0),
    ]


def test_labels_from_a_folder_none_when_absent_and_a_clear_error_when_malformed(
    tmp_path: Path,
) -> None:
    assert performance.read_labels(tmp_path / "missing") is None
    folder = tmp_path / "labels"
    folder.mkdir()
    assert performance.read_labels(folder) is None  # nothing arrived yet
    pd.DataFrame({"request_id": ["r1"], "label": [1]}).to_parquet(folder / "a.parquet")
    (folder / "b.csv").write_text("request_id,label\nr2,0\n")
    got = performance.read_labels(folder)
    assert got.to_dict("list") == {"request_id": ["r1", "r2"], "label": ["1", "0"]}
    bad = tmp_path / "bad.csv"
    bad.write_text("id,truth\nr1,1\n")
    with pytest.raises(performance.LabelsError, match=r"bad.csv: no column\(s\) \['request_id'"):
        performance.read_labels(bad)


# --- quality -------------------------------------------------------------------------------------

CONTRACT = {
    "version": 1,
    "columns": [
        {"name": "x", "kind": "float", "nullable": False, "min": 0, "max": 10, "used": True},
        {"name": "color", "kind": "category", "nullable": True, "values": ["red", "blue"]},
        {"name": "id", "kind": "int", "used": False},
    ],
}


def test_quality_counts_rows_breaking_the_contract_names_unseen_categories_and_null_shares():
    current = pd.DataFrame(
        {
            "x": [1.0, 11.0, None, 2.0, 3.0],
            "color": ["red", "green", "blue", None, "red"],
            "id": [1, 2, 3, 4, -5],  # unused: never checked
            "row_violations": [None, None, None, None, "x:between"],  # marked by the service
        }
    )
    reference = pd.DataFrame({"x": [1.0, 2.0], "color": ["red", "blue"]})
    result = quality.check_quality(current, reference, CONTRACT, ["x", "color"])
    assert result.bad_rows == 3 and result.bad_row_share == pytest.approx(0.6)
    assert result.violations == {"x": {"between": 1, "not_null": 1}, "color": {"in_set": 1}}
    assert result.unseen == {"color": ["green"]}
    assert result.null_share == {"x": 0.2, "color": 0.2}
    assert result.reference_null_share == {"x": 0.0, "color": 0.0}
    assert "color: in_set x1 (unseen 'green')" in result.describe()


def test_a_model_without_a_shipped_contract_counts_only_the_services_marks() -> None:
    derived = {**CONTRACT, "derived_from": "signature"}
    current = pd.DataFrame({"x": [99.0, 1.0], "row_violations": [None, "*:all_null"]})
    result = quality.check_quality(current, current, derived, ["x"])
    assert not result.contract_checked and result.bad_rows == 1


# --- the log window ------------------------------------------------------------------------------


def _part(log: Path, stamp: dt.datetime, version: str, n: int) -> str:
    name = f"part-{stamp.strftime('%Y%m%dT%H%M%S%f')}-v{version}-abcd1234.parquet"
    pd.DataFrame(
        {
            "logged_at": [pd.Timestamp(stamp) - pd.Timedelta(seconds=1)] * n,
            "request_id": [f"{name}-{i}" for i in range(n)],
            "model_name": ["clf"] * n,
            "model_version": [version] * n,
        }
    ).to_parquet(log / name)
    return name


def test_the_window_reads_files_flushed_since_the_watermark_once(tmp_path: Path) -> None:
    t0 = dt.datetime(2025, 1, 1, 12, tzinfo=dt.UTC)
    first = _part(tmp_path, t0, "1", 3)
    _part(tmp_path, t0 + dt.timedelta(seconds=1), "2", 2)
    (tmp_path / ".part-tmp.parquet").write_text("being written")  # atomic temp: skipped
    whole = window.read_log(tmp_path)
    assert len(whole.rows) == 5 and whole.watermark == t0 + dt.timedelta(seconds=1)
    assert window.watched_rows(whole.rows, "clf", "1")["request_id"].str.startswith(first).all()
    # a file flushed (stamped) before the watermark but renamed in after the check: read next time
    late = _part(tmp_path, t0 + dt.timedelta(milliseconds=500), "1", 4)
    later = _part(tmp_path, t0 + dt.timedelta(minutes=5), "1", 1)
    nxt = window.read_log(tmp_path, whole.watermark, whole.seen)
    assert sorted(nxt.files) == sorted([late, later]) and len(nxt.rows) == 5
    assert window.read_log(tmp_path, nxt.watermark, nxt.seen).rows.empty
    with pytest.raises(FileNotFoundError, match="no prediction log folder"):
        window.read_log(tmp_path / "absent")


def test_a_third_check_does_not_read_again_a_file_two_checks_ago_within_grace(
    tmp_path: Path,
) -> None:
    t0 = dt.datetime(2025, 1, 1, 12, tzinfo=dt.UTC)
    a = _part(tmp_path, t0, "1", 3)
    one = window.read_log(tmp_path)
    b = _part(tmp_path, t0 + dt.timedelta(seconds=20), "1", 2)
    two = window.read_log(tmp_path, one.watermark, one.seen)
    assert two.files == [b] and a in two.seen  # A is still within GRACE of B's stamp
    c = _part(tmp_path, t0 + dt.timedelta(seconds=40), "1", 1)
    three = window.read_log(tmp_path, two.watermark, two.seen)
    assert three.files == [c] and len(three.rows) == 1


def test_the_labels_read_takes_the_last_days_of_files_whatever_the_watermark(
    tmp_path: Path,
) -> None:
    now = dt.datetime(2025, 1, 10, 12, tzinfo=dt.UTC)
    _part(tmp_path, now - dt.timedelta(days=8), "1", 5)  # older than labels_days
    kept = _part(tmp_path, now - dt.timedelta(days=6), "1", 2)
    rows = window.read_recent(tmp_path, now, 7, ["request_id", "model_version"])
    assert list(rows.columns) == ["request_id", "model_version"]
    assert len(rows) == 2 and rows["request_id"].str.startswith(kept).all()
    assert window.read_recent(tmp_path, now, 1, ["request_id"]).empty


def test_labels_written_after_their_rows_check_still_give_live_accuracy(tmp_path: Path) -> None:
    from monitoring import late_labels

    now = dt.datetime(2025, 1, 10, 12, tzinfo=dt.UTC)
    checked = _part(tmp_path, now - dt.timedelta(days=2), "1", 4)  # behind the watermark now
    old = _part(tmp_path, now - dt.timedelta(days=9), "1", 4)  # beyond labels_days
    frames = {name: pd.read_parquet(tmp_path / name) for name in (checked, old)}
    for name, frame in frames.items():
        frame["prediction"] = ["a", "a", "b", "b"]
        frame["sampled"] = [True, True, True, False]  # the last: logged only for a violation
        frame.to_parquet(tmp_path / name)
    ids = [*frames[checked]["request_id"], *frames[old]["request_id"]]
    labels = pd.DataFrame({"request_id": ids, "label": ["a", "b", "b", "a"] * 2})
    live = late_labels.late_performance(tmp_path, "clf", "1", labels, now, 7)
    assert live.source == "labels" and live.rows == 3 and live.accuracy == pytest.approx(2 / 3)
    assert [d["day"] for d in live.by_day] == ["2025-01-08"]
    assert late_labels.late_performance(tmp_path, "clf", "2", labels, now, 7).accuracy is None


# --- drift (Evidently, a real table) -------------------------------------------------------------

KINDS = {
    "island": "cat",
    "bill_length_mm": "num",
    "bill_depth_mm": "num",
    "flipper_length_mm": "num",
    "body_mass_g": "num",
    "sex": "cat",
}


def test_evidently_finds_the_shifted_columns_only_and_its_html_loads_nothing(
    penguins: pd.DataFrame,
) -> None:
    ref = reference.as_kinds(penguins.sample(200, random_state=1), KINDS)
    same = reference.as_kinds(penguins.sample(200, random_state=2), KINDS)
    assert drift.detect_drift(ref, same, KINDS, 0.3).drifted == []
    shifted = same.assign(
        bill_length_mm=same["bill_length_mm"] * 1.3, body_mass_g=same["body_mass_g"] + 800
    )
    result = drift.detect_drift(ref, shifted, KINDS, 0.3)
    assert result.drifted == ["bill_length_mm", "body_mass_g"]
    assert result.share == pytest.approx(2 / 6)
    [bill] = [c for c in result.columns if c.column == "bill_length_mm"]
    assert bill.test == "K-S p_value" and bill.score < bill.threshold == 0.05  # <=1000 rows: K-S
    assert "bill_length_mm (K-S p_value" in bill.describe()
    html = result.html()
    assert re.findall(r"""<(?:script|link|img)[^>]+(?:src|href)=["']https?://""", html) == []
    assert json.loads(json.dumps(result.to_dict()))["drifted"] == result.drifted


# --- the decision ---------------------------------------------------------------------------


def test_each_threshold_crossed_gives_one_sentence_naming_its_numbers() -> None:
    thresholds = check.Thresholds(0.3, 0.2, 10, 0.05, 0.05)
    columns = [
        drift.ColumnDrift("a", "K-S p_value", 0.001, 0.05, True),
        drift.ColumnDrift("b", "K-S p_value", 0.5, 0.05, False),
    ]
    drifted = drift.DriftResult(columns, 0.5, snapshot=None)
    calm = psi.PsiResult({"proba_x": 0.05})
    clean = quality.QualityResult(100, 0, {}, {}, {})
    labelled = performance.Performance("labels", 100, 0.80, 0.78)
    reasons = check.decide(drifted, calm, clean, labelled, 0.95, thresholds)
    assert reasons[0].startswith("feature drift: 1 of 2 columns drifted (50%, threshold 30%): a")
    assert reasons[1] == (
        "performance: live accuracy 0.800 on 100 rows is 0.150 below 0.950 (test accuracy; "
        "threshold 0.05)"
    )
    quiet = drift.DriftResult(columns[1:], 0.0, snapshot=None)
    assert check.decide(quiet, calm, clean, labelled, None, thresholds) == []  # no baseline


def test_late_labels_replace_the_estimate_and_decide_again() -> None:
    from monitoring import late_labels

    thresholds = check.Thresholds(0.3, 0.2, 10, 0.05, 0.05)
    quiet = drift.DriftResult([drift.ColumnDrift("b", "K-S p_value", 0.5, 0.05, False)], 0.0, None)
    estimate = performance.Performance("estimated", 100, 0.97, 0.96)
    result = check.CheckResult(
        quiet, psi.PsiResult({"proba_x": 0.05}), quality.QualityResult(100, 0, {}, {}, {}),
        estimate, 0.98, "ok", [],
    )  # fmt: skip
    baselines = check.Baselines(test_accuracy=0.95, estimated_accuracy=0.98)
    live = performance.Performance("labels", 40, 0.80, 0.78)
    again = late_labels.with_performance(result, live, baselines, thresholds)
    assert again.decision == "retrain" and again.accuracy_baseline == 0.95
    assert again.performance is live and again.reasons[0].startswith("performance: live accuracy")
    none = performance.Performance("labels", 0, None, None)
    assert late_labels.with_performance(result, none, baselines, thresholds) is result


# --- the reference --------------------------------------------------------------------------


def test_the_reference_is_the_versions_data_from_the_workspace_or_the_dvc_cache(
    tmp_path: Path,
) -> None:
    # a separate process, as the other tests run DVC: in-process, DVC's logger keeps the stream
    # of the first test that set it up, which pytest has closed by now
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    features = tmp_path / "data" / "features"
    features.mkdir(parents=True)
    (features / "train.parquet").write_text("today's")
    lock = {"stages": {"features": {"outs": [{"path": "data/features", "md5": "aa11.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    here = reference.locate_reference(tmp_path, {reference.FEATURES_TAG: "aa11.dir"})
    assert here.champion_data and here.train == features / "train.parquet"

    cache = tmp_path / ".dvc" / "cache" / "files" / "md5"
    (cache / "bb").mkdir(parents=True)
    (cache / "cc").mkdir(parents=True)
    (cache / "cc" / "0000").write_text("the champion's")
    (cache / "bb" / "22.dir").write_text(
        json.dumps([{"md5": "cc0000", "relpath": "train.parquet"}])
    )
    old = reference.locate_reference(tmp_path, {reference.FEATURES_TAG: "bb22.dir"})
    assert old.champion_data and old.train.read_text() == "the champion's" and old.test is None

    gone = reference.locate_reference(tmp_path, {reference.FEATURES_TAG: "dd33.dir"})
    assert not gone.champion_data and gone.train == features / "train.parquet"
    assert "NOT known to be the version's" in gone.note and "dd33.dir" in gone.note
    assert "no data lineage tag" in reference.locate_reference(tmp_path, {}).note


def test_feature_kinds_from_the_contract_leave_unused_columns_and_dates_out() -> None:
    contract = {"columns": [*CONTRACT["columns"], {"name": "when", "kind": "datetime"}]}
    assert reference.feature_kinds(contract, []) == {"x": "num", "color": "cat"}
    assert reference.feature_kinds(None, [("n", "int"), ("s", "str"), ("b", "bool")]) == {
        "n": "num",
        "s": "cat",
        "b": "cat",
    }
