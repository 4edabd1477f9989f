"""``tune.executor: dask``: ``make tune``'s trials on the workers of a Dask cluster.

The flow's task runner is ``prefect_dask.DaskTaskRunner``: a local cluster of
``tune.parallel`` worker processes (one thread each) when ``tune.dask_address`` is null, else
the running scheduler at that address. A trial task runs in a worker process and starts
``python -m stages.train.trial`` from there, as with threads; its result names the worker.

A worker that dies mid-trial fails that trial (the local cluster's scheduler allows no
retries: the flow's next round runs it again, as any failed trial); a scheduler of your own
re-runs it on another worker if its ``distributed.scheduler.allowed-failures`` allows. A
cluster left without a worker fails the round's open trials after ``NO_WORKERS_S`` instead of
waiting forever.

Workers on other machines need what the trial process needs, at the same paths: the project
checked out at the flow's ``--repo`` path with ``data/features`` (``dvc pull``), the virtualenv
that runs ``dask worker`` (its ``python`` runs the trial) with the checkout on ``PYTHONPATH``,
a study storage every worker reaches (``tune.storage`` PostgreSQL), an MLflow server
(``mlflow.tracking_uri``) and a Prefect API they reach (``PREFECT_API_URL``, not the flow's
temporary one on 127.0.0.1). Each trial trains with the flow machine's cores / ``tune.parallel``
torch threads: with a scheduler of your own, set ``tune.parallel`` to the trials one machine
runs at once (its workers' threads).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
import time
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit

from stages.common.errors import ConfigError

CONNECT_S = 5.0  # a scheduler that does not answer within this is refused before anything runs
NO_WORKERS_S = 60.0  # a cluster without a worker this long: the round's open trials fail
_POLL_S = 1.0
_WORKER_LOGGING = "DASK_LOGGING__DISTRIBUTED"


def _host(address: str) -> str:
    return urlsplit(address if "://" in address else f"tcp://{address}").hostname or ""


def is_local(address: str) -> bool:
    """Whether the scheduler at ``address`` is on this machine's loopback (so are its workers,
    in this project's tests; a sqlite study is then shared through the one disk)."""
    host = _host(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_cluster(address: str | None, storage: str, tracking_uri: str) -> None:
    """Before anything starts: with a scheduler elsewhere, stores every worker reaches; the
    scheduler answers and has workers.

    Raises:
        ConfigError: a sqlite study or MLflow store with a remote scheduler; no scheduler
            answering at ``address`` within ``CONNECT_S``; a scheduler without workers.
    """
    if address is None:
        return
    where = f"params.yaml: tune.dask_address {address}"
    if not is_local(address):
        if storage.startswith("sqlite"):
            raise ConfigError(
                f"{where} runs trials on other machines, but the study is in sqlite ({storage}), "
                "which only this machine reaches: set tune.storage (or env TUNE_STORAGE) to "
                "postgresql+psycopg://user@host/db"
            )
        api = _prefect_api()
        if not api or is_local(api):
            raise ConfigError(
                f"{where} runs trials on other machines, but the Prefect API is "
                f"{api or 'a temporary server'} on this machine: set PREFECT_API_URL to a "
                "Prefect server the workers reach (http://host:4200/api, make up starts one)"
            )
        if not tracking_uri.startswith(("http://", "https://", "databricks")):
            raise ConfigError(
                f"{where} runs trials on other machines, but MLflow's store is local "
                f"({tracking_uri}): set mlflow.tracking_uri to an MLflow server "
                "(http://host:5000, make up starts one)"
            )
    workers = _scheduler_workers(address, where)
    if not workers:
        raise ConfigError(
            f"{where}: the scheduler answers but has no workers; start some "
            f"(`dask worker {address}` on each machine, from the project's virtualenv)"
        )


def _prefect_api() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def _scheduler_workers(address: str, where: str) -> dict[str, int]:
    """``{worker address: threads}`` of the scheduler at ``address``."""
    url = urlsplit(address if "://" in address else f"tcp://{address}")
    fix = (
        "start it (`dask scheduler --port PORT`, then `dask worker ADDRESS` on each machine) or "
        "set tune.dask_address: null for a local cluster of tune.parallel workers"
    )
    try:  # a plain TCP probe first: "connection refused" at once, not after Dask's retries
        socket.create_connection((url.hostname, url.port or 8786), timeout=CONNECT_S).close()
    except OSError as exc:
        raise ConfigError(f"{where}: no Dask scheduler answers ({exc}); {fix}") from exc
    from distributed import Client

    try:
        with Client(address, timeout=CONNECT_S, set_as_default=False) as client:
            return dict(client.nthreads())
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"{where}: no Dask scheduler answers ({exc}); {fix}") from exc


