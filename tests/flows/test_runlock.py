"""One run per workspace: the run lock, stages that die with their parent, stale leftovers.

Real processes, real ``flock``, real DVC (``dvc repro`` in a temporary repo), real SIGKILLs.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from flows.pipeline import PREFECT_SERVER_APP  # imports Prefect (and its logging setup) once
from stages.common import runlock
from stages.common.io import atomic_path
from tests.conftest import ROOT

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
HOLD = textwrap.dedent("""\
    import sys
    from stages.common import runlock
    with runlock.run_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes stdin
    """)
# A stage as DVC runs it: it calls the hook run_main calls, says its pid, then works a while.
STAGE = textwrap.dedent("""\
    import os, sys, time
    from stages.common import parent_watch
    parent_watch.die_with_parent()
    open("stage.pid", "w").write(str(os.getpid()))
    time.sleep(120)
    open("out.txt", "w").write("done")
    """)


# --- helpers ----------------------------------------------------------------------------------


def _wait_for(what: str, check: Callable[[], object], timeout_s: float = 30) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def reap():
    """Pids this test started, killed at its end should one outlive a failed assertion."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if any(
                mark in " ".join(proc.cmdline())
                for mark in ("stage.py", "rank.py", "dvc", "flows.pipeline", "prefect.server.api")
            ):
                proc.kill()
        except psutil.Error:
            pass


