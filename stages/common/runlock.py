"""One pipeline run per workspace at a time; stage processes die with their parent.

Two kernel-backed locks, both under ``.dvc/tmp/`` of the workspace:

- ``pipeline.lock``: ``flock``-ed (exclusive) by the run that holds the workspace: the Prefect
  flow (``make run``, the scheduled deployment) or ``make repro`` (``flows.repro``), before
  ingest. It holds the holder's pid, command and start time, so a second run names it, then
  waits (bounded) or refuses. The kernel releases it when the holder dies, however it dies: a
  killed run's lock is taken at once by the next one, which says so.
- ``pipeline.workers.lock``: share-locked by every stage process and by the ``dvc`` processes a
  holder starts. A new holder waits for it, so no process of a killed run still writes the
  workspace when the next run starts.
- stage processes die with the run that started them: ``stages.common.parent_watch``.

Under the run lock, the holder also clears the entries of DVC's own ``.dvc/tmp/rwlock`` that a
killed ``dvc`` left (their pid is gone or reused), so nobody has to remove it by hand, and each
stage removes the temporary folders its killed predecessor left (``data/.validated.*``...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stages.common.errors import PipelineError

logger = logging.getLogger(__name__)

LOCK_FILE = ".dvc/tmp/pipeline.lock"
WORKERS_LOCK_FILE = ".dvc/tmp/pipeline.workers.lock"
DVC_RWLOCK = ".dvc/tmp/rwlock"
DEFAULT_WAIT_S = 3600.0  # how long `--wait` waits for the run that holds the workspace
ORPHAN_WAIT_S = 60.0  # how long a new run waits for the processes of a killed one to end
_POLL_S = 0.2
_MIN_TRY_S = 1.0  # a refusing run still retries this long: a stage may peek at the lock
_MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"  # tempfile.mkdtemp's random part (io.atomic_path)
_EXTRA_TEMP_GLOBS = {"train": [".resume/train/*/checkpoint.pt"]}  # atomic writes outside outs
_held: list[int] = []  # fds of the locks this process holds, passed on to its dvc children
_holding: dict[Path, tuple[int, dict[str, Any]]] = {}  # repo -> (lock fd, info) held here


class RunLockBusy(PipelineError):
    """Another run holds the workspace (and we were told not to wait, or waited long enough)."""


# --- the run lock --------------------------------------------------------------------------


def add_wait_arguments(parser: argparse.ArgumentParser) -> None:
    """``--wait`` and ``--wait-timeout``: the run-lock options of make run and make repro."""
    parser.add_argument(
        "--wait",
        action="store_true",
        help="wait for a run that holds the workspace instead of refusing",
    )
    parser.add_argument(
        "--wait-timeout",
        type=float,
        default=DEFAULT_WAIT_S,
        help="seconds --wait waits at most",
    )


def _fcntl() -> Any:
    import fcntl

    return fcntl


def _open_lock(repo: Path, name: str) -> int:
    path = repo / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _try_flock(fd: int, operation: int) -> bool:
    fcntl = _fcntl()
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_info(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"pid": "?", "command": text[:200], "started": "?"}


def _write_info(fd: int, info: dict[str, Any] | None) -> None:
    os.ftruncate(fd, 0)
    if info is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
    os.fsync(fd)


def describe_holder(info: dict[str, Any] | None) -> str:
    """``pid 123 (python -m flows.pipeline), started 2026-01-01 06:00:00 UTC``."""
    if not info:
        return "a process that has not written its details yet"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {info.get('pid')}{where} ({info.get('command')}), started {info.get('started')}"


def _my_info(command: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def held_here(repo: str | Path = ".") -> bool:
    """Whether this process holds ``repo``'s run lock (a second ``flock`` on it would conflict)."""
    return Path(repo).resolve() in _holding


def update_holder(repo: str | Path = ".", **details: Any) -> None:
    """Add ``details`` to the holder info this process wrote in ``repo``'s held run lock.

    ``helpers=[(pid, create_time), ...]``: processes this run started that must not outlive it
    (the flow's temporary Prefect server): a run that takes over a killed holder's lock stops
    them. Nothing when this process does not hold the lock.
    """
    held = _holding.get(Path(repo).resolve())
    if held is not None:
        held[1].update(details)
        _write_info(held[0], held[1])


