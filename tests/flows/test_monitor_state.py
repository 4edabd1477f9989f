"""What a monitor check leaves behind (``flows/monitor_record.py``), on a real MLflow sqlite
store and a real tracking server that is down: the check is recorded before the retraining
event is sent (a failed MLflow log sends nothing, so the next check cannot ask twice); the
cooldown; old report folders pruned; report.json always logged, drift.html on "retrain" only;
a relative sqlite store taken from the checkout."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path

import mlflow
import pytest

from flows.mlflow_store import store_uri
from flows.monitor_record import (
    DRIFT_HTML,
    EXPERIMENT,
    HELD,
    HISTORY,
    REPORT,
    REPORTS,
    commit_check,
    held_back,
    history_line,
    prune_reports,
    render,
)
from stages.common.config import MlflowParams

NOW = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)


def _line(decision: str, stamp: str = "20260301T120000Z") -> dict:
    return history_line(
        NOW.isoformat(), "3", "clf", "champion", 250,
        drift_share=0.5, drifted_columns=["a"], psi=0.3, bad_row_share=0.0,
        accuracy=0.9, accuracy_source="estimated", f1_macro=0.88, decision=decision,
        reasons=["feature drift: ..."] if decision == "retrain" else [],
        report_dir=f"{REPORTS}/{stamp}",
    )  # fmt: skip


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_failed_mlflow_log_sends_no_event_and_leaves_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    state_path = tmp_path / "data" / "monitor" / "state.json"
    sent = []
    line = _line("retrain")
    port = _closed_port()
    with pytest.raises(mlflow.exceptions.MlflowException, match=f"127.0.0.1:{port}"):
        commit_check(
            tmp_path, f"http://127.0.0.1:{port}", line, dict(line), "<html></html>",
            (state_path, {"watermark": "w2"}), lambda: sent.append(1) or True, 48,
        )  # fmt: skip
    assert sent == [] and not state_path.exists() and not (tmp_path / HISTORY).exists()
    assert (tmp_path / line["report_dir"] / REPORT).is_file()  # the next check writes its own


def test_the_check_is_recorded_before_the_event_and_the_event_after_it(
    tmp_path: Path, mlflow_uri: str
) -> None:
    state_path = tmp_path / "data" / "monitor" / "state.json"
    client = mlflow.MlflowClient(mlflow_uri)
    at_send = {}

    def emit() -> bool:  # what exists when the event goes out
        at_send["state"] = json.loads(state_path.read_text())
        at_send["runs"] = len(client.search_runs([_experiment(client)]))
        return True

    line = _line("retrain")
    experiment_env = os.environ.get("MLFLOW_EXPERIMENT_ID")  # an earlier test's may be set
    run_id = commit_check(
        tmp_path, mlflow_uri, line, dict(line), "<html>drift</html>",
        (state_path, {"watermark": "w2", "seen": [], "last_event": None}), emit, 48,
    )  # fmt: skip
    assert at_send == {"state": {"watermark": "w2", "seen": [], "last_event": None}, "runs": 1}
    state = json.loads(state_path.read_text())
    assert state["last_event"] == {"version": "3", "at": NOW.isoformat()}
    [history] = [json.loads(x) for x in (tmp_path / HISTORY).read_text().splitlines()]
    report = json.loads((tmp_path / line["report_dir"] / REPORT).read_text())
    assert history["event_emitted"] is True and report["event_emitted"] is True
    assert "sent to Prefect's events client" in render(history)
    logged = {a.path for a in client.list_artifacts(run_id, "monitor")}
    assert logged == {f"monitor/{REPORT}", f"monitor/{DRIFT_HTML}"}
    assert client.get_run(run_id).data.tags["decision"] == "retrain"
    # nothing left set in the process: no active run, the experiment as it was
    assert mlflow.active_run() is None
    assert os.environ.get("MLFLOW_EXPERIMENT_ID") == experiment_env

    ok = _line("ok", "20260301T130000Z")
    ok_run = commit_check(
        tmp_path, mlflow_uri, ok, dict(ok), "<html>fine</html>",
        (state_path, {**state, "watermark": "w3"}), None, 48,
    )  # fmt: skip
    assert {a.path for a in client.list_artifacts(ok_run, "monitor")} == {f"monitor/{REPORT}"}
    assert (tmp_path / ok["report_dir"] / DRIFT_HTML).is_file()  # kept here, pruned later
    assert json.loads(state_path.read_text())["last_event"] == state["last_event"]


def _experiment(client: mlflow.MlflowClient) -> str:
    return client.get_experiment_by_name(EXPERIMENT).experiment_id


def test_the_cooldown_holds_a_second_event_for_the_same_version_only() -> None:
    sent = {"version": "3", "at": (NOW - dt.timedelta(hours=5)).isoformat()}
    reason = held_back(sent, "3", NOW, 24)
    assert reason is not None and reason.startswith(HELD)
    assert "v3 at 2026-03-01T07:00:00+00:00" in reason and "2026-03-02T07:00:00+00:00" in reason
    assert held_back(sent, "4", NOW, 24) is None  # the retrained version: sent as usual
    assert held_back(sent, "3", NOW, 5) is None  # the cooldown is over
    assert held_back(sent, "3", NOW, 0) is None and held_back(None, "3", NOW, 24) is None
    line = _line("retrain")
    line["reasons"].append(reason)
    assert "NOT sent (the cooldown holds it)" in render(line)


def test_only_the_newest_report_folders_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / REPORTS
    stamps = [f"20260301T{h:02d}0000Z" for h in range(5)]
    for stamp in stamps:
        (folder / stamp).mkdir(parents=True)
        (folder / stamp / REPORT).write_text("{}")
    (folder / "history.jsonl").write_text("{}\n")
    (folder / "notes").mkdir()  # not a check's folder: left alone
    assert prune_reports(folder, 2) == stamps[:3]
    assert sorted(p.name for p in folder.iterdir()) == [*stamps[3:], "history.jsonl", "notes"]
    assert prune_reports(folder, 2) == []


def test_a_relative_sqlite_store_is_the_checkouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = MlflowParams(tracking_uri="sqlite:///mlflow/mlflow.db")
    assert store_uri(tmp_path, params) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    absolute = MlflowParams(tracking_uri=f"sqlite:///{tmp_path}/x.db")
    assert store_uri(Path("elsewhere"), absolute) == f"sqlite:///{tmp_path}/x.db"
