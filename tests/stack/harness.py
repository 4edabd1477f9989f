"""Bring a whole stack up in a checkout and down again, for the stack tests and the end-to-end
test: ``python -m stack up|down`` as subprocesses, free ports on 127.0.0.1.

The checkout (``repo``) gets a copy of the ``stack`` package with its ``stack.env`` when it has
none; the services, their data and logs live in ``repo/.stack``. As root, PostgreSQL runs as the
``postgres`` user, which must reach ``repo``: make it under ``tempfile.mkdtemp()``, not pytest's
tmp_path (private to root); otherwise the cluster lives in /var/lib/postgresql, and
``stop_stack(purge=True)`` removes it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from stack.postgres import INSTALL_HINT, find_pg_bin
from stack.settings import StackSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
PORT_SETTINGS = ("POSTGRES_PORT", "S3_PORT", "MLFLOW_PORT", "PREFECT_PORT")
UP_TIMEOUT = 900  # first start on 2 busy cores: PostgreSQL, SeaweedFS, two servers' migrations
DOWN_TIMEOUT = 300


@dataclass(frozen=True)
class StackHandle:
    """A running stack: its checkout, the environment it was started with, its settings."""

    repo: Path
    env: dict[str, str]
    settings: StackSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_postgres() -> None:
    """Skip without PostgreSQL's binaries; fail when CI is set (as tests/postgres.py)."""
    if find_pg_bin("initdb") is None or find_pg_bin("pg_ctl") is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)


def stack_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (os.environ) with a free port for each service and one worker."""
    env = dict(os.environ if base is None else base)
    ports: set[int] = set()
    while len(ports) < len(PORT_SETTINGS):
        ports.add(free_port())
    env.update(zip(PORT_SETTINGS, map(str, sorted(ports)), strict=True))
    env["WORKERS"] = "1"
    for name in ("STACK_DIR", "S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)
    return env


def install_stack_package(repo: Path) -> None:
    """Copy the ``stack`` package (code and stack.env) into ``repo`` when it has none."""
    if not (repo / "stack" / "settings.py").is_file():
        shutil.copytree(
            ROOT / "stack",
            repo / "stack",
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )


def run_stack(
    repo: Path, env: dict[str, str], command: str, timeout: float
) -> subprocess.CompletedProcess:
    """``python -m stack <command> --repo repo``, in ``repo``, with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "stack", command, "--repo", str(repo)],
        cwd=repo,
        env={**env, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_stack(repo: Path, env: dict[str, str]) -> StackSettings:
    """``python -m stack up`` in ``repo``; its settings. Raises AssertionError with its output."""
    require_postgres()
    install_stack_package(repo)
    result = run_stack(repo, env, "up", UP_TIMEOUT)
    print(result.stdout)
    assert result.returncode == 0, f"stack up failed:\n{result.stdout}\n{result.stderr}"
    return load_settings(repo, env)


def stop_stack(repo: Path, env: dict[str, str], purge: bool = False) -> str:
    """``python -m stack down`` (safe when nothing runs); ``purge``: remove ``repo/.stack`` and a
    PostgreSQL cluster kept outside it. Return its output."""
    if not (repo / "stack" / "stack.env").is_file():
        return ""
    result = run_stack(repo, env, "down", DOWN_TIMEOUT)
    if purge:
        state = load_settings(repo, env).state_dir(repo)
        cluster = state / "postgres"
        if cluster.is_symlink():
            shutil.rmtree(cluster.resolve(), ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    return result.stdout + result.stderr
