"""Faults outside the pipeline's control (a store down or read-only, a full disk) as one line.

Owner: issue 10 item 7. ``describe_fault(exc)`` returns one line naming the store or path and
the fix, or None for an exception it does not know (which then propagates as a traceback and
the flow may retry it). A described fault is not transient: retrying it at once cannot help.

It looks at the whole chain (``__cause__`` / ``__context__``): MLflow wraps a refused
connection in ``MlflowException`` and a full SQLite file in SQLAlchemy's ``OperationalError``,
and the error that matters (the first write that found the disk full) is often the context of
the one raised while cleaning up.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePath

# errno -> (what happened, what to do); the path is named between the two.
_AGAIN = "then run the stage again"
_OS_FAULTS = {
    errno.ENOSPC: (
        "no space left on the device",
        f"free space there or point the output / MLflow store at a larger disk, {_AGAIN}",
    ),
    errno.EDQUOT: ("disk quota exceeded", f"free space within the quota or raise it, {_AGAIN}"),
    errno.EROFS: (
        "read-only file system",
        f"remount it read-write or point the output / MLflow store elsewhere, {_AGAIN}",
    ),
    errno.EACCES: (
        "permission denied",
        (
            f"give this user (uid {os.getuid()}) access to it or point the stage at a "
            f"place it may use, {_AGAIN}"
        ),
    ),
}
_TEXT_ERRNO = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS,
}
_SQLITE_FULL = "database or disk is full"
_SQLITE_READ_ONLY = (
    "attempt to write a readonly database",
    "unable to open database file",
    "readonly database",
)
_API_FAILED = re.compile(r"API request to (?P<url>\S+) failed with exception")
_MLFLOW_ENV = "MLFLOW_TRACKING_URI"
_MLFLOW_STORE_LOGGER = "mlflow.store.db.utils"
# Locals that hold the file a frame writes (pathlib's own methods: self).
_PATH_LOCALS = ("self", "path", "f", "file", "filename", "target", "dst", "dest", "tmp")
# torch.save on a full disk raises a RuntimeError that does not say so
_TORCH_WRITE = ("inline_container.cc", "PytorchStreamWriter failed writing", "file write failed")
_ATOMIC_TEMP = re.compile(r"^\.[^/]+\.[a-z0-9_]{8}$")  # tempfile.mkdtemp(prefix=".<name>.")


def describe_fault(exc: BaseException) -> str | None:
    """One line naming the store or path and the fix, or None when ``exc`` is not a known fault.

    Known: a full disk, a quota, a read-only file system or a denied write (``OSError``
    ENOSPC / EDQUOT / EROFS / EACCES, or SQLite saying so about the MLflow store); an MLflow
    tracking server that refuses, times out or cannot be resolved. A locked SQLite store is
    transient and left to the caller's retry (None).
    """
    chain = list(_chain(exc))
    for describe in (_describe_os_fault, _describe_sqlite_fault, _describe_server_fault):
        for item in chain:
            if (line := describe(item)) is not None:
                return line
    return None


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it came from) is a full disk or quota, SQLite's included."""
    for item in _chain(exc):
        code = item.errno if isinstance(item, OSError) else None
        text = str(item).lower()
        if code in (errno.ENOSPC, errno.EDQUOT) or any(
            words in text for words in (_SQLITE_FULL, "no space left", "quota exceeded")
        ):
            return True
    return False


class _DropKnownFaults(logging.Filter):
    # MLflow's SQL store logs a traceback before it re-raises; a fault worded here needs none.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or describe_fault(exc) is None


def quiet_mlflow_store_errors() -> None:
    """Drop the traceback MLflow's SQL store logs for a fault ``describe_fault`` words (it is
    raised anyway: the stage's one line says it); other errors are logged as before."""
    store_logger = logging.getLogger(_MLFLOW_STORE_LOGGER)
    if not any(isinstance(f, _DropKnownFaults) for f in store_logger.filters):
        store_logger.addFilter(_DropKnownFaults())


def _chain(exc: BaseException) -> Iterator[BaseException]:
    # The exception, then what caused it or was being handled when it was raised.
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [
            e
            for e in (item.__cause__, item.__context__, getattr(item, "orig", None))
            if isinstance(e, BaseException)
        ]


# --- disks ------------------------------------------------------------------------------------


def _describe_os_fault(exc: BaseException) -> str | None:
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in _OS_FAULTS:
        code = next((n for text, n in _TEXT_ERRNO.items() if text in str(exc).lower()), None)
    if code is None and any(text in str(exc) for text in _TORCH_WRITE):
        written = _written_path(exc)
        code = errno.ENOSPC if written and _is_full(written) else None
    if code is None:
        return None
    what, fix = _OS_FAULTS[code]
    path = _written_path(exc)
    if path is None:
        full = _full_places() if code == errno.ENOSPC else []
        if not full:
            return f"{what} (the error names no file): {fix}"
        path = full[0]
    return f"{what}: {path}{_usage(path) if code in (errno.ENOSPC, errno.EDQUOT) else ''}; {fix}"


def _written_path(exc: BaseException) -> str | None:
    # A copy's destination (filename2) is where the write failed; else the file named; else
    # (a failed write() names no file) the path the innermost frame was writing to.
    if isinstance(exc, OSError):
        for name in (exc.filename2, exc.filename):
            if name:
                return str(_without_temp_dirs(Path(os.fsdecode(name))))
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in _PATH_LOCALS:
            value = frame.f_locals.get(name)
            if isinstance(value, PurePath):
                return str(_without_temp_dirs(Path(value)))
    return None


