"""Detached service processes: start them in their own session, remember them in pid files,
find them again (a stale pid file or a pid reused by another program counts as stopped), stop
them with their whole process tree, and wait for them to answer.

A pid file ``<state>/run/<service>.pid`` holds the pid on its first line and, on the next
lines, words its ``/proc/<pid>/cmdline`` must contain: a pid reused by another program fails
that check, so ``down`` never signals a stranger.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from stack.settings import StackError

LOG_TAIL_LINES = 40


def pid_file(state: Path, service: str) -> Path:
    return state / "run" / f"{service}.pid"


def log_file(state: Path, service: str) -> Path:
    return state / "logs" / f"{service}.log"


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


def _alive(pid: int, started: str | None = None) -> bool:
    """``pid`` exists and is no zombie (and, given ``started``, is still the process that
    started then, not a later one that reused the pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] != "Z" and (started is None or fields[19] == started)


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (field 22 of /proc/<pid>/stat, clock ticks since boot)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None


def write_pid(state: Path, service: str, pid: int, markers: Sequence[str]) -> None:
    path = pid_file(state, service)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([str(pid), *markers]) + "\n", encoding="utf-8")


def running_pid(state: Path, service: str) -> int | None:
    """The pid of ``service`` when its pid file names a live process running its command;
    else None (and a stale pid file is removed)."""
    path = pid_file(state, service)
    try:
        pid_line, *markers = path.read_text(encoding="utf-8").split("\n")
        pid = int(pid_line)
    except (OSError, ValueError):
        return None
    cmdline = _cmdline(pid)
    if cmdline is None or not _alive(pid) or not all(m in cmdline for m in markers if m):
        path.unlink(missing_ok=True)  # dead, or the pid now belongs to another program
        return None
    return pid


def start_detached(
    service: str,
    argv: Sequence[str],
    *,
    state: Path,
    env: Mapping[str, str],
    cwd: Path,
    markers: Sequence[str],
) -> int:
    """Start ``argv`` in a new session (it outlives this process and ``make up``), its output
    appended to ``logs/<service>.log``; record its pid. Return the pid."""
    log = log_file(state, service)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {service}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    write_pid(state, service, proc.pid, markers)
    return proc.pid


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (flow runs started by a worker in their own session
    included)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def _signal_all(pids: Sequence[int], sig: int, groups: bool) -> None:
    for pid in pids:
        try:
            if groups:
                os.killpg(os.getpgid(pid), sig)
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_tree(pid: int, *, first: int = signal.SIGTERM, timeout: float = 30.0) -> bool:
    """Stop ``pid``, its process group and its descendants: ``first`` (SIGTERM), then SIGKILL
    after ``timeout`` seconds. Return whether SIGKILL was needed."""
    snapshot = {p: _start_time(p) for p in process_tree(pid)}
    pids = list(snapshot)
    _signal_all([pid], first, groups=first == signal.SIGTERM)
    _signal_all(pids[1:], signal.SIGTERM, groups=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p, snapshot[p]) for p in pids):
            return False
        time.sleep(0.2)
    # only the processes of the snapshot (a pid reused since is left alone); a group only
    # where its leader is one of them (the service and the flow runs lead their own)
    left = [p for p in pids if _alive(p, snapshot[p])]
    _signal_all([p for p in left if _leads_group(p)], signal.SIGKILL, groups=True)
    _signal_all(left, signal.SIGKILL, groups=False)
    return True


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def stop_service(
    state: Path, service: str, *, first: int = signal.SIGTERM, timeout: float = 30.0
) -> bool:
    """Stop the service its pid file names (``stop_tree``) and remove the pid file; return
    whether it was running."""
    pid = running_pid(state, service)
    if pid is None:
        return False
    stop_tree(pid, first=first, timeout=timeout)
    pid_file(state, service).unlink(missing_ok=True)
    return True


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (our URL)
            return 200 <= response.status < 300
    except (OSError, ValueError):
        return False


def log_tail(state: Path, service: str, lines: int = LOG_TAIL_LINES) -> str:
    path = log_file(state, service)
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return f"last {min(lines, len(text))} lines of {path}:\n" + "\n".join(text[-lines:])


def wait_until(
    ready: Callable[[], bool],
    *,
    service: str,
    state: Path,
    timeout: float,
    pid: int | None = None,
    what: str = "to answer",
) -> float:
    """Poll ``ready`` until it is true; return the seconds waited.

    Raises:
        StackError: ``pid`` died or ``timeout`` passed; with the tail of the service's log.
    """
    start = time.monotonic()
    while not ready():
        if pid is not None and not _alive(pid):
            raise StackError(
                f"{service} exited while starting (pid {pid}); {log_tail(state, service)}"
            )
        if time.monotonic() - start > timeout:
            raise StackError(
                f"{service} did not come up {what} within {timeout:.0f} s; "
                f"{log_tail(state, service)}"
            )
        time.sleep(0.5)
    return time.monotonic() - start