@contextmanager
def run_lock(
    repo: str | Path = ".", *, wait_s: float = 0.0, command: str | None = None
) -> Iterator[dict[str, Any]]:
    """Hold the workspace's run lock for the block; yield this holder's details.

    With ``wait_s`` 0 a second run refuses at once, else it waits up to ``wait_s`` seconds.
    Once held: the processes a killed run left are waited for (its ``helpers``, such as its
    temporary Prefect server, are stopped), DVC's stale rwlock entries are cleared, and the
    ``dvc`` processes started in the block share the workers lock.

    Raises:
        RunLockBusy: another run holds the workspace; the message names its pid and start.
    """
    repo = Path(repo).resolve()
    if not (repo / ".dvc").is_dir():
        raise PipelineError(
            f"{repo} is not a DVC project (no .dvc folder): run from the "
            "project root or pass --repo"
        )
    fcntl = _fcntl()
    fd = _open_lock(repo, LOCK_FILE)
    workers = -1
    try:
        _acquire(fd, repo, wait_s)
        stale = _read_info(fd)
        if stale is not None:
            logger.warning(
                "the previous run, %s, ended without releasing %s (killed?); "
                "taking the workspace over",
                describe_holder(stale),
                LOCK_FILE,
            )
            stop_helpers(stale)
        info = _my_info(command)
        _write_info(fd, info)
        _holding[repo] = (fd, info)
        try:
            workers = _open_lock(repo, WORKERS_LOCK_FILE)
            _wait_for_workers(workers, repo, max(wait_s, ORPHAN_WAIT_S))
            fcntl.flock(workers, fcntl.LOCK_SH)  # our dvc children hold it while they live
            clear_stale_dvc_rwlock(repo)
            _held.append(workers)
            try:
                yield info
            finally:
                _held.remove(workers)
        finally:
            _holding.pop(repo, None)
            _write_info(fd, None)
    finally:
        if workers >= 0:
            os.close(workers)
        os.close(fd)  # releases the flock


def _acquire(fd: int, repo: Path, wait_s: float) -> None:
    fcntl = _fcntl()
    deadline = time.monotonic() + max(wait_s, _MIN_TRY_S)
    told = False
    while not _try_flock(fd, fcntl.LOCK_EX):
        holder_info = _read_info(fd)
        holder = describe_holder(holder_info)
        if time.monotonic() >= deadline:
            waited = f" (waited {wait_s:g} s)" if wait_s else ""
            raise RunLockBusy(
                f"another pipeline run holds this workspace ({repo / LOCK_FILE}): {holder}"
                f"{waited}. Let it finish (make run WAIT=1 or make repro WAIT=1 wait up to "
                f"{DEFAULT_WAIT_S:.0f} s for it) or stop it (kill {_pid_of(holder_info)}); "
                "a killed run's lock frees itself"
            )
        if not told and wait_s:  # WARNING: reaches the console under Prefect's logging too
            logger.warning(
                "waiting up to %g s for the pipeline run that holds this workspace: %s",
                wait_s,
                holder,
            )
            told = True
        time.sleep(_POLL_S)


def _wait_for_workers(fd: int, repo: Path, wait_s: float) -> None:
    fcntl = _fcntl()
    deadline = time.monotonic() + wait_s
    told = False
    while not _try_flock(fd, fcntl.LOCK_EX):
        pids = ", ".join(_describe_pid(pid) for pid in lock_holders(repo / WORKERS_LOCK_FILE))
        if time.monotonic() >= deadline:
            raise RunLockBusy(
                f"processes of an earlier run still work in this workspace after "
                f"{wait_s:.0f} s: {pids or 'unknown pids'}; stop them and retry"
            )
        if not told:
            logger.warning("waiting for processes of an earlier (killed) run to end: %s", pids)
            told = True
        time.sleep(_POLL_S)


