"""The scheduled deployment: the cron of params.yaml, served against a real Prefect API.

The end-to-end test runs the documented command, ``python -m flows.schedule``, with no Prefect
API configured, so it also starts (and on Ctrl-C stops) its own ``prefect server start``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from pydantic import ValidationError

from flows.events import RETRAIN_EVENT
from flows.schedule import (
    build_schedule,
    deployment_name,
    monitor_deployment,
    monitor_deployment_name,
    pipeline_deployment,
)
from flows.schedule import main as schedule_main
from stages.common.config import ScheduleParams, load_params
from stages.common.runlock import DEFAULT_WAIT_S
from tests.conftest import ROOT, make_pipeline_repo

WAIT_TIMEOUT_S = 120  # generous: the command starts a Prefect server first (2-core machine)
SCHEDULER_TIMEOUT_S = 60  # the scheduler looks at new deployments every 5 s
RUN_TIMEOUT_S = 300


def test_schedule_is_the_cron_of_params() -> None:
    params = load_params(ROOT / "params.yaml").schedule
    schedule = build_schedule(params)
    assert (schedule.cron, schedule.timezone) == (params.cron, params.timezone)
    assert deployment_name(params) == f"pipeline/{params.deployment}"


def test_the_pipeline_runs_on_its_cron_and_the_monitors_event_the_monitor_on_its_cron(
    tmp_path: Path,
) -> None:
    params = load_params(ROOT / "params.yaml")
    pipeline = pipeline_deployment(tmp_path, params)
    [trigger] = pipeline.triggers
    assert trigger.expect == {RETRAIN_EVENT}
    assert trigger.match.get("prefect.resource.id") == [
        f"pipeline.model.{params.register.model_name}"
    ]
    assert trigger.parameters == {"reason": "{{ event.payload.reason }}"}
    [cron] = pipeline.schedules
    assert cron.schedule.cron == params.schedule.cron

    monitor = monitor_deployment(tmp_path, params)
    assert f"{monitor.flow_name}/{monitor.name}" == monitor_deployment_name(params.schedule)
    assert monitor.parameters == {"repo": str(tmp_path)}
    [cron] = monitor.schedules
    assert (cron.schedule.cron, cron.schedule.timezone) == (
        params.monitor.cron,
        params.schedule.timezone,
    )
    assert not monitor.triggers


@pytest.mark.parametrize(("field", "value"), [("cron", "0 6 * *"), ("timezone", "Mars/Base")])
def test_bad_cron_or_timezone_fails_before_any_server_starts(
    tmp_path: Path, field: str, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"schedule": {field: value}}))
    with pytest.raises(ValidationError, match=field):  # checked when params load
        ScheduleParams(**{field: value})
    assert schedule_main(["--repo", str(tmp_path)]) == 1  # returns before _connect_api
    assert f"schedule.{field}: " in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(
    what: str, probe, server: subprocess.Popen, logs: list[Path], timeout_s: float = WAIT_TIMEOUT_S
):
    """Poll ``probe()`` until it returns something truthy; fail if the command exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"flows.schedule exited early:\n{_tails(logs)}"
        if found := probe():
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} did not appear in {timeout_s} s:\n{_tails(logs)}")


def _tails(logs: list[Path], chars: int = 4000) -> str:
    return "\n".join(
        f"--- {log.name}:\n{log.read_text(errors='replace')[-chars:]}"
        for log in logs
        if log.exists()
    )