def _without_temp_dirs(path: Path) -> Path:
    # stages.common.io.atomic_path writes <folder>/.<name>.<random>/<name>: name the target.
    return Path(*[part for part in path.parts if not _ATOMIC_TEMP.match(part)])


def _usage(path: str) -> str:
    """`` (file system M: 1.2 MB, 0 B free now)`` for the one holding ``path``."""
    place = _existing(Path(path))
    try:
        usage = shutil.disk_usage(place)
    except OSError:
        return ""
    return (
        f" (file system {_mount_point(place)}: {_size(usage.total)}, {_size(usage.free)} free now)"
    )


def _full_places() -> list[str]:
    # Without a file name: the places a stage writes to whose file system is (almost) full.
    candidates = [
        p for p in (_sqlite_path(_tracking_uri()), os.getcwd(), tempfile.gettempdir()) if p
    ]
    return [str(place) for place in candidates if _is_full(place)]


def _is_full(place: str | Path) -> bool:
    # Under 1 MB (or 0.1%) free: nothing of a stage's size fits.
    try:
        usage = shutil.disk_usage(_existing(Path(place)))
    except OSError:
        return False
    return usage.free < max(1 << 20, usage.total // 1000)


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    # The longest mount point above ``path`` (/proc/self/mounts sees bind mounts, which
    # os.path.ismount does not); else the nearest folder ismount accepts.
    path = _existing(path).resolve()
    try:
        lines = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    points = [Path(line.split()[1].replace("\\040", " ")) for line in lines if line.split()]
    above = [p for p in points if path == p or p in path.parents]
    if above:
        return max(above, key=lambda p: len(p.parts))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --- the MLflow store -------------------------------------------------------------------------


def _tracking_uri() -> str:
    try:
        import mlflow

        return mlflow.get_tracking_uri()
    except Exception:  # noqa: BLE001 - best effort: the env var then
        return os.environ.get(_MLFLOW_ENV, "")


def _sqlite_path(uri: str) -> str | None:
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).absolute())


def _describe_sqlite_fault(exc: BaseException) -> str | None:
    if not isinstance(exc, sqlite3.OperationalError):
        return None
    message = str(exc).lower()
    db = _sqlite_path(_tracking_uri())
    store = f"the MLflow store {db}" if db else "the SQLite database"
    if _SQLITE_FULL in message:
        usage = _usage(db) if db else ""
        return (
            f"{store} cannot grow: the disk is full{usage}; free space there (or move the "
            f"store: MLFLOW_TRACKING_URI / params mlflow.tracking_uri), then run the stage "
            "again"
        )
    if any(text in message for text in _SQLITE_READ_ONLY):
        reason, fix = _why_unwritable(Path(db)) if db else ("it is read-only", "make it writable")
        return (
            f"{store} cannot be opened for writing ({reason}); {fix}, or point "
            "MLFLOW_TRACKING_URI / params mlflow.tracking_uri at a writable store, then run "
            "the stage again"
        )
    return None  # "database is locked" and the like are transient: a retry may pass


def _why_unwritable(db: Path) -> tuple[str, str]:
    # (what is wrong, what to do) for a SQLite file that cannot be written.
    folder = db.parent
    if not folder.is_dir():
        return f"its folder {folder} does not exist", f"create {folder}"
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        read_only = False
    if read_only:
        mount = _mount_point(folder)
        return f"{mount} is mounted read-only", f"remount {mount} read-write"
    fix = (
        f"make {folder} and {db.name} writable by this user (uid {os.getuid()}; SQLite "
        "writes its journal beside the file)"
    )
    if not os.access(folder, os.W_OK):
        return f"no write permission on {folder}", fix
    if db.exists() and not os.access(db, os.W_OK):
        return f"no write permission on {db}", fix
    return "read-only", fix


def _describe_server_fault(exc: BaseException) -> str | None:
    # MLflow wraps every failed request as "API request to <url> failed with exception ...";
    # a bare connection error counts only when it names the tracking server (not a data source).
    server = _server()
    if match := _API_FAILED.search(str(exc)):
        server = server or _origin(match["url"])
    elif not (server and _is_connection_error(exc) and _names_host(str(exc), server)):
        return None
    return (
        f"the MLflow tracking server {server} is unreachable ({_reason(exc)}); start it "
        f"or point MLFLOW_TRACKING_URI / params mlflow.tracking_uri at one that runs, then "
        f"run the stage again (params mlflow.request_timeout_s, max_retries and backoff_s "
        f"bound the wait)"
    )


def _is_connection_error(exc: BaseException) -> bool:
    import requests
    import urllib3

    return isinstance(
        exc,
        (
            requests.ConnectionError,
            requests.Timeout,
            urllib3.exceptions.MaxRetryError,
            urllib3.exceptions.NewConnectionError,
            ConnectionError,
        ),
    )


def _names_host(text: str, server: str) -> bool:
    host = re.sub(r"^https?://", "", server).split("/", 1)[0]
    name, _, port = host.partition(":")
    return host in text or (f"host='{name}'" in text and (not port or f"port={port}" in text))


def _origin(url: str) -> str:
    match = re.match(r"(https?://[^/]+)", url)
    return match.group(1) if match else url


def _server() -> str | None:
    uri = _tracking_uri()
    return uri if uri.startswith(("http://", "https://")) else None


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Read timed out", "timed out"),
        ("Name or service not known", "host name not found"),
        ("nodename nor servname", "host name not found"),
        ("Temporary failure in name resolution", "host name not found"),
        ("too many", "it kept answering with errors"),
    ):
        if needle in text:
            return reason
    return type(exc).__name__
