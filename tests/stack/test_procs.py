"""stack/procs.py: pid files that lie (a dead pid, a pid now running another program) count as
stopped and are never signalled; stopping takes the whole process tree."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from stack import procs

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _wait_gone(pid: int) -> bool:
    for _ in range(50):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return True
        time.sleep(0.1)
    return False


def test_a_dead_pid_is_a_stale_pid_file(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    procs.write_pid(tmp_path, "mlflow", proc.pid, ["mlflow", "server"])
    assert procs.running_pid(tmp_path, "mlflow") is None
    assert not procs.pid_file(tmp_path, "mlflow").exists()


def test_a_pid_reused_by_another_program_is_left_alone(tmp_path: Path) -> None:
    stranger = subprocess.Popen(SLEEPER)
    try:
        procs.write_pid(tmp_path, "mlflow", stranger.pid, ["mlflow", "server"])
        assert procs.running_pid(tmp_path, "mlflow") is None
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_start_then_stop_takes_children_in_their_own_session(tmp_path: Path) -> None:
    # a parent whose child sits in a session of its own, as a worker's flow runs do
    code = (
        "import subprocess, sys, time; "
        f"c = subprocess.Popen({SLEEPER!r}, start_new_session=True); "
        "print(c.pid, flush=True); time.sleep(60)"
    )
    pid = procs.start_detached(
        "worker-x",
        [sys.executable, "-c", code],
        state=tmp_path,
        env={},
        cwd=tmp_path,
        markers=["time.sleep"],
    )
    log = procs.log_file(tmp_path, "worker-x")
    for _ in range(100):
        lines = log.read_text().split()
        if lines and lines[-1].isdigit():
            break
        time.sleep(0.1)
    child = int(log.read_text().split()[-1])
    assert procs.running_pid(tmp_path, "worker-x") == pid
    assert child in procs.process_tree(pid)
    procs.stop_tree(pid, timeout=10)
    assert _wait_gone(pid) and _wait_gone(child)