def _dvc_repo(repo: Path, cmd: str = "python stage.py") -> Path:
    """A DVC repo (no git) with one stage ``work`` running ``cmd``, which writes out.txt."""
    repo.mkdir(parents=True)
    subprocess.run([PY, "-m", "dvc", "init", "-q", "--no-scm"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(
        f"stages:\n  work:\n    cmd: {cmd}\n    outs:\n      - out.txt\n"
    )
    (repo / "stage.py").write_text(STAGE)
    return repo


def _plain_repo(repo: Path) -> Path:
    (repo / ".dvc" / "tmp").mkdir(parents=True)
    return repo


@pytest.fixture
def holder(tmp_path: Path):
    """Start a real process holding the run lock of a repo; yields a starter."""
    started: list[subprocess.Popen] = []

    def start(repo: Path) -> subprocess.Popen:
        proc = subprocess.Popen(
            [PY, "-c", HOLD, str(repo)],
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


# --- the run lock -----------------------------------------------------------------------------


def test_a_second_run_refuses_naming_the_holder_and_runs_nothing(tmp_path: Path, holder) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd="python -c \"open('out.txt','w').write('x')\"")
    first = holder(repo)
    second = subprocess.run(
        [PY, "-m", "flows.repro", "--repo", str(repo), "--no-push"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1
    assert f"pid {first.pid} " in second.stderr and "started 20" in second.stderr
    assert "WAIT=1" in second.stderr and "Traceback" not in second.stderr
    assert not (repo / "out.txt").exists()  # dvc repro never ran


@pytest.mark.slow
def test_a_waiting_run_goes_on_once_the_holder_is_done(tmp_path: Path, holder) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd="python -c \"open('out.txt','w').write('x')\"")
    first = holder(repo)
    second = subprocess.Popen(
        [
            PY,
            "-m",
            "flows.repro",
            "--repo",
            str(repo),
            "--no-push",
            "--wait",
            "--wait-timeout",
            "60",
        ],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    waiting = second.stderr.readline()
    assert "waiting up to 60 s" in waiting and f"pid {first.pid} " in waiting
    assert second.poll() is None and not (repo / "out.txt").exists()
    first.stdin.close()  # the first run ends normally
    assert second.wait(timeout=60) == 0
    assert (repo / "out.txt").read_text() == "x"
    assert runlock.holder(repo) is None


def test_wait_gives_up_after_its_timeout(tmp_path: Path, holder) -> None:
    repo = _plain_repo(tmp_path / "repo")
    first = holder(repo)
    with (
        pytest.raises(runlock.RunLockBusy, match=rf"pid {first.pid} .*waited 0.5 s"),
        runlock.run_lock(repo, wait_s=0.5),
    ):
        pass


def test_the_lock_of_a_holder_killed_with_sigkill_is_taken_at_once(
    tmp_path: Path, holder, caplog: pytest.LogCaptureFixture
) -> None:
    repo = _plain_repo(tmp_path / "repo")
    first = holder(repo)
    assert runlock.holder(repo)["pid"] == first.pid
    first.kill()
    first.wait()
    caplog.set_level(logging.WARNING, logger=runlock.__name__)
    with runlock.run_lock(repo, wait_s=0) as info:  # wait_s=0: taken without waiting
        assert info["pid"] == os.getpid() and runlock.holder(repo)["pid"] == os.getpid()
    assert f"pid {first.pid} " in caplog.text and "ended without releasing" in caplog.text


@pytest.mark.slow
def test_a_second_make_run_refuses_in_one_line_before_prefect_starts(
    tmp_path: Path, holder
) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd="python -c \"open('out.txt','w').write('x')\"")
    first = holder(repo)
    second = subprocess.run(
        [PY, "-m", "flows.pipeline", "--repo", str(repo)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 1
    lines = (second.stdout + second.stderr).strip().splitlines()
    assert len(lines) == 1, lines  # no Prefect server, no flow run, no traceback
    assert lines[0].startswith("Pipeline not started: another pipeline run holds this workspace")
    assert f"pid {first.pid} " in lines[0] and "WAIT=1" in lines[0]
    assert not (repo / "out.txt").exists()


@pytest.mark.slow
def test_a_waiting_make_run_says_once_whom_it_waits_for(tmp_path: Path, holder) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd="python -c \"open('out.txt','w').write('x')\"")
    first = holder(repo)
    second = subprocess.run(
        [PY, "-m", "flows.pipeline", "--repo", str(repo), "--wait", "--wait-timeout", "1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 1
    waiting = [line for line in second.stderr.splitlines() if "waiting up to 1 s" in line]
    assert len(waiting) == 1 and f"pid {first.pid} " in waiting[0], second.stderr
    assert second.stderr.count("Pipeline not started:") == 1 and "waited 1 s" in second.stderr


@pytest.mark.slow
def test_the_flow_refuses_before_ingest_while_another_run_holds_the_workspace(
    tmp_path: Path, holder, prefect_api: str
) -> None:
    from flows.pipeline import pipeline

    repo = _dvc_repo(tmp_path / "repo", cmd="python -c \"open('out.txt','w').write('x')\"")
    first = holder(repo)
    state = pipeline(repo=str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(runlock.RunLockBusy, match=rf"pid {first.pid} "):
        state.result()
    assert not (repo / "out.txt").exists()


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_a_killed_run_leaves_no_prefect_server(tmp_path: Path, reap: list) -> None:
    repo = _dvc_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    run = subprocess.Popen(
        [PY, "-m", "flows.pipeline", "--repo", str(repo)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    reap.append(run.pid)
    pid_file = repo / "stage.pid"
    stage = int(_wait_for("the stage", lambda: pid_file.exists() and pid_file.read_text(), 120))
    reap.append(stage)
    info = runlock.holder(repo)  # main() took the lock; the flow under it did not refuse itself
    assert info["pid"] == run.pid and "-m flows.pipeline" in info["command"]
    assert "(Prefect flow run " in info["command"]
    ((server_pid, _, what),) = info["helpers"]
    reap.append(server_pid)
    assert PREFECT_SERVER_APP in psutil.Process(server_pid).cmdline()
    assert what == "temporary Prefect server"
    run.kill()  # Prefect's atexit never runs; no other run comes
    run.wait()
    _wait_for("the orphaned Prefect server to stop", lambda: _gone(server_pid), timeout_s=30)
    _wait_for("the orphaned stage to stop", lambda: _gone(stage), timeout_s=30)


HOLD_WITH_HELPER = textwrap.dedent("""\
    import subprocess, sys
    import psutil
    from stages.common import runlock
    helper = subprocess.Popen(["sleep", "120"])
    with runlock.run_lock(sys.argv[1]):
        started = psutil.Process(helper.pid).create_time()
        runlock.update_holder(sys.argv[1], helpers=[[helper.pid, started, "test helper"]])
        print(helper.pid, flush=True)
        sys.stdin.read()
    """)


def test_the_next_run_stops_the_helpers_a_killed_holder_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = _plain_repo(tmp_path / "repo")
    first = subprocess.Popen(
        [PY, "-c", HOLD_WITH_HELPER, str(repo)],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    helper = int(first.stdout.readline())
    try:
        assert runlock.holder(repo)["helpers"][0][0] == helper
        first.kill()  # no watcher here: the helper outlives it
        first.wait()
        assert not _gone(helper)
        caplog.set_level(logging.WARNING, logger=runlock.__name__)
        with runlock.run_lock(repo, wait_s=0):
            assert _gone(helper)
        assert f"pid {helper} (test helper)" in caplog.text
    finally:
        if not _gone(helper):
            psutil.Process(helper).kill()


def test_stop_helpers_leaves_a_reused_pid_alone() -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        started = psutil.Process(other.pid).create_time()
        # The recorded create time differs: the pid now belongs to another process.
        assert runlock.stop_helpers({"helpers": [[other.pid, started - 5, "server"]]}) == []
        assert other.poll() is None
        assert runlock.stop_helpers({"helpers": [[other.pid, started, "server"]]}) == [other.pid]
        assert other.wait(timeout=10) is not None
    finally:
        other.kill()
        other.wait()


# --- stage processes die with their parent ----------------------------------------------------


@pytest.mark.parametrize(
    "cmd",
    ["python stage.py", "python stage.py; true"],
    ids=["shell-execs-the-stage", "shell-stays-between"],
)
def test_killing_dvc_repro_stops_its_stage(tmp_path: Path, cmd: str, reap: list) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd=cmd)
    dvc = subprocess.Popen(
        [PY, "-m", "dvc", "repro"],
        cwd=repo,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = repo / "stage.pid"
    stage = int(_wait_for("the stage", lambda: pid_file.exists() and pid_file.read_text()))
    reap += [stage, dvc.pid]
    dvc.kill()
    dvc.wait()
    _wait_for("the orphaned stage to stop", lambda: _gone(stage), timeout_s=5)
    assert not (repo / "out.txt").exists()


def test_killing_the_run_stops_dvc_and_stage_and_the_next_run_waits_for_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reap: list
) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd="python stage.py; true")
    run = subprocess.Popen(
        [PY, "-m", "flows.repro", "--repo", str(repo), "--no-push"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = repo / "stage.pid"
    stage = int(_wait_for("the stage", lambda: pid_file.exists() and pid_file.read_text()))
    dvc = [p.pid for p in psutil.Process(run.pid).children() if "dvc" in p.cmdline()]
    reap += [*dvc, stage]
    run.kill()
    run.wait()
    caplog.set_level(logging.WARNING, logger=runlock.__name__)
    with runlock.run_lock(repo, wait_s=0):
        # The lock is ours only once no process of the killed run is left in the workspace.
        assert _gone(stage) and all(_gone(pid) for pid in dvc)
    assert not (repo / "out.txt").exists()
    assert f"pid {run.pid} " in caplog.text


def test_a_plain_dvc_repro_and_its_stage_outlive_the_shell_that_started_it(
    tmp_path: Path, reap: list
) -> None:
    # `nohup dvc repro &`, then logout: the shell ends, dvc goes on, and so must its stage.
    repo = _dvc_repo(tmp_path / "repo", cmd="python stage.py")
    (repo / "stage.py").write_text(
        textwrap.dedent("""\
        import json, os, pathlib, time
        from stages.common import parent_watch
        parent_watch.die_with_parent()
        pathlib.Path("watched.json").write_text(json.dumps(parent_watch.watched()))
        open("stage.pid", "w").write(str(os.getpid()))
        while not pathlib.Path("go").exists():
            time.sleep(0.02)
        open("out.txt", "w").write("done")
        """)
    )
    shell = subprocess.Popen(
        ["sh", "-c", f"{PY} -m dvc repro; true"],
        cwd=repo,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = repo / "stage.pid"
    stage = int(_wait_for("the stage", lambda: pid_file.exists() and pid_file.read_text()))
    dvc = next(p for p in psutil.Process(shell.pid).children() if "dvc" in p.cmdline())
    reap += [stage, dvc.pid]
    watched = json.loads((repo / "watched.json").read_text())
    assert dvc.pid in watched and shell.pid not in watched
    shell.kill()  # the logout
    shell.wait()
    (repo / "go").touch()
    _wait_for("dvc to finish", lambda: _gone(dvc.pid), timeout_s=60)
    assert (repo / "out.txt").read_text() == "done"
    assert "out.txt" in (repo / "dvc.lock").read_text()  # dvc recorded the stage's output


def test_a_stage_under_the_run_watches_the_run_holding_the_lock(tmp_path: Path, reap: list) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd="python stage.py; true")
    (repo / "stage.py").write_text(
        textwrap.dedent("""\
        import json, pathlib, time
        from stages.common import parent_watch
        parent_watch.die_with_parent()
        pathlib.Path("watched.json").write_text(json.dumps(parent_watch.watched()))
        while not pathlib.Path("go").exists():
            time.sleep(0.02)
        pathlib.Path("out.txt").write_text("done")
        """)
    )
    run = subprocess.Popen(
        [PY, "-m", "flows.repro", "--repo", str(repo), "--no-push"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    reap.append(run.pid)
    file = repo / "watched.json"
    watched = json.loads(str(_wait_for("the stage", lambda: file.exists() and file.read_text())))
    (repo / "go").touch()
    assert run.wait(timeout=60) == 0
    assert watched[-1] == run.pid and len(watched) == 3  # sh -c, dvc, the run


def test_a_stage_whose_parent_died_before_the_hook_refuses_to_run(
    tmp_path: Path, reap: list
) -> None:
    child = textwrap.dedent("""\
        import pathlib, time
        from stages.common import parent_watch  # notes the parent's pid (as run_main's)
        pathlib.Path("ready").touch()
        while not pathlib.Path("go").exists():
            time.sleep(0.02)
        try:
            parent_watch.die_with_parent()
            pathlib.Path("result").write_text("ran")
        except parent_watch.PipelineError as exc:
            pathlib.Path("result").write_text(str(exc))
        """)
    parent = subprocess.Popen(
        [
            PY,
            "-c",
            (
                "import subprocess, sys, time; "
                "subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
                "time.sleep(60)"
            ),
            child,
        ],
        cwd=tmp_path,
        env={**ENV, "DVC_STAGE": "work"},
    )
    _wait_for("the child", (tmp_path / "ready").exists)
    reap += [p.pid for p in psutil.Process(parent.pid).children()]
    parent.kill()
    parent.wait()
    (tmp_path / "go").touch()
    result = _wait_for(
        "the child's verdict",
        lambda: (tmp_path / "result").exists() and (tmp_path / "result").read_text(),
    )
    assert result == (
        f"the process that started this one (pid {parent.pid}) has ended; not running orphaned"
    )


def test_torchrun_ranks_stop_when_the_launching_stage_is_killed(tmp_path: Path, reap: list) -> None:
    rank = textwrap.dedent("""\
        import os, time
        from stages.common import parent_watch
        parent_watch.die_with_parent()
        open(f"rank{os.environ['RANK']}.pid", "w").write(str(os.getpid()))
        time.sleep(120)
        """)
    (tmp_path / "rank.py").write_text(rank)
    # The train stage's launcher (distributed.launch_torchrun), as DVC runs it (DVC_STAGE set).
    launcher = subprocess.Popen(
        [
            PY,
            "-c",
            (
                "import subprocess, sys, time; subprocess.Popen([sys.executable, '-m', "
                "'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'rank.py']); "
                "time.sleep(120)"
            ),
        ],
        cwd=tmp_path,
        env={**ENV, "DVC_STAGE": "train"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    files = [tmp_path / f"rank{r}.pid" for r in (0, 1)]
    _wait_for("both ranks", lambda: all(f.exists() and f.read_text() for f in files), 60)
    ranks = [int(f.read_text()) for f in files]
    torchrun = psutil.Process(ranks[0]).parent().pid
    reap += [*ranks]
    launcher.kill()
    launcher.wait()
    _wait_for("the ranks to stop", lambda: all(_gone(pid) for pid in ranks), timeout_s=15)
    _wait_for("torchrun to stop", lambda: _gone(torchrun), timeout_s=30)


# --- leftovers of a killed run ----------------------------------------------------------------


def _project_layout(repo: Path) -> Path:
    (repo / ".dvc" / "tmp").mkdir(parents=True)
    (repo / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    return repo


def test_temp_folders_a_killed_stage_left_are_removed_at_its_next_start(
    tmp_path: Path, holder
) -> None:
    repo = _project_layout(tmp_path / "repo")
    writer = textwrap.dedent("""\
        import sys
        from stages.common.io import atomic_path
        with atomic_path(sys.argv[1]) as tmp:
            tmp.mkdir()
            (tmp / "part-0.parquet").write_bytes(b"half")
            print(tmp.parent, flush=True)
            sys.stdin.read()
        """)
    killed = subprocess.Popen(
        [PY, "-c", writer, str(repo / "data" / "validated")],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    left = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait()
    assert left.parent == repo / "data" and left.name.startswith(".validated.")
    other_stage = repo / "data" / ".features.abcd1234"  # features' own: not validate's to remove
    not_ours = repo / "data" / ".validated.keep"
    for path in (other_stage, not_ours):
        path.mkdir()
    a_while_ago = time.time() - 5  # the kill was a while ago (process start times are coarse)
    for path in (left, other_stage, not_ours):
        os.utime(path, (a_while_ago, a_while_ago))
    # No logging configured (as under Prefect's console handler, WARNING and up): the user
    # still sees what was removed.
    clean = (
        "import sys; from stages.common.runlock import remove_stale_temp_dirs; "
        "print(len(remove_stale_temp_dirs('validate', sys.argv[1])))"
    )
    # While another run holds the workspace, its stage may be writing there: nothing goes.
    first = holder(repo)
    out = subprocess.run(
        [PY, "-c", clean, str(repo)], env=ENV, capture_output=True, text=True, check=False
    )
    assert out.stdout.strip() == "0" and left.exists()
    first.kill()
    first.wait()
    out = subprocess.run(
        [PY, "-c", clean, str(repo)], env=ENV, capture_output=True, text=True, check=False
    )
    assert out.stdout.strip() == "1", out.stderr
    assert not left.exists() and other_stage.exists() and not_ours.exists()
    assert "removed 1 temp folder(s) a killed run left" in out.stderr


def test_temp_folders_newer_than_the_stage_process_are_kept(tmp_path: Path) -> None:
    repo = _project_layout(tmp_path / "repo")
    old, new = repo / "reports" / ".validation.old12345", repo / "reports" / ".validation.new12345"
    for path in (old, new):
        path.mkdir(parents=True)
    long_ago = psutil.Process().create_time() - 60
    os.utime(old, (long_ago, long_ago))
    assert runlock.remove_stale_temp_dirs("validate", repo) == [old]
    assert new.exists()
    with atomic_path(repo / "models") as tmp:  # repo-level output (train): same rule
        tmp.mkdir()
        assert runlock.remove_stale_temp_dirs("train", repo) == []


def test_a_stage_main_called_in_process_leaves_temp_folders_and_forgets_its_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stages.common import cli, integrity, params_snapshot

    repo = _project_layout(tmp_path / "repo")
    left = repo / "data" / ".validated.abcd1234"  # could be a running `dvc repro`'s
    left.mkdir(parents=True)
    long_ago = psutil.Process().create_time() - 60
    os.utime(left, (long_ago, long_ago))
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(repo)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    seen = []

    def body(args, params) -> None:
        seen.append(integrity.snapshot_for("params.yaml"))

    code = cli.run_main("validate", cli.build_parser("validate", "test"), body, [])
    assert code == 0 and left.is_dir()  # a test or tool's main(): not a stage process
    assert seen[0].path == Path("params.yaml") and params_snapshot._current is None


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_stale_dvc_rwlock_entry_is_cleared_by_the_next_run(tmp_path: Path) -> None:
    repo = _dvc_repo(tmp_path / "repo", cmd="python -c \"open('out.txt','w').write('x')\"")
    out, code = str(repo / "out.txt"), str(repo / "stage.py")
    fake_dvc = tmp_path / "bin" / "dvc"
    fake_dvc.parent.mkdir()
    fake_dvc.symlink_to("/bin/sleep")
    live_dvc = subprocess.Popen([str(fake_dvc), "60"])  # a dvc someone runs: its entry stays
    unrelated = subprocess.Popen(["sleep", "60"])  # not a dvc: its pid was reused
    time.sleep(1.2)
    # The pid of DVC's killed process, now reused by a live process started after the entry
    # was written: DVC reports it as "busy" and asks the user to delete the file by hand.
    reused = subprocess.Popen(["sleep", "60"])
    try:
        rwlock = repo / ".dvc" / "tmp" / "rwlock"
        rwlock.write_text(
            json.dumps(
                {
                    "write": {out: {"pid": reused.pid, "cmd": "dvc repro"}},
                    "read": {
                        code: [
                            {"pid": _dead_pid(), "cmd": "dvc repro"},
                            {"pid": unrelated.pid, "cmd": "dvc repro"},
                            {"pid": live_dvc.pid, "cmd": "dvc status"},
                        ]
                    },
                }
            )
        )
        written = psutil.Process(live_dvc.pid).create_time() + 0.1
        os.utime(rwlock, (written, written))
        before = subprocess.run(
            [PY, "-m", "dvc", "repro"], cwd=repo, capture_output=True, check=False, text=True
        )
        assert before.returncode != 0 and "is busy" in before.stderr + before.stdout
        with runlock.run_lock(repo):
            kept = json.loads(rwlock.read_text())
            after = subprocess.run(
                [PY, "-m", "dvc", "repro"],
                cwd=repo,
                capture_output=True,
                check=False,
                text=True,
                pass_fds=runlock.inherited_fds(),
            )
        assert kept == {"read": {code: [{"pid": live_dvc.pid, "cmd": "dvc status"}]}}
        assert after.returncode == 0, after.stderr
        assert (repo / "out.txt").read_text() == "x"
    finally:
        for proc in (reused, unrelated, live_dvc):
            proc.kill()
            proc.wait()
