"""The pipeline on the server stack: deployed to its work pool, run by its workers.

    python -m flows.remote deploy [--repo .]      # `make up` runs it after `python -m stack up`
    python -m flows.remote run [--repo .] [--timeout S] [--detach]   # `make run REMOTE=1`

``deploy`` registers the ``pipeline`` flow of this checkout (``flows/pipeline_flow.py``) as the
deployment ``pipeline/<schedule.deployment>`` on the stack's process work pool ``WORK_POOL``:
its code is this folder (a ``set_working_directory`` pull step: the workers run on this machine,
in this checkout), its cron is ``params.yaml`` ``schedule``, its parameters push the data to the
DVC remote ``stack`` (the bucket), and a deployment concurrency limit of
``PIPELINE_CONCURRENCY`` (1) with the ENQUEUE strategy lets one run work in this checkout at a
time: a second one waits, shown as ``AwaitingConcurrencySlot`` in the UI (the workspace's run
lock is the second line of defence, for a local ``make run``). It carries the monitor's
retraining trigger (``flows.events.retrain_trigger``): the stack's Prefect server (its triggers
and actions services) starts a run, with the monitor's ``reason``, on each retraining event for
``register.model_name``. Beside it, ``monitor/<schedule.deployment>`` runs the ``monitor`` flow
(``flows/monitor.py``) on the same pool on the cron ``monitor.cron``, one at a time (a check
still running when the next is due: the next is cancelled). Running it again updates both
deployments in place.

``run`` checks the stack answers (Prefect API, MLflow server, a worker online in the pool),
creates a flow run of the deployment, follows it (state changes and the flow run's logs) until
it ends, and prints its ``pipeline-summary`` artifact. Exit code 0 only when it Completed.

Ctrl-C cancels the flow run (the worker stops its process), as Ctrl-C stops an embedded
``make run``; the command waits a few seconds for Cancelled and exits 130. ``--detach``
submits and returns at once, leaving the run to the stack (the UI link is printed).

Settings (URLs, pool, limits) come from ``stack/stack.env`` through ``stack.settings``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stack.settings import DVC_REMOTE, StackError, StackSettings, load_settings
from stages.common.config import load_params
from stages.common.errors import ConfigError
from stages.common.runlock import DEFAULT_WAIT_S

ENTRYPOINT = "flows/pipeline_flow.py:pipeline"
FLOW_NAME = "pipeline"  # the @flow name in flows/pipeline_flow.py
MONITOR_ENTRYPOINT = "flows/monitor.py:monitor"
MONITOR_FLOW = "monitor"  # the @flow name in flows/monitor.py
MONITOR_CONCURRENCY = 1  # two checks at once would read the same window and race on its watermark
SUMMARY_KEY = "pipeline-summary"  # flows.pipeline.SUMMARY_KEY (not imported: no yaml/DVC here)
POLL_S = 2.0
CANCEL_WAIT_S = 30
HEALTH_TIMEOUT_S = 3


class RemoteError(Exception):
    """The stack cannot take the run; the message names the service, its URL and the fix."""


# --- checks -------------------------------------------------------------------------------


def _answers(url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            return answer.status == 200
    except OSError:
        return False


def check_stack(settings: StackSettings) -> None:
    """Refuse when the Prefect API or the MLflow server does not answer its health check.

    Raises:
        RemoteError: names each service down, the URL asked, and ``make up``.
    """
    down = [
        f"{name} at {url}"
        for name, url in (
            ("the Prefect API", f"{settings.prefect_api_url}/health"),
            ("the MLflow server", f"{settings.mlflow_url}/health"),
        )
        if not _answers(url)
    ]
    if down:
        raise RemoteError(
            "the stack does not answer: "
            + "; ".join(down)
            + " (no answer to its health check). Start it with `make up` (python -m stack up); "
            "`make stack-status` shows which services run and their logs"
        )


def deployment_name(repo: Path) -> str:
    """``pipeline/<schedule.deployment>`` of ``repo/params.yaml``."""
    return f"{FLOW_NAME}/{load_params(repo / 'params.yaml').schedule.deployment}"


# --- deploy -------------------------------------------------------------------------------


def monitor_deployment_name(repo: Path) -> str:
    """``monitor/<schedule.deployment>`` of ``repo/params.yaml``."""
    return f"{MONITOR_FLOW}/{load_params(repo / 'params.yaml').schedule.deployment}"


def deploy(repo: Path, settings: StackSettings) -> str:
    """Create or update the pipeline's deployment (with the monitor's retraining trigger) and
    the monitor's on the stack's work pool; return the pipeline deployment's id."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.exceptions import ObjectNotFound

    from flows.events import retrain_trigger
    from flows.schedule import build_schedule

    params = load_params(repo / "params.yaml")
    schedule = params.schedule
    flow = Flow.from_source(source=str(repo), entrypoint=ENTRYPOINT)
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(settings.work_pool)
        except ObjectNotFound:
            raise RemoteError(
                f"no work pool {settings.work_pool!r} (WORK_POOL) on the Prefect server "
                f"{settings.prefect_api_url}: `make up` creates it"
            ) from None
    deployment_id = flow.deploy(
        name=schedule.deployment,
        work_pool_name=settings.work_pool,
        schedules=[build_schedule(schedule)],
        triggers=[retrain_trigger(params.register.model_name)],
        # A due run waits (bounded) for a local `make run` holding the workspace's run lock.
        parameters={"repo": str(repo), "dvc_remote": DVC_REMOTE, "wait_s": DEFAULT_WAIT_S},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=settings.pipeline_concurrency,
            collision_strategy=ConcurrencyLimitStrategy.ENQUEUE,
        ),
        description=f"The whole pipeline in {repo} on the stack's work pool "
        f"{settings.work_pool!r}: cron {schedule.cron!r} ({schedule.timezone}), data pushed "
        f"to the DVC remote {DVC_REMOTE!r}, {settings.pipeline_concurrency} run(s) at a time; "
        f"and whenever the monitor asks to retrain {params.register.model_name!r} (the run's "
        "reason parameter says why).",
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,  # "a process pool: consider .serve": the stack's workers run it
    )
    deploy_monitor(repo, settings)
    return str(deployment_id)


