"""The Prefect side of the stack: the process work pool, the automation that marks silent flow
runs Crashed, and the process workers.

Prefect 3.8's server has no crash detection for a worker that died with its flow runs: a run
stays Running. Flow runs send heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` =
FLOW_HEARTBEAT_S, in ``client_env()``), and Prefect's documented recipe ("detect zombie flows")
is a proactive automation: after a heartbeat, expect another heartbeat or a terminal state
within CRASHED_AFTER_S, else set the run Crashed. ``python -m stack.pool`` creates both (by
name, idempotently) in a process of its own, with the client environment.
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from stack import procs
from stack.servers import base_env, prefect_home, venv_bin
from stack.settings import StackError, StackSettings, load_settings

AUTOMATION = "Crash silent flow runs"
TERMINAL = ("Completed", "Failed", "Cancelled", "Crashed")


def worker_names(settings: StackSettings) -> list[str]:
    return [f"{socket.gethostname()}-{n}" for n in range(1, settings.workers + 1)]


def client_process_env(settings: StackSettings, repo: Path, state: Path) -> dict[str, str]:
    """What a worker (and its flow runs) or the setup process gets: the caller's environment,
    the client settings, the checkout on PYTHONPATH, the venv's bin first on PATH (dvc.yaml
    commands call ``python``)."""
    env = base_env(settings, state)
    env.pop("PGPASSWORD")  # the pipeline never talks to PostgreSQL directly
    env.update(settings.client_env())
    env["PYTHONPATH"] = str(repo.resolve())
    return env


def setup(repo: Path, state: Path, timeout: float = 120) -> None:
    """Create the work pool and the crash automation, in a separate Python process."""
    settings = load_settings(repo)
    env = client_process_env(settings, repo, state)
    # This package itself must be importable there, wherever the checkout is.
    env["PYTHONPATH"] = f"{Path(__file__).resolve().parents[1]}:{env['PYTHONPATH']}"
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "stack.pool", str(repo)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode:
        raise StackError(
            f"prefect: creating work pool {settings.work_pool!r} (WORK_POOL) and the automation "
            f"failed:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
        )


def _create_pool_and_automation(settings: StackSettings) -> None:
    from datetime import timedelta

    from prefect import get_client
    from prefect.automations import Automation
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(settings.work_pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(
                WorkPoolCreate(name=settings.work_pool, type="process", base_job_template=template)
            )
    try:
        existing = Automation.read(name=AUTOMATION)
    except ValueError:
        existing = None
    if existing is not None:
        if existing.trigger.within == timedelta(seconds=settings.crashed_after_s):
            return
        existing.delete()  # CRASHED_AFTER_S changed since the last `make up`: recreate it
    Automation(
        name=AUTOMATION,
        description=(
            f"A flow run silent for {settings.crashed_after_s} s (CRASHED_AFTER_S) after a "
            "heartbeat lost its worker: mark it Crashed (stack/pool.py)"
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in TERMINAL)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=settings.crashed_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"No heartbeat for {settings.crashed_after_s} s (CRASHED_AFTER_S): its "
                    "worker or machine died"
                ),
            )
        ],
    ).create()


def _pool_workers(settings: StackSettings) -> dict[str, tuple[str, datetime | None]]:
    """Worker name -> (status, last heartbeat), as the Prefect server sees the pool."""
    request = urllib.request.Request(
        f"{settings.prefect_api_url}/work_pools/{settings.work_pool}/workers/filter",
        data=b"{}",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (our URL)
            workers = json.load(response)
    except (OSError, ValueError):
        return {}
    return {w["name"]: (w.get("status", ""), _time(w.get("last_heartbeat_time"))) for w in workers}


def _time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None


def _online_since(settings: StackSettings, name: str, since: datetime | None) -> bool:
    status, beat = _pool_workers(settings).get(name, ("", None))
    # A worker stopped a moment ago still shows ONLINE: a new one must have sent a heartbeat.
    return status == "ONLINE" and (since is None or (beat is not None and beat >= since))


def workers_up(settings: StackSettings, repo: Path, state: Path, timeout: float = 180) -> int:
    """Start the WORKERS process workers not running yet; wait until the server lists each
    online. Return how many were started now."""
    env = client_process_env(settings, repo, state)
    started = 0
    pids: dict[str, int] = {}
    since: dict[str, datetime | None] = {}
    for name in worker_names(settings):
        service = f"worker-{name}"
        pid = procs.running_pid(state, service)
        since[name] = None
        if pid is None:
            since[name] = datetime.now(UTC)
            argv = [
                str(venv_bin() / "prefect"),
                "worker",
                "start",
                "--pool",
                settings.work_pool,
                "--type",
                "process",
                "--name",
                name,
            ]
            markers = ["prefect", "worker", name]
            pid = procs.start_detached(
                service, argv, state=state, env=env, cwd=repo.resolve(), markers=markers
            )
            started += 1
        pids[name] = pid
    for name, pid in pids.items():
        procs.wait_until(
            lambda name=name: _online_since(settings, name, since[name]),
            service=f"worker-{name}",
            state=state,
            timeout=timeout,
            pid=pid,
            what=f"online in work pool {settings.work_pool}",
        )
    return started


def worker_services(state: Path) -> list[str]:
    """The worker services with a pid file (also those of an earlier WORKERS value)."""
    return sorted(p.stem for p in (state / "run").glob("worker-*.pid"))


if __name__ == "__main__":
    prefect_home(load_settings(sys.argv[1]).state_dir(Path(sys.argv[1]))).mkdir(exist_ok=True)
    _create_pool_and_automation(load_settings(sys.argv[1]))