def prepare_workers(plan: dict, stack: ExitStack) -> None:
    """While ``stack`` is open: the workers report to this flow's Prefect API, and a local
    cluster's worker processes log warnings only.

    Without ``PREFECT_API_URL`` the flow's API is a temporary server that only this process
    knows of: each worker process would start one of its own, where the trials' task runs would
    go unseen. So one is started here and named in the settings the workers get with each task.
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if not get_current_settings().api.url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the one Prefect itself would start (stopped at exit)
        server.start()
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))
    if plan["dask_address"] is None:  # spawned workers read it at start (distributed's logging)
        previous = os.environ.get(_WORKER_LOGGING)
        os.environ[_WORKER_LOGGING] = "warning"
        stack.callback(_restore_env, _WORKER_LOGGING, previous)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def task_runner(plan: dict) -> Any:
    """The flow's ``DaskTaskRunner``: the scheduler at ``plan["dask_address"]``, else a local
    cluster of ``plan["parallel"]`` one-thread worker processes."""
    from prefect_dask import DaskTaskRunner

    logging.getLogger("distributed").setLevel(logging.WARNING)  # not a line per worker event
    if plan["dask_address"]:
        return DaskTaskRunner(address=plan["dask_address"])
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": plan["parallel"],
            "threads_per_worker": 1,  # one trial per worker process
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,  # no dashboard; `make prefect` shows the runs
            "scheduler_kwargs": {
                # a worker that dies mid-trial fails the trial at once: the flow's next round
                # runs it again (Dask's default, 3, re-runs it itself under the same task run)
                "allowed_failures": 0,
                "dashboard_address": "127.0.0.1:0",  # its HTTP server (health): a free port
            },
        },
    )


def worker_name() -> str | None:
    """The address of the Dask worker running this code; None outside a Dask worker."""
    if "distributed" not in sys.modules:  # threads: distributed was never imported
        return None
    from distributed import get_worker

    try:
        return str(get_worker().address)
    except ValueError:
        return None


def collect(futures: list[Any], log: Any) -> list[Any]:
    """Each future's result or exception once all have ended; a trial whose worker died (or
    that could not run: no worker for ``NO_WORKERS_S``) is an exception, its task run marked
    Crashed."""
    from prefect.context import FlowRunContext

    client = FlowRunContext.get().task_runner.client
    pending = [f.wrapped_future for f in futures]
    alone_since: float | None = None
    while not all(f.done() for f in pending):
        time.sleep(_POLL_S)
        if client.nthreads():
            alone_since = None
        elif alone_since is None:
            alone_since = time.monotonic()
            log.warning("the Dask cluster has no worker; waiting up to %.0f s", NO_WORKERS_S)
        elif time.monotonic() - alone_since > NO_WORKERS_S:
            log.error("no Dask worker for %.0f s: the open trials fail", NO_WORKERS_S)
            client.cancel([f for f in pending if not f.done()])
            break
    return [_outcome(future, log) for future in futures]


def _outcome(future: Any, log: Any) -> Any:
    try:
        return future.result(raise_on_failure=False)
    except Exception as exc:  # the task never reported an end: killed, cancelled, unpickled
        what = {
            "KilledWorker": "the Dask worker running it ended",
            "CancelledError": f"no Dask worker ran it within {NO_WORKERS_S:.0f} s",
        }.get(type(exc).__name__, "a Dask worker could not run it (the project on its PYTHONPATH?)")
        message = f"{what} ({type(exc).__name__}: {exc})"
        log.warning("a trial failed: %s", message)
        _mark_crashed(future.task_run_id, message, log)
        return RuntimeError(f"trial failed: {message}")


def _mark_crashed(task_run_id: Any, message: str, log: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            client.set_task_run_state(task_run_id, Crashed(message=message), force=True)
    except Exception as exc:  # the run was never recorded: nothing shows it running
        log.debug("task run %s not marked Crashed: %s", task_run_id, exc)