def deploy_monitor(repo: Path, settings: StackSettings) -> str:
    """Create or update the monitor's deployment on the stack's work pool; return its id."""
    from prefect import Flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    params = load_params(repo / "params.yaml")
    cron = Cron(params.monitor.cron, timezone=params.schedule.timezone)
    flow = Flow.from_source(source=str(repo), entrypoint=MONITOR_ENTRYPOINT)
    deployment_id = flow.deploy(
        name=params.schedule.deployment,
        work_pool_name=settings.work_pool,
        schedules=[cron],
        parameters={"repo": str(repo)},
        concurrency_limit=ConcurrencyLimitConfig(
            limit=MONITOR_CONCURRENCY,
            collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW,
        ),
        description=f"The monitor of {params.register.model_name!r} in {repo} on the stack's "
        f"work pool {settings.work_pool!r}: cron {params.monitor.cron!r} "
        f"({params.schedule.timezone}); a crossed threshold starts the pipeline (its trigger).",
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(deployment_id)


# --- run ----------------------------------------------------------------------------------


def check_pool(client: Any, settings: StackSettings, name: str) -> None:
    """Refuse when the deployment is missing or no worker of the pool is online.

    Raises:
        RemoteError: names the deployment or the pool, and the fix.
    """
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise RemoteError(
            f"no deployment {name!r} on the Prefect server {settings.prefect_api_url}: deploy "
            "it with `make up` (or python -m flows.remote deploy --repo .)"
        ) from None
    try:
        workers = client.read_workers_for_work_pool(settings.work_pool)
    except ObjectNotFound:
        workers = []
    if not any(worker.status == WorkerStatus.ONLINE for worker in workers):
        raise RemoteError(
            f"no worker online in the work pool {settings.work_pool!r} (WORK_POOL) of "
            f"{settings.prefect_api_url}: the run would wait forever. `make up` starts "
            f"WORKERS={settings.workers} worker(s); `make stack-status` shows them"
        )


def flow_run_url(settings: StackSettings, flow_run_id: Any) -> str:
    """The flow run's page in the Prefect UI."""
    return f"{settings.prefect_api_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"


def read_summary(client: Any, flow_run_id: Any) -> str | None:
    """The markdown of the flow run's ``pipeline-summary`` artifact (None if it has none)."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[SUMMARY_KEY]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
        )
    )
    return str(artifacts[0].data) if artifacts else None


class _LogTail:
    """Prints the flow run's logs (flow and task runs) once, in order, as they arrive."""

    def __init__(self, client: Any, flow_run_id: Any, out: Callable[[str], None]) -> None:
        self.client, self.flow_run_id, self.out = client, flow_run_id, out
        self.seen: set[Any] = set()
        self.after: Any = None

    def poll(self) -> None:
        from prefect.client.schemas.filters import (
            LogFilter,
            LogFilterFlowRunId,
            LogFilterTimestamp,
        )

        log_filter = LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]),
            timestamp=LogFilterTimestamp(after_=self.after) if self.after else None,
        )
        try:
            logs = self.client.read_logs(log_filter=log_filter, limit=200)
        except Exception:  # the log is a convenience: the state is what counts
            return
        for log in logs:
            if log.id in self.seen:
                continue
            self.seen.add(log.id)
            self.after = log.timestamp
            self.out(f"  | {log.timestamp:%H:%M:%S} {log.message}")


