"""PostgreSQL for the stack: a cluster in ``<state>/postgres``, password (scram-sha-256) auth on
STACK_HOST:POSTGRES_PORT, its unix socket beside the data, the MLflow and Prefect databases.

As root, initdb and the server run as the ``postgres`` user (PostgreSQL refuses root), as in
tests/postgres.py; when that user cannot reach the checkout (a clone under /root, mode 700), the
cluster lives in /var/lib/postgresql/stack-<hash> and ``<state>/postgres`` links to it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from stack import procs
from stack.settings import StackError, StackSettings

SERVICE = "postgres"
INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install them with "
    "`apt-get install postgresql` (`make up` does it when run as root)"
)


def find_pg_bin(name: str) -> Path | None:
    """``name`` (initdb, pg_ctl) from PATH, else from the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda path: int(Path(path).parts[-3])
    )
    return Path(candidates[-1]) if candidates else None


def _as_root() -> bool:
    return os.geteuid() == 0


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise StackError(
            "postgres: as root, the server runs as the `postgres` user (PostgreSQL refuses root), "
            "which does not exist: install the postgresql package (it creates the user) or "
            "`useradd --system --home /var/lib/postgresql postgres`"
        ) from None


def _as_server_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if _as_root() else cmd


def _server_user_reaches(path: Path) -> bool:
    result = subprocess.run(_as_server_user(["test", "-x", str(path)]), capture_output=True)
    return result.returncode == 0


def cluster_root(state: Path) -> Path:
    """The folder holding ``data/`` and the socket; created (owned by ``postgres`` as root)."""
    link = state / SERVICE
    if link.exists():
        return link.resolve()
    state.mkdir(parents=True, exist_ok=True)
    if not _as_root():
        link.mkdir(mode=0o700)
        return link
    user = _server_user()
    if _server_user_reaches(state):
        link.mkdir(mode=0o700)
        os.chown(link, user.pw_uid, user.pw_gid)
        return link
    home = Path(user.pw_dir if Path(user.pw_dir).is_dir() else "/var/lib/postgresql")
    target = home / f"stack-{hashlib.sha256(str(state).encode()).hexdigest()[:12]}"
    if target.exists() and any(target.iterdir()):
        raise StackError(
            f"postgres: {target} holds the cluster of an earlier {state} (removed since, with the "
            f"password in its {link.parent.name}/secrets.env): delete it (`rm -rf {target}`) to "
            "start afresh"
        )
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(target, user.pw_uid, user.pw_gid)
    link.symlink_to(target)
    return target


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(_as_server_user(cmd), capture_output=True, text=True)
    if result.returncode:
        raise StackError(
            f"postgres: {what} failed ({' '.join(cmd)}):\n{result.stdout}{result.stderr}"
        )


def _initdb(settings: StackSettings, initdb: Path, root: Path) -> None:
    # The password reaches initdb in a 0600 file, never on a command line.
    fd, pwfile = tempfile.mkstemp(prefix="pgpw-", dir=root)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(settings.postgres_password + "\n")
        if _as_root():
            user = _server_user()
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        _run(
            [
                str(initdb),
                "-D",
                str(root / "data"),
                "-U",
                settings.postgres_user,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            "initdb",
        )
    finally:
        os.unlink(pwfile)


def _server_log(state: Path, root: Path) -> Path:
    """The server writes its log beside its data (as ``postgres`` it may not reach
    ``<state>/logs``); ``logs/postgres.log`` links to it."""
    log = root / "server.log"
    log.touch()
    if _as_root():
        user = _server_user()
        os.chown(log, user.pw_uid, user.pw_gid)
    link = procs.log_file(state, SERVICE)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.unlink(missing_ok=True)
        link.symlink_to(log)
    return log


def _postmaster_pid(root: Path) -> int | None:
    try:
        return int((root / "data" / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def up(settings: StackSettings, state: Path) -> bool:
    """Start the cluster (initdb on first use); return whether it was started now."""
    if procs.running_pid(state, SERVICE):
        return False
    initdb, pg_ctl = find_pg_bin("initdb"), find_pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise StackError(INSTALL_HINT)
    if procs.port_in_use(settings.stack_host, settings.postgres_port):
        raise StackError(
            f"postgres: port {settings.postgres_port} on {settings.stack_host} is taken by "
            "another program; set POSTGRES_PORT (stack/stack.env or the environment) to a free one"
        )
    root = cluster_root(state)
    if not (root / "data" / "PG_VERSION").is_file():
        _initdb(settings, initdb, root)
    log = _server_log(state, root)
    options = (
        f"-p {settings.postgres_port} -k {root} -c listen_addresses={settings.stack_host} "
        "-c unix_socket_permissions=0700"
    )
    cmd = [str(pg_ctl), "-D", str(root / "data"), "-l", str(log), "-o", options, "-w"]
    result = subprocess.run(
        _as_server_user([*cmd, "-t", "120", "start"]),
        capture_output=True,
        text=True,
        start_new_session=True,  # the server outlives `make up`
    )
    pid = _postmaster_pid(root)
    if result.returncode or pid is None:
        raise StackError(
            f"postgres did not start:\n{result.stdout}{result.stderr}\n"
            f"{procs.log_tail(state, SERVICE)}"
        )
    procs.write_pid(state, SERVICE, pid, ["postgres", str(root / "data")])
    create_databases(settings)
    return True


def create_databases(settings: StackSettings) -> None:
    """Create MLFLOW_DATABASE and PREFECT_DATABASE when missing."""
    import psycopg

    conninfo = dict(
        host=settings.stack_host,
        port=settings.postgres_port,
        user=settings.postgres_user,
        password=settings.postgres_password,
        dbname="postgres",
        connect_timeout=10,
    )
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in (settings.mlflow_database, settings.prefect_database):
            if name not in existing:  # names are checked identifiers (settings.py)
                conn.execute(f'CREATE DATABASE "{name}"')


def down(state: Path) -> bool:
    """Fast shutdown (SIGINT: no waiting for clients); return whether it was running."""
    return procs.stop_service(state, SERVICE, first=signal.SIGINT, timeout=60)
