"""The flow's pre-flight check of the MLflow tracking store: a dead server stops it before ingest.

Real sockets on 127.0.0.1 (a closed port, a server that never answers, one that answers), a real
read-only mount (root) or folder, and real runs of ``python -m flows.pipeline`` / the flow.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.common.config import MlflowParams
from stages.common.errors import PipelineError
from stages.common.tracking import check_tracking_store
from tests.conftest import ROOT
from tests.test_faults import read_only

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def answering_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server answering /health with 200 (else 404); yields its URL and the paths asked."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def _params(uri: str, timeout_s: int = 30) -> MlflowParams:
    return MlflowParams(tracking_uri=uri, request_timeout_s=timeout_s)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_a_closed_port_is_refused_at_once_naming_the_uri_and_the_fix() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(PipelineError) as caught:
        check_tracking_store(_params(uri))
    message = str(caught.value)
    assert f"the MLflow tracking server {uri} is unreachable" in message
    assert "MLFLOW_TRACKING_URI" in message and "\n" not in message


def test_a_server_that_never_answers_is_given_request_timeout_s(silent_server: str) -> None:
    started = time.monotonic()
    with pytest.raises(PipelineError, match="is unreachable .*timed out"):
        check_tracking_store(_params(silent_server, timeout_s=1))
    assert time.monotonic() - started < 10


def test_a_server_that_answers_passes_with_one_request(answering_server) -> None:
    url, asked = answering_server
    check_tracking_store(_params(url))
    check_tracking_store(_params(url + "/prefix"))  # a 404 still means it is up
    assert asked == ["/health", "/prefix/health"]


def test_an_unwritable_sqlite_store_is_refused_and_a_writable_one_passes(tmp_path: Path) -> None:
    store = tmp_path / "mlflow"
    store.mkdir()
    check_tracking_store(_params("sqlite:///mlflow/new/mlflow.db"), repo=tmp_path)
    with read_only(store):
        with pytest.raises(PipelineError, match=f"{store}.* read-only|{store}.*denied"):
            check_tracking_store(_params(f"sqlite:///{store}/mlflow.db"))
        with pytest.raises(PipelineError, match="mlflow/mlflow.db cannot be written"):
            check_tracking_store(_params("sqlite:///mlflow/mlflow.db"), repo=tmp_path)
    assert list(store.iterdir()) == []  # the probe left nothing


def test_the_check_leaves_a_store_this_process_holds_open_current(tmp_path: Path) -> None:
    # The flow process keeps MLflow's engine (the page's and the monitor's clients) from one run
    # to the next. A plain open()/close() of the database in the next run's check dropped this
    # process's SQLite locks; a stage process then checkpointed and reset the WAL under that
    # engine, which went on reading stale pages (CI: "database disk image is malformed").
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = (
        "import sys; from stages.common.config import MlflowParams; "
        "from stages.common.tracking import configure_mlflow; "
        "configure_mlflow(MlflowParams(tracking_uri=sys.argv[1], experiment=sys.argv[2]))"
    )

    def a_stage_creates(experiment: str) -> None:
        subprocess.run([PY, "-c", script, uri, experiment], env=ENV, check=True)

    a_stage_creates("first")
    client = MlflowClient(tracking_uri=uri)
    assert "first" in {e.name for e in client.search_experiments()}

    check_tracking_store(_params(uri))
    a_stage_creates("second")

    assert {"first", "second"} <= {e.name for e in client.search_experiments()}


def _flow_repo(repo: Path) -> Path:
    """A DVC repo (no git) with the project's params and one stage that writes out.txt."""
    repo.mkdir(parents=True)
    subprocess.run([PY, "-m", "dvc", "init", "-q", "--no-scm"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(
        "stages:\n  ingest:\n    cmd: python -c \"open('out.txt','w')"
        ".write('x')\"\n    outs:\n      - out.txt\n"
    )
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return repo


@pytest.mark.slow
def test_make_run_with_a_dead_tracking_server_runs_no_stage(tmp_path: Path) -> None:
    repo = _flow_repo(tmp_path / "repo")
    uri = f"http://127.0.0.1:{_closed_port()}"
    run = subprocess.run(
        [PY, "-m", "flows.pipeline", "--repo", str(repo)],
        env={**ENV, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # no Prefect server, no traceback
    assert lines[0].startswith(
        f"Pipeline not started: the MLflow tracking server {uri} is unreachable"
    )
    assert not (repo / "out.txt").exists()


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_the_flow_run_by_a_deployment_checks_the_store_before_ingest(
    tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import pipeline

    repo = _flow_repo(tmp_path / "repo")
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    state = pipeline(repo=str(repo), return_state=True)  # no main(): the flow takes the lock
    assert state.is_failed()
    with pytest.raises(PipelineError, match=f"tracking server {uri} is unreachable"):
        state.result()
    assert not (repo / "out.txt").exists()


def test_make_repro_with_a_dead_tracking_server_runs_no_stage(tmp_path: Path) -> None:
    repo = _flow_repo(tmp_path / "repo")
    uri = f"http://127.0.0.1:{_closed_port()}"
    run = subprocess.run(
        [PY, "-m", "flows.repro", "--repo", str(repo), "--no-push"],
        env={**ENV, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1 and f"tracking server {uri} is unreachable" in run.stderr
    assert not (repo / "out.txt").exists()
