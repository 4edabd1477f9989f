"""A real PostgreSQL server for the tests: a fresh cluster in a temp dir, on 127.0.0.1.

The binaries (initdb, pg_ctl) come from PATH or /usr/lib/postgresql/<version>/bin; ``make test``
installs them (apt) when they are missing. Without them the SQL tests are skipped, or fail when
the CI environment variable is set, so CI never passes without running them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack.postgres import find_pg_bin  # one lookup of the server binaries

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with "
    "`apt-get install postgresql` (or run `make test-deps` as root)"
)
DATABASE = "ingest_test"
USER = "test"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_server_user(cmd: list[str]) -> list[str]:
    """``cmd``, run as the ``postgres`` user when we are root (initdb refuses root)."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str]) -> None:
    result = subprocess.run(as_server_user(cmd), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")


def start_server(root: Path, initdb: Path, pg_ctl: Path) -> int:
    """initdb a cluster in ``root/data`` and start it on 127.0.0.1; return its port."""
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    _run(
        [
            str(initdb),
            "-D",
            str(root / "data"),
            "-U",
            USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]
    )
    port = free_port()
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c full_page_writes=off -c synchronous_commit=off"
    )
    _run(
        [
            str(pg_ctl),
            "-D",
            str(root / "data"),
            "-l",
            str(root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ]
    )
    return port


def create_database(port: int) -> str:
    """Create the test database; return its SQLAlchemy URL (no password: trust auth)."""
    import sqlalchemy as sa

    engine = sa.create_engine(
        f"postgresql+psycopg://{USER}@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT"
    )
    with engine.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {DATABASE}"))
    engine.dispose()
    return f"postgresql+psycopg://{USER}@127.0.0.1:{port}/{DATABASE}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The SQLAlchemy URL of a database on a real PostgreSQL server started for this session."""
    initdb, pg_ctl = find_pg_bin("initdb"), find_pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    # Not pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="pg-test-"))
    try:
        port = start_server(root, initdb, pg_ctl)
        try:
            yield create_database(port)
        finally:
            _run([str(pg_ctl), "-D", str(root / "data"), "-m", "immediate", "stop"])
    finally:
        shutil.rmtree(root, ignore_errors=True)
