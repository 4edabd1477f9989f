"""The MLflow tracking server and the Prefect server, both on PostgreSQL.

Passwords and keys reach them in environment variables only (``PGPASSWORD``, which libpq and
asyncpg read; ``AWS_*``), never in a command line or a URL, so ``ps`` shows none.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from stack import procs
from stack.settings import StackError, StackSettings

MLFLOW = "mlflow"
PREFECT = "prefect-server"
# Variables of the caller's shell a server must not inherit: they would point it elsewhere.
_FOREIGN = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "PGHOST", "PGPORT")


def venv_bin() -> Path:
    """The folder of this Python's executables (mlflow, prefect, dvc, python)."""
    return Path(sys.executable).parent


def prefect_home(state: Path) -> Path:
    return state / "prefect"


def base_env(settings: StackSettings, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update(
        PATH=f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
        PGPASSWORD=settings.postgres_password,
        PREFECT_HOME=str(prefect_home(state)),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _check_port(settings: StackSettings, port: int, name: str, service: str) -> None:
    if procs.port_in_use(settings.stack_host, port):
        raise StackError(
            f"{service}: port {port} on {settings.stack_host} is taken by another program; set "
            f"{name} (stack/stack.env or the environment) to a free one"
        )


def mlflow_up(settings: StackSettings, state: Path, timeout: float = 240) -> bool:
    """Start the MLflow server (artifacts proxied to the bucket); return whether started now."""
    pid = procs.running_pid(state, MLFLOW)
    started = pid is None
    if started:
        _check_port(settings, settings.mlflow_port, "MLFLOW_PORT", MLFLOW)
        host, port = settings.stack_host, settings.mlflow_port
        argv = [
            str(venv_bin() / "mlflow"),
            "server",
            "--backend-store-uri",
            settings.database_url(settings.mlflow_database),
            "--artifacts-destination",
            settings.artifacts_destination,
            "--serve-artifacts",
            "--host",
            host,
            "--port",
            str(port),
            "--workers",
            "1",
            # The Host headers clients send: STACK_HOST may be a name or an address.
            "--allowed-hosts",
            f"{host},{host}:{port},localhost,localhost:{port},127.0.0.1,127.0.0.1:{port}",
        ]
        env = base_env(settings, state)
        env.update(
            AWS_ACCESS_KEY_ID=settings.aws_access_key_id,
            AWS_SECRET_ACCESS_KEY=settings.aws_secret_access_key,
            AWS_DEFAULT_REGION=settings.s3_region,
            MLFLOW_S3_ENDPOINT_URL=settings.s3_endpoint,
        )
        pid = procs.start_detached(
            MLFLOW, argv, state=state, env=env, cwd=state, markers=["mlflow", "server", str(port)]
        )
    procs.wait_until(
        lambda: procs.http_ok(f"{settings.mlflow_url}/health"),
        service=MLFLOW,
        state=state,
        timeout=timeout,
        pid=pid,
    )
    return started


def prefect_up(settings: StackSettings, state: Path, timeout: float = 420) -> bool:
    """Start the Prefect server (its database migrated on first start); return whether started
    now."""
    pid = procs.running_pid(state, PREFECT)
    started = pid is None
    if started:
        _check_port(settings, settings.prefect_port, "PREFECT_PORT", PREFECT)
        port = str(settings.prefect_port)
        argv = [
            str(venv_bin() / "prefect"),
            "server",
            "start",
            "--host",
            settings.stack_host,
            "--port",
            port,
        ]
        env = base_env(settings, state)
        env.update(
            # No password in the URL: asyncpg reads PGPASSWORD.
            PREFECT_SERVER_DATABASE_CONNECTION_URL=settings.database_url(
                settings.prefect_database, driver="asyncpg"
            ),
            PREFECT_API_URL=settings.prefect_api_url,  # what its automations' actions call
            PREFECT_SERVER_DATABASE_TIMEOUT="30",
            PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT="30",
        )
        prefect_home(state).mkdir(parents=True, exist_ok=True)
        pid = procs.start_detached(
            PREFECT, argv, state=state, env=env, cwd=state, markers=["prefect", "server", port]
        )
    procs.wait_until(
        lambda: procs.http_ok(f"{settings.prefect_api_url}/health"),
        service=PREFECT,
        state=state,
        timeout=timeout,
        pid=pid,
    )
    return started


def down(state: Path, service: str) -> bool:
    return procs.stop_service(state, service)