def follow(
    client: Any,
    flow_run_id: Any,
    settings: StackSettings,
    timeout_s: float = 0,
    out: Callable[[str], None] = print,
) -> Any:
    """Poll the flow run until it is in a final state; print state changes and its logs.

    Returns:
        The final state; None when ``timeout_s`` (> 0) passed first.
    """
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    tail, last = _LogTail(client, flow_run_id, out), None
    while True:
        flow_run = client.read_flow_run(flow_run_id)
        state = flow_run.state
        tail.poll()
        if state is not None and (state.name, state.message) != last:
            last = (state.name, state.message)
            where = f" ({state.message})" if state.message else ""
            out(f"{time.strftime('%H:%M:%S')} flow run {flow_run.name}: {state.name}{where}")
        if state is not None and state.is_final():
            tail.poll()
            return state
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def cancel(client: Any, flow_run_id: Any, out: Callable[[str], None] = print) -> Any:
    """Ask the stack to cancel the flow run (its worker stops the process); wait a little."""
    from prefect.states import Cancelling

    client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by Ctrl-C"), force=True)
    deadline = time.monotonic() + CANCEL_WAIT_S
    state = client.read_flow_run(flow_run_id).state
    while not state.is_final() and time.monotonic() < deadline:
        time.sleep(1)
        state = client.read_flow_run(flow_run_id).state
    out(f"flow run {flow_run_id}: {state.name}")
    return state


def run(
    repo: Path,
    settings: StackSettings,
    timeout_s: float = 0,
    detach: bool = False,
    out: Callable[[str], None] = print,
) -> int:
    """Submit a run of the deployment, follow it, print its summary; the exit code."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    name = deployment_name(repo)
    with get_client(sync_client=True) as client:
        check_pool(client, settings, name)
        flow_run = run_deployment(name, timeout=0)
        url = flow_run_url(settings, flow_run.id)
        out(f"submitted {name} to the work pool {settings.work_pool!r}: flow run {flow_run.name}")
        out(f"  Prefect UI: {url}")
        if detach:
            return 0
        try:
            state = follow(client, flow_run.id, settings, timeout_s, out)
        except KeyboardInterrupt:
            out(f"\nCtrl-C: cancelling flow run {flow_run.name} ({url})")
            cancel(client, flow_run.id, out)
            return 130
        if state is None:
            out(f"\nstill running after {timeout_s:.0f} s (--timeout); it goes on: {url}")
            return 1
        summary = read_summary(client, flow_run.id)
    if summary:
        out("\n" + summary)
    out(f"\nPrefect UI: {url}\nMLflow UI:  {settings.mlflow_url}")
    if state.is_completed():
        out(f"Pipeline completed on the stack (flow run {flow_run.name}).")
        return 0
    out(f"Pipeline {state.name} on the stack: {state.message or 'no message'}")
    return 1


# --- command ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.remote",
        description="The pipeline on the server stack (`make up`): deploy it to the stack's "
        "work pool, or run it there and wait for the result.",
        epilog="make up deploys; make run REMOTE=1 runs. Settings: stack/stack.env.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("command", choices=["deploy", "run"])
    parser.add_argument("--repo", default=".", help="project checkout (dvc.yaml, params.yaml)")
    parser.add_argument(
        "--timeout", type=float, default=0, help="run: stop waiting after S seconds (0: never)"
    )
    parser.add_argument(
        "--detach", action="store_true", help="run: submit, print the UI link, do not wait"
    )
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    try:
        settings = load_settings(repo)
        deployment_name(repo)  # a bad params.yaml fails here, before the stack is asked
        check_stack(settings)
    except (StackError, ConfigError, RemoteError) as exc:
        print(f"flows.remote {args.command}: {exc}", file=sys.stderr)
        return 1
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Ctrl-C (or SIGINT) cancels the flow run, also when a launcher left SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # This checkout's stack, whatever PREFECT_API_URL the shell or a profile names.
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        try:
            if args.command == "deploy":
                deployment_id = deploy(repo, settings)
                print(
                    f"deployed {deployment_name(repo)} ({deployment_id}, started also by the "
                    f"monitor's retraining event) and {monitor_deployment_name(repo)} to the "
                    f"work pool {settings.work_pool!r} at {settings.prefect_api_url}"
                )
                return 0
            return run(repo, settings, args.timeout, args.detach)
        except RemoteError as exc:
            print(f"flows.remote {args.command}: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    raise SystemExit(main())
