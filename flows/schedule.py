"""The pipeline on a schedule, the monitor on its own, and retraining when the monitor asks.

Start it with one command from the project root (``make schedule`` runs it)::

    python -m flows.schedule [--repo .] [--port 4200]

It serves two deployments and runs each due run in this process, one at a time, until Ctrl-C
(which pauses their schedules):

- ``pipeline/<schedule.deployment>``: the ``pipeline`` flow on the cron ``schedule.cron`` read
  in ``schedule.timezone`` (daily at 06:00 UTC by default), and with a trigger
  (``flows.events.retrain_trigger``): each retraining event the monitor emits for
  ``register.model_name`` starts a run whose ``reason`` parameter is the monitor's reason.
- ``monitor/<schedule.deployment>``: the ``monitor`` flow (``flows/monitor.py``) on the cron
  ``monitor.cron`` (hourly by default), in the same time zone.

One run at a time: a retraining run waits for the monitor run that asked for it, and the
monitor never reads the features while the pipeline rewrites them.

No separate ``prefect server start`` is needed. Prefect's temporary server, which plain flow runs
use, does not run the scheduler, so this command needs a persistent Prefect API: it uses
``PREFECT_API_URL`` when that is set (or a server already answering on 127.0.0.1:<port>), and
otherwise starts ``prefect server start`` on 127.0.0.1:<port> itself (UI at
http://127.0.0.1:4200, log in ``$PREFECT_HOME/server.log``) and stops it on exit.

While it runs, trigger a run now with ``prefect deployment run pipeline/daily`` (or
``monitor/daily``; with ``PREFECT_API_URL=http://127.0.0.1:4200/api`` when this command
started the server).

The trigger needs a Prefect server that evaluates automations: ``prefect server start`` runs the
``triggers`` and ``actions`` services (``PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED``,
``PREFECT_SERVER_SERVICES_ACTIONS_ENABLED``, both true by default; in Prefect 3.8 they run in
the temporary test server too). A server started with ``--no-services``, or those settings
false, keeps the trigger but never fires it.

The server's scheduler in Prefect 3.8.8 needs SQLAlchemy 2.0.x: with 2.1 it fails to insert the
scheduled runs ("Can't evaluate bulk DML statement") and the cron never fires.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.logging import get_logger
from prefect.schedules import Cron, Schedule
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from flows.events import retrain_trigger
from flows.pipeline import pipeline
from stages.common.config import Params, ScheduleParams, load_params
from stages.common.errors import ConfigError
from stages.common.runlock import DEFAULT_WAIT_S

logger = get_logger("flows.schedule")  # under Prefect's configured "prefect" logger: shown at INFO

SERVER_START_TIMEOUT_S = 120
# After Ctrl-C, Prefect's serve gets this long to shut down before it is interrupted again (in
# CI its shutdown once hung after a run it was finishing: the command never exited)
SHUTDOWN_GRACE_S = 20
_stop_requested = threading.Event()  # the first Ctrl-C arrived
_serve_done = threading.Event()  # serve returned: only our cleanup is left, never interrupt it


def build_schedule(params: ScheduleParams) -> Schedule:
    """The Prefect cron schedule of ``params`` (params.yaml's load checked cron and time zone
    as Prefect's CronSchedule does)."""
    return Cron(params.cron, timezone=params.timezone)


def deployment_name(params: ScheduleParams) -> str:
    """The full deployment name, ``<flow>/<deployment>``, as ``run_deployment`` takes it."""
    return f"{pipeline.name}/{params.deployment}"


MONITOR_FLOW = "monitor"  # the @flow name in flows/monitor.py


def monitor_deployment_name(params: ScheduleParams) -> str:
    """The monitor's deployment, ``monitor/<deployment>``."""
    return f"{MONITOR_FLOW}/{params.deployment}"


def is_api_healthy(api_url: str) -> bool:
    """Whether a Prefect API answers its health check at ``api_url``."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def local_server(port: int, log_file: Path) -> Iterator[str]:
    """Run ``prefect server start`` on 127.0.0.1:``port`` while open; yield its API URL.

    The server is stopped on exit, also when startup is interrupted (Ctrl-C, SIGTERM).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    api_url = f"http://127.0.0.1:{port}/api"
    with log_file.open("ab") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not is_api_healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start on {api_url}; see {log_file}")
            time.sleep(0.5)
        yield api_url
    finally:
        logger.info("stopping the Prefect server this command started (pid %d)", server.pid)
        stop_process(server)
        logger.info("the Prefect server stopped (exit code %s)", server.returncode)


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Stop a child process: terminate, then kill if it does not exit in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def pipeline_deployment(repo: Path, params: Params) -> RunnerDeployment:
    """The pipeline's deployment for ``repo``: its cron and the monitor's retraining trigger."""
    schedule = params.schedule
    model_name = params.register.model_name
    return pipeline.to_deployment(
        name=schedule.deployment,
        schedules=[build_schedule(schedule)],
        triggers=[retrain_trigger(model_name)],
        # A due run waits (bounded) for a `make run`/`make repro` holding the workspace.
        parameters={"repo": str(repo), "wait_s": DEFAULT_WAIT_S},
        description=f"The whole pipeline for {repo}, on the cron {schedule.cron!r} "
        f"({schedule.timezone}) of params.yaml, and whenever the monitor asks to retrain "
        f"{model_name!r} (the run's reason parameter says why).",
        # Each run imports flows.pipeline as a module, from the directory this command runs in.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def monitor_deployment(repo: Path, params: Params) -> RunnerDeployment:
    """The monitor's deployment for ``repo``, on the cron ``monitor.cron``."""
    from flows.monitor import monitor  # only here: the pipeline's deployment does without it

    cron = Cron(params.monitor.cron, timezone=params.schedule.timezone)
    return monitor.to_deployment(
        name=params.schedule.deployment,
        schedules=[cron],
        parameters={"repo": str(repo)},
        description=f"The monitor for {repo}, on the cron {params.monitor.cron!r} "
        f"({params.schedule.timezone}) of params.yaml: drift, data quality and performance of "
        f"{params.register.model_name!r} since the last check; asks the pipeline to retrain "
        "when a threshold is crossed.",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_deployments(repo: Path, params: Params) -> None:
    """Serve the pipeline and the monitor for ``repo``; blocks until interrupted."""
    serve(
        pipeline_deployment(repo, params),
        monitor_deployment(repo, params),
        # One run at a time: pipeline runs share the DVC repo (and the run lock), the monitor
        # reads the features a pipeline run rewrites, and a triggered run waits for its monitor.
        limit=1,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the scheduled deployment, starting a local Prefect server if none is configured."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.schedule",
        description="Serve the pipeline as a Prefect deployment on the cron schedule of "
        "params.yaml (section `schedule`), started also by the monitor's retraining event, "
        "and the monitor on its cron (section `monitor`), until Ctrl-C. Uses PREFECT_API_URL "
        "if set, else starts a local `prefect server start` (and stops it on exit).",
        epilog="While it runs, start a run now with: prefect deployment run pipeline/<deployment> "
        "(set PREFECT_API_URL=http://127.0.0.1:<port>/api when this command started "
        "the server). The Prefect UI is at http://127.0.0.1:<port>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repo",
        default=".",
        help="project checkout the scheduled runs work in (dvc.yaml, params.yaml)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=4200,
        help="port of the local Prefect server (when PREFECT_API_URL is unset)",
    )
    args = parser.parse_args(argv)
    repo = Path(args.repo).resolve()
    try:
        params = load_params(repo / "params.yaml")  # a bad cron fails here, first
    except ConfigError as exc:
        logger.error("%s", exc)
        return 1
    # SIGTERM exits through the `with` below, so a server this command started is stopped too.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # One Ctrl-C stops serve: asyncio's own handler only cancels the runner's task, which
    # Prefect's runner can absorb while it finishes a run (then nothing happened until a
    # second Ctrl-C); a KeyboardInterrupt reaches serve, which shuts down on it.
    signal.signal(signal.SIGINT, _interrupt_on_sigint)
    try:
        with ExitStack() as stack:
            api_url = _connect_api(args.port, stack)
            logger.info(
                "serving %s (cron %r, %s; and on the monitor's retraining event for %r) and "
                "%s (cron %r) against the Prefect API at %s",
                deployment_name(params.schedule),
                params.schedule.cron,
                params.schedule.timezone,
                params.register.model_name,
                monitor_deployment_name(params.schedule),
                params.monitor.cron,
                api_url,
            )
            try:
                serve_deployments(repo, params)  # returns on Ctrl-C once it is serving
            except KeyboardInterrupt:  # the watchdog's second interrupt ended a stuck shutdown
                logger.warning("serve stopped by a second interrupt")
            finally:
                _serve_done.set()
    except KeyboardInterrupt:  # Ctrl-C while the server was still starting
        return 130
    return 0


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _interrupt_on_sigint(signum: int, frame: object) -> None:
    if not _stop_requested.is_set():
        _stop_requested.set()
        threading.Thread(target=_interrupt_while_stuck, daemon=True).start()
    raise KeyboardInterrupt


def _interrupt_while_stuck(tries: int = 3) -> None:
    """Interrupt serve again while its shutdown is stuck (not once it has returned)."""
    for _ in range(tries):
        if _serve_done.wait(SHUTDOWN_GRACE_S):
            return
        logger.warning(
            "serve has not shut down %d s after Ctrl-C; interrupting it again", SHUTDOWN_GRACE_S
        )
        os.kill(os.getpid(), signal.SIGINT)


def _connect_api(port: int, stack: ExitStack) -> str:
    settings = get_current_settings()
    if settings.api.url:
        return settings.api.url
    api_url = f"http://127.0.0.1:{port}/api"
    if not is_api_healthy(api_url):
        log_file = Path(settings.home) / "server.log"
        logger.info("starting a Prefect server on 127.0.0.1:%d (log: %s)", port, log_file)
        stack.enter_context(local_server(port, log_file))
    os.environ["PREFECT_API_URL"] = api_url  # for the flow-run processes the runner starts
    stack.enter_context(temporary_settings(updates={PREFECT_API_URL: api_url}))
    return api_url


def exit_now(code: int) -> None:
    """Exit once our cleanup has run, without waiting for threads Prefect left behind.

    After Ctrl-C, Prefect's serve can return while a non-daemon thread of its runner lives on;
    Python's exit then waits for it and the command never ends (seen in CI: serve had shut
    down and the process was SIGKILLed a minute later). Everything of ours is closed by now.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