def stop_helpers(info: dict[str, Any] | None, grace_s: float = 5.0) -> list[int]:
    """Stop the ``helpers`` a dead holder recorded; return the pids stopped.

    Each entry is ``[pid, create time, what]``; a pid counts only while it has the same create
    time (it was not reused). SIGTERM, then SIGKILL after ``grace_s``.
    """
    import psutil

    found: dict[Any, str] = {}
    for entry in (info or {}).get("helpers") or []:
        try:
            process = psutil.Process(int(entry[0]))
            if abs(process.create_time() - float(entry[1])) < 0.01:
                found[process] = str(entry[2]) if len(entry) > 2 else "helper"
        except (psutil.Error, TypeError, ValueError, IndexError, KeyError):
            continue
    for process in found:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(list(found), timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    if found:
        logger.warning(
            "stopped what the killed run left running: %s",
            ", ".join(f"pid {p.pid} ({what})" for p, what in found.items()),
        )
    return [process.pid for process in found]


_HELPER_WATCH = """\
import sys, time
import psutil
from stages.common.runlock import stop_helpers
try:
    psutil.Process(int(sys.argv[1])).wait()
except psutil.Error:
    pass
time.sleep(1.0)  # a run that ends normally stops its helpers itself (Prefect's atexit)
stop_helpers({"helpers": [[int(sys.argv[i]), float(sys.argv[i + 1]), "helper"]
                          for i in range(2, len(sys.argv), 2)]})
"""


def stop_helpers_with_me(helpers: list[list[Any]]) -> int | None:
    """Start a small watcher that stops ``helpers`` once this process has ended, however it
    ends (``kill -9`` included); return its pid (None when there is nothing to watch).

    ``helpers``: ``[pid, create time, what]`` entries, as ``update_holder`` records them.
    """
    import subprocess

    if not helpers:
        return None
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    args = [str(value) for pid, started, *_ in helpers for value in (pid, repr(started))]
    watcher = subprocess.Popen(
        [sys.executable, "-c", _HELPER_WATCH, str(os.getpid()), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    return watcher.pid


def _pid_of(info: dict[str, Any] | None) -> str:
    return str((info or {}).get("pid", "<pid>"))


def lock_holders(path: Path) -> list[int]:
    """The pids holding a ``flock`` on ``path`` (Linux ``/proc/locks``; [] elsewhere)."""
    try:
        inode = path.stat().st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue  # a blocked waiter, or not a flock
        if fields[5].rsplit(":", 1)[-1].isdigit() and int(fields[5].rsplit(":", 1)[-1]) == inode:
            pids.append(int(fields[4]))
    return sorted(set(pids))


def _describe_pid(pid: int) -> str:
    import psutil

    try:
        return f"pid {pid} ({' '.join(psutil.Process(pid).cmdline())[:120]})"
    except psutil.Error:
        return f"pid {pid}"


def inherited_fds() -> tuple[int, ...]:
    """The lock fds a ``dvc`` child should inherit (``Popen(pass_fds=...)``): () without a lock."""
    return tuple(_held)


def holder(repo: str | Path = ".") -> dict[str, Any] | None:
    """The details of the run holding ``repo``'s lock, or None when no run holds it."""
    path = Path(repo) / LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        if _try_flock(fd, _fcntl().LOCK_SH):
            return None
        return _read_info(fd) or {}
    finally:
        os.close(fd)


def share_workers_lock(repo: str | Path = ".") -> None:
    """Share-lock ``repo``'s workers lock until this process ends (a stage process does it:
    the next run waits for it to be gone). Nothing outside a DVC project."""
    root = Path(repo)
    if not (root / ".dvc").is_dir():
        return
    fd = _open_lock(root, WORKERS_LOCK_FILE)
    fcntl = _fcntl()
    fcntl.flock(fd, fcntl.LOCK_SH)  # never closed: held until this process ends


# --- DVC's rwlock ---------------------------------------------------------------------------


def clear_stale_dvc_rwlock(repo: str | Path = ".") -> list[str]:
    """Drop the entries of ``.dvc/tmp/rwlock`` whose process is gone; return what was dropped.

    Only call it holding the run lock. An entry is stale when its pid is dead, a zombie, not a
    ``dvc`` process, or started after the rwlock file was last written (the pid was reused:
    DVC itself only drops dead pids, and reports a reused one as "busy").
    """
    path = Path(repo) / DVC_RWLOCK
    if not path.exists():
        return []
    from dvc.lock import make_lock

    guard = make_lock(
        str(path) + ".lock", tmp_dir=str(path.parent), hardlink_lock=_dvc_hardlink_lock(Path(repo))
    )
    dropped: list[str] = []
    with guard:
        written = path.stat().st_mtime
        try:
            lock = json.loads(path.read_text(encoding="utf-8") or "{}")
        except ValueError:
            return []  # DVC reports a corrupt rwlock itself, naming the file
        for mode in ("write", "read"):
            for out, infos in list(lock.get(mode, {}).items()):
                entries = infos if isinstance(infos, list) else [infos]
                keep = [info for info in entries if not _stale_entry(info, written)]
                dropped += [
                    f"{mode} {out} by pid {info.get('pid')} ({info.get('cmd')})"
                    for info in entries
                    if info not in keep
                ]
                if not keep:
                    del lock[mode][out]
                else:
                    lock[mode][out] = keep if isinstance(infos, list) else keep[0]
            if mode in lock and not lock[mode]:
                del lock[mode]
        if dropped:
            path.write_text(json.dumps(lock), encoding="utf-8")
    for entry in dropped:
        logger.warning("cleared a stale entry of %s left by a killed dvc: %s", path, entry)
    return dropped


def _stale_entry(info: dict[str, Any], written: float) -> bool:
    import psutil

    try:
        process = psutil.Process(int(info.get("pid", -1)))
        if process.status() == psutil.STATUS_ZOMBIE or process.create_time() > written + 1:
            return True
        return not any("dvc" in Path(arg).name for arg in process.cmdline()[:3])
    except psutil.AccessDenied:  # another user's live process: not ours to judge
        return False
    except (psutil.Error, ValueError):  # gone
        return True


def _dvc_hardlink_lock(repo: Path) -> bool:
    for name in ("config", "config.local"):
        try:
            text = (repo / ".dvc" / name).read_text(encoding="utf-8")
        except OSError:
            continue
        if re.search(r"^\s*hardlink_lock\s*=\s*true", text, re.MULTILINE | re.IGNORECASE):
            return True
    return False


# --- temp folders a killed run left -----------------------------------------------------------


def remove_stale_temp_dirs(stage: str, repo: str | Path = ".") -> list[Path]:
    """Remove the temp folders a killed run of ``stage`` left next to its outputs.

    ``io.atomic_path`` writes ``<out>`` through ``<parent>/.<out name>.<random>/``; a kill leaves
    that folder. Only the stage's own outputs' folders (``dvc.yaml``) are considered, only
    those last changed before this process started, and none while a run that is not this
    process's ancestor holds the workspace (its stage could be writing them).
    """
    import psutil

    repo = Path(repo)
    current = holder(repo)
    me = psutil.Process()
    if current is not None and current.get("pid") not in {p.pid for p in me.parents()}:
        return []
    started = me.create_time()
    removed = []
    for pattern in _temp_patterns(stage, repo):
        parent, name = pattern.rsplit("/", 1) if "/" in pattern else ("", pattern)
        wanted = re.compile(rf"\.{re.escape(name)}\.{_MKDTEMP_SUFFIX}")
        for folder in repo.glob(parent) if parent else [repo]:
            for path in folder.glob(f".{name}.*"):
                if (
                    wanted.fullmatch(path.name)
                    and path.is_dir()
                    and not path.is_symlink()
                    and path.stat().st_mtime < started
                ):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
    if removed:  # WARNING: the user should see what was cleaned up for them
        logger.warning(
            "removed %d temp folder(s) a killed run left: %s",
            len(removed),
            ", ".join(str(path) for path in removed),
        )
    return removed


def _temp_patterns(stage: str, repo: Path) -> list[str]:
    import yaml

    try:
        spec = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    entry = (spec.get("stages") or {}).get(stage) or {}
    outs = []
    for key in ("outs", "metrics", "plots"):
        for out in entry.get(key) or []:
            outs.append(next(iter(out)) if isinstance(out, dict) else str(out))
    return [
        out.rstrip("/")
        for out in outs + _EXTRA_TEMP_GLOBS.get(stage, [])
        if "${" not in out and ".." not in Path(out).parts
    ]
