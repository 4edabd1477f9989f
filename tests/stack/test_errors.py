"""What `stack up` says when a service cannot start: the setting to change, or the tail of the
service's log."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

import pytest

from stack import procs, servers
from stack.settings import SETTINGS_FILE, StackError, load_settings
from tests.stack.harness import ROOT


def test_a_taken_port_names_its_setting(tmp_path: Path) -> None:
    (tmp_path / "stack").mkdir()
    shutil.copy(ROOT / SETTINGS_FILE, tmp_path / SETTINGS_FILE)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(tmp_path, {"MLFLOW_PORT": str(port)})
        with pytest.raises(StackError, match=rf"mlflow: port {port} .* set MLFLOW_PORT"):
            servers.mlflow_up(settings, settings.state_dir(tmp_path))


def test_a_service_that_dies_while_starting_shows_its_log(tmp_path: Path) -> None:
    code = "import sys; print('cannot open the store: boom', flush=True); sys.exit(3)"
    pid = procs.start_detached(
        "mlflow", [sys.executable, "-c", code], state=tmp_path, env={}, cwd=tmp_path, markers=[]
    )
    with pytest.raises(StackError, match=r"(?s)mlflow exited while starting.*boom"):
        procs.wait_until(lambda: False, service="mlflow", state=tmp_path, timeout=30, pid=pid)


def test_a_timeout_shows_the_log_tail(tmp_path: Path) -> None:
    log = procs.log_file(tmp_path, "prefect-server")
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {n}\n" for n in range(100)) + "migrating...\n")
    with pytest.raises(StackError) as error:
        procs.wait_until(lambda: False, service="prefect-server", state=tmp_path, timeout=0.5)
    message = str(error.value)
    assert "did not come up to answer within 0 s" in message and "migrating..." in message
    assert "line 99" in message and "line 10\n" not in message  # the tail only
