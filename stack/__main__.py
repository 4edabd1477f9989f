"""``python -m stack up|down|status [--repo PATH]``: the server stack on this machine.

``up`` starts what is not running yet (PostgreSQL, SeaweedFS, the MLflow server, the Prefect
server, the work pool and its crash automation, the workers), reuses what is, writes the DVC
remote ``stack``, and prints each service's URL, log and start time. ``down`` stops them all;
their data stays in STACK_DIR for the next ``up``.
"""

from __future__ import annotations

import argparse
import fcntl
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stack import dvc_remote, objectstore, pool, postgres, procs, servers
from stack.settings import StackError, StackSettings, ensure_secrets, load_settings


def _say(line: str, err: bool = False) -> None:
    print(line, file=sys.stderr if err else sys.stdout, flush=True)  # noqa: T201 (the answer)


def _report(name: str, started: bool | int, seconds: float, url: str, state: Path) -> None:
    how = f"started in {seconds:5.1f} s" if started else f"running ({seconds:.1f} s to check)"
    log = procs.log_file(state, name.split()[0])
    _say(f"  {name:<15} {how:<26} {url}  log: {log}")


def _step(name: str, url: str, state: Path, action: Callable[[], bool | int]) -> float:
    start = time.monotonic()
    started = action()
    seconds = time.monotonic() - start
    _report(name, started, seconds, url, state)
    return seconds


def up(repo: Path) -> None:
    ensure_secrets(repo)
    settings = load_settings(repo)
    state = settings.state_dir(repo)
    (state / "run").mkdir(parents=True, exist_ok=True)
    with open(state / "run" / "up.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two `up`s at once would start everything twice
        _up(settings, repo, state)


def _up(settings: StackSettings, repo: Path, state: Path) -> None:
    begin = time.monotonic()
    _say(f"stack up in {state}")
    pg_url = f"postgresql://{settings.postgres_user}@{settings.stack_host}:{settings.postgres_port}"
    _step("postgres", pg_url, state, lambda: postgres.up(settings, state))
    if settings.own_object_store:
        _step("seaweedfs", settings.s3_endpoint, state, lambda: objectstore.up(settings, state))
    else:
        objectstore.check_bucket(settings)
        _say(
            f"  object store    external, bucket {settings.s3_bucket} reachable  "
            f"{settings.s3_endpoint}",
        )
    _step("mlflow", settings.mlflow_url, state, lambda: servers.mlflow_up(settings, state))
    prefect_ui = settings.prefect_api_url.removesuffix("/api")
    prefect_url = f"{settings.prefect_api_url} (UI {prefect_ui})"
    _step("prefect-server", prefect_url, state, lambda: servers.prefect_up(settings, state))
    start = time.monotonic()
    pool.setup(repo, state)
    _say(
        f"  work pool       {settings.work_pool!r} (process) and automation "
        f"{pool.AUTOMATION!r} ready in {time.monotonic() - start:.1f} s",
    )
    for stale in set(pool.worker_services(state)) - {
        f"worker-{n}" for n in pool.worker_names(settings)
    }:
        servers.down(state, stale)  # WORKERS was lowered since the last `up`
    start = time.monotonic()
    started = pool.workers_up(settings, repo, state)
    _say(
        f"  workers         {settings.workers} online ({started} started) in "
        f"{time.monotonic() - start:.1f} s  logs: {state / 'logs'}/worker-*.log",
    )
    if dvc_remote.write_remote(settings, repo):
        _say(
            f"  dvc remote      {dvc_remote.DVC_REMOTE!r} -> {settings.dvc_remote_url} "
            f"({settings.s3_endpoint}) in {repo / '.dvc' / 'config.local'}",
        )
    _say(f"stack up in {time.monotonic() - begin:.1f} s")


def down(repo: Path) -> None:
    """Stop the workers (and their flow runs), then the servers and the store side by side
    (each takes seconds to shut down gracefully), then PostgreSQL."""
    settings = load_settings(repo)
    state = settings.state_dir(repo)
    _say(f"stack down in {state} (data kept)")
    stops: list[tuple[str, Callable[[], bool]]] = [
        (servers.PREFECT, lambda: servers.down(state, servers.PREFECT)),
        (servers.MLFLOW, lambda: servers.down(state, servers.MLFLOW)),
        (objectstore.SERVICE, lambda: objectstore.down(settings, state)),
    ]
    for group in (
        [(w, lambda w=w: servers.down(state, w)) for w in pool.worker_services(state)],
        stops,
        [(postgres.SERVICE, lambda: postgres.down(state))],
    ):
        with ThreadPoolExecutor(max_workers=max(len(group), 1)) as threads:
            for service, stopped, start in threads.map(_timed_stop, group):
                _say_stopped(service, stopped, start)


def _timed_stop(item: tuple[str, Callable[[], bool]]) -> tuple[str, bool, float]:
    start = time.monotonic()
    return item[0], item[1](), start


def _say_stopped(service: str, stopped: bool, start: float) -> None:
    how = f"stopped in {time.monotonic() - start:.1f} s" if stopped else "was not running"
    _say(f"  {service:<15} {how}")


def status(repo: Path) -> int:
    """Print each service's state, URL and log; return 1 when one is stopped or silent."""
    settings = load_settings(repo)
    state = settings.state_dir(repo)
    pg_url = f"postgresql://{settings.postgres_user}@{settings.stack_host}:{settings.postgres_port}"
    prefect_ui = settings.prefect_api_url.removesuffix("/api")
    checks = {  # service: (URL shown, health URL)
        postgres.SERVICE: (pg_url, None),
        objectstore.SERVICE: (settings.s3_endpoint, None),
        servers.MLFLOW: (settings.mlflow_url, f"{settings.mlflow_url}/health"),
        servers.PREFECT: (prefect_ui, f"{settings.prefect_api_url}/health"),
    }
    if not settings.own_object_store:
        checks.pop(objectstore.SERVICE)
    for name in pool.worker_names(settings):
        checks[f"worker-{name}"] = (f"pool {settings.work_pool}", None)
    failing = 0
    for service, (url, health) in checks.items():
        pid = procs.running_pid(state, service)
        if pid is None:
            how = "stopped"
        elif health and not procs.http_ok(health):
            how = f"pid {pid}, not answering"
        else:
            how = f"running (pid {pid})"
        failing += not how.startswith("running")
        _say(f"  {service:<20} {how:<24} {url}  log: {procs.log_file(state, service)}")
    if not settings.own_object_store:
        _say(f"  object store: external {settings.s3_endpoint} (S3_ENDPOINT_URL)")
    return 1 if failing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--repo", type=Path, default=Path("."), help="the checkout (default .)")
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    try:
        if args.command == "up":
            up(repo)
        elif args.command == "down":
            down(repo)
        else:
            return status(repo)
    except StackError as exc:
        _say(f"stack {args.command}: {exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