def _stop(server: subprocess.Popen) -> None:
    # Ctrl-C, as a user would: serve pauses the schedule, the command stops its Prefect server.
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _ingest_only_repo(dest: Path) -> Path:
    # Only the ingest stage: the triggered run goes through the real flow, a real stage and
    # dvc push, without paying for training (tests/flows/test_pipeline.py runs the full graph).
    repo = make_pipeline_repo(dest)
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    spec["stages"] = {"ingest": spec["stages"]["ingest"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(spec))
    return repo


def _start_schedule_command(repo: Path, port: int, home: Path, log: Path) -> subprocess.Popen:
    """``python -m flows.schedule``, run in the checkout as documented, with no Prefect API set."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    env.pop("PREFECT_API_URL", None)  # so the command starts (and stops) its own server
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.schedule", "--port", str(port)],
            cwd=repo,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_schedule_command_serves_the_cron_deployment_and_runs_it(
    tmp_path: Path, mlflow_uri: str
) -> None:
    """The deployments are served with their crons, and the monitor's retraining event (sent
    as ``flows/monitor.py`` sends it: from its own process) makes the served pipeline run, with
    the event's reason, through the server's trigger."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.remote import read_summary

    repo = _ingest_only_repo(tmp_path / "repo")
    all_params = load_params(repo / "params.yaml")
    params = all_params.schedule
    name, port = deployment_name(params), _free_port()
    logs = [tmp_path / "schedule.log", tmp_path / "prefect-home" / "server.log"]
    server = _start_schedule_command(repo, port, tmp_path / "prefect-home", logs[0])
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}),
            get_client(sync_client=True) as client,
        ):
            deployment = _wait_for(
                "the deployment", lambda: _read_deployment(client, name), server, logs
            )
            [schedule] = deployment.schedules
            assert schedule.active
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (
                params.cron,
                params.timezone,
            )
            assert deployment.parameters == {"repo": str(repo), "wait_s": DEFAULT_WAIT_S}
            # The server's scheduler (off in Prefect's temporary servers) books the next runs.
            upcoming = _wait_for(
                "a scheduled run",
                lambda: client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                ),
                server,
                logs,
                SCHEDULER_TIMEOUT_S,
            )
            assert all(run.state.is_scheduled() for run in upcoming)
            assert min(run.expected_start_time for run in upcoming) == _next_cron_time(params)
            monitor = _read_deployment(client, monitor_deployment_name(params))
            [monitor_cron] = monitor.schedules
            assert monitor_cron.schedule.cron == all_params.monitor.cron

            reason = "PSI 0.42 of the predicted probabilities > 0.2 (test)"
            _emit_retrain(port, all_params.register.model_name, reason)
            [flow_run] = _wait_for(
                "the run the retrain event triggered",
                lambda: [
                    run
                    for run in client.read_flow_runs(
                        deployment_filter=DeploymentFilter(
                            id=DeploymentFilterId(any_=[deployment.id])
                        )
                    )
                    if run.parameters.get("reason") == reason
                ],
                server,
                logs,
            )
            flow_run = _wait_for(
                "the triggered run's end",
                lambda: (run := client.read_flow_run(flow_run.id)).state.is_final() and run,
                server,
                logs,
                RUN_TIMEOUT_S,
            )

            assert flow_run.state.is_completed(), f"{flow_run.state}\n{_tails(logs)}"
            assert f"Triggered by: {reason}" in read_summary(client, flow_run.id)
        assert (repo / "data/raw/manifest.json").is_file()
        assert any(p.is_file() for p in (repo / ".dvcstore").rglob("*"))
    finally:
        _stop(server)
    assert server.returncode == 0, _tails(logs)
    assert not _api_answers(port), "the Prefect server the command started is still running"


def _emit_retrain(port: int, model_name: str, reason: str) -> None:
    # From another process, as the monitor does: its events client drains when it exits.
    code = "import sys; from flows.events import emit_retrain; emit_retrain(*sys.argv[1:], {})"
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    subprocess.run(
        [sys.executable, "-c", code, model_name, reason], cwd=ROOT, env=env, check=True, timeout=60
    )


def _read_deployment(client, name: str):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(name)
    except (ObjectNotFound, httpx.TransportError):  # not served yet / server not up yet
        return None


def _next_cron_time(params: ScheduleParams):
    from prefect.server.schemas.schedules import CronSchedule

    [first] = asyncio.run(CronSchedule(cron=params.cron, timezone=params.timezone).get_dates(n=1))
    return first


def _api_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


STUCK_SHUTDOWN = """
import signal, time
from flows import schedule

schedule.SHUTDOWN_GRACE_S = 1
signal.signal(signal.SIGINT, schedule._interrupt_on_sigint)
print("serving", flush=True)
try:
    try:
        time.sleep(60)
    except KeyboardInterrupt:  # serve received Ctrl-C...
        print("shutting down", flush=True)
        time.sleep(60)  # ...and its shutdown hangs, as it once did in CI
except KeyboardInterrupt:
    print("interrupted again", flush=True)
"""


def test_a_stuck_shutdown_after_ctrl_c_is_interrupted_again() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_SHUTDOWN],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout.readline().strip() == "serving"
    proc.send_signal(signal.SIGINT)  # one Ctrl-C, as the user gives

    out, _ = proc.communicate(timeout=30)

    assert proc.returncode == 0
    assert out.splitlines()[0] == "shutting down"
    assert "interrupting it again" in out and out.splitlines()[-1] == "interrupted again"
