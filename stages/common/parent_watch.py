"""A stage process dies with the run that started it (Linux; a no-op elsewhere).

``die_with_parent()`` (``stages.common.cli.run_main`` calls it) stops a stage (SIGTERM, then
SIGKILL after ``GRACE_S``) when the process that started it ends, also through the ``$SHELL -c``
DVC runs it with and through torchrun, and through ``dvc`` up to the run that holds the
workspace's run lock (``stages.common.runlock``: the flow, ``flows.repro``). A plain ``dvc repro``
is watched, not the shell that started it: ``nohup dvc repro &`` survives a logout, with its
stages. The stage also share-locks the workspace's workers lock, so the next run waits for it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from stages.common import runlock
from stages.common.errors import PipelineError

logger = logging.getLogger(__name__)

GRACE_S = 10.0  # after SIGTERM, a stage whose parent died gets this long before SIGKILL
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "busybox"}
_ORIGINAL_PPID = os.getppid()  # at import, before any hook runs: see die_with_parent
_watching = False
_watched: list[tuple[int, float]] = []  # (pid, start time) of the processes watched


def die_with_parent() -> None:
    """Have this process stopped when the process that started it ends (Linux; no-op elsewhere).

    The kernel sends SIGTERM when the direct parent dies (``PR_SET_PDEATHSIG``). DVC runs a
    stage through ``$SHELL -c``, and training ranks run under torchrun: those wrappers outlive
    their own parent, so a thread also watches every wrapper up to the first real parent or
    ``dvc`` (and the run above dvc when it holds the run lock: the flow, ``flows.repro``), and
    stops this process when any of them ends: SIGTERM (the trainer checkpoints), then SIGKILL
    after ``GRACE_S``. The process also share-locks the workspace's workers lock, so the next
    run waits for it to be gone.

    Raises:
        PipelineError: the parent had already ended when this process got here.
    """
    global _watching, _watched
    if not sys.platform.startswith("linux") or _watching or not is_stage_process():
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    # The parent may have died between our start and prctl: then we were re-parented already.
    if os.getppid() != _ORIGINAL_PPID:
        raise PipelineError(
            f"the process that started this one (pid {_ORIGINAL_PPID}) has "
            "ended; not running orphaned"
        )
    watched = _ancestors_to_watch()
    if watched is None:  # one of them ended while we looked
        raise PipelineError("the process that started this one has ended; not running orphaned")
    _watched = watched
    runlock.share_workers_lock(Path(os.environ.get("DVC_ROOT", ".")))
    _watching = True
    threading.Thread(target=_watch, args=(watched,), name="die-with-parent", daemon=True).start()


def is_stage_process() -> bool:
    """Started by DVC (which sets DVC_STAGE; torchrun ranks inherit it) or as ``-m stages.*``.

    Not a test or tool that calls a stage's ``main()`` in its own process.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(os.environ.get("DVC_STAGE")) or (
        spec is not None and spec.name.startswith("stages.")
    )


def _ancestors_to_watch() -> list[tuple[int, float]] | None:
    """(pid, start time) of the parent, and on up while the one before was a wrapper.

    The walk stops at ``dvc``: a plain ``nohup dvc repro &`` outlives the shell that started it
    (a logout), and so must its stages. It goes one further only when dvc's parent is the run
    that holds the workspace (the flow, ``flows.repro``): a killed run stops its stages.
    None when one of them ended while we looked; [] when the parent is init (nothing to watch).
    """
    import psutil

    watched: list[tuple[int, float]] = []
    try:
        process = psutil.Process(os.getppid())
        while process is not None and process.pid > 1:
            watched.append((process.pid, process.create_time()))
            try:
                kind = _wrapper_kind(process.cmdline())
            except psutil.AccessDenied:  # another user's process: no wrapper of ours
                break
            if kind is None:
                break
            process = process.parent()
            if kind == "dvc":
                if process is not None and _holds_run_lock(process.pid):
                    watched.append((process.pid, process.create_time()))
                break
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        pass
    return watched


def _holds_run_lock(pid: int) -> bool:
    """Whether ``pid`` (on this host) holds the run lock of the workspace DVC runs us in."""
    info = runlock.holder(os.environ.get("DVC_ROOT", ".")) or {}
    return info.get("pid") == pid and info.get("host") in (None, socket.gethostname())


def _wrapper_kind(cmdline: list[str]) -> str | None:
    """``shell`` (``sh -c``), ``dvc`` or ``torchrun``: a process that only runs another one."""
    names = [Path(arg).name for arg in cmdline[:3]]
    if names and names[0] in _SHELLS and "-c" in cmdline[1:]:
        return "shell"
    joined = " ".join(cmdline[:4])
    if "dvc" in names or "-m dvc" in joined:
        return "dvc"
    if "torchrun" in names or "-m torch.distributed.run" in joined:
        return "torchrun"
    return None


def _watch(watched: list[tuple[int, float]]) -> None:
    import select

    import psutil

    poller, fds = select.poll(), []
    for pid, started in watched:
        try:
            fd = os.pidfd_open(pid)
            # The pid may have been reused since we looked: it must be the same process.
            if psutil.Process(pid).create_time() != started:
                raise ProcessLookupError(pid)
        except (ProcessLookupError, psutil.Error):
            _stop_self(pid)
            return
        except OSError:  # no pidfd_open (kernel < 5.3): poll the process list instead
            _watch_by_polling(watched)
            return
        poller.register(fd, select.POLLIN)
        fds.append((fd, pid))
    events = poller.poll()  # blocks until one of them exits
    ended = dict(fds).get(events[0][0], watched[0][0])
    _stop_self(ended)


def _watch_by_polling(watched: list[tuple[int, float]]) -> None:
    import psutil

    while True:
        for pid, started in watched:
            try:
                alive = (
                    psutil.Process(pid).create_time() == started
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                )
            except psutil.Error:
                alive = False
            if not alive:
                _stop_self(pid)
                return
        time.sleep(0.5)


def _stop_self(ended: int) -> None:
    logger.error(
        "stopping: pid %d, which started this process, has ended (not running orphaned)", ended
    )  # logging survives a closed pipe
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def watched() -> list[int]:
    """The pids this stage process watches (``die_with_parent``); [] before or without it."""
    return [pid for pid, _ in _watched]
