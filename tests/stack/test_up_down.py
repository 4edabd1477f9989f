"""`python -m stack up` (the ``stack_repo`` fixture), `up` again, `down`, `up` once more: real
PostgreSQL, SeaweedFS, MLflow and Prefect servers and a worker on 127.0.0.1, in a temporary
checkout with free ports."""

from __future__ import annotations

import json
import tempfile
import urllib.request
from pathlib import Path

import pytest

from stack import procs
from stack.objectstore import s3_client
from stack.pool import AUTOMATION, worker_names
from stack.settings import SECRETS_FILE, StackSettings
from tests.stack.harness import UP_TIMEOUT, StackHandle, run_stack, start_stack

pytestmark = pytest.mark.stack


def _post(url: str, body: dict | None = None) -> object:
    request = urllib.request.Request(
        url,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _pids(state: Path) -> dict[str, list[int]]:
    """Each running service's process tree (a worker's flow runs included)."""
    found = {}
    for pid_file in (state / "run").glob("*.pid"):
        pid = procs.running_pid(state, pid_file.stem)
        if pid is not None:
            found[pid_file.stem] = procs.process_tree(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _check_object_store(settings: StackSettings) -> None:
    s3 = s3_client(settings)
    s3.put_object(Bucket=settings.s3_bucket, Key="probe/hello.txt", Body=b"hello")
    body = s3.get_object(Bucket=settings.s3_bucket, Key="probe/hello.txt")["Body"].read()
    assert body == b"hello"
    wrong = s3_client(settings.model_copy(update={"aws_secret_access_key": "not-the-key"}))
    with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        wrong.put_object(Bucket=settings.s3_bucket, Key="probe/intruder.txt", Body=b"x")


def _check_mlflow(settings: StackSettings, tmp: Path) -> str:
    """Log a run with an artifact through the server; find the artifact in the bucket."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.mlflow_url)
    experiment = client.create_experiment("stack-probe")
    run = client.create_run(experiment)
    (tmp / "note.txt").write_text("proxied to the bucket")
    client.log_artifact(run.info.run_id, str(tmp / "note.txt"))
    client.set_terminated(run.info.run_id)
    keys = [
        item["Key"]
        for item in s3_client(settings)
        .list_objects_v2(Bucket=settings.s3_bucket, Prefix=settings.mlflow_artifacts_prefix)
        .get("Contents", [])
    ]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    return experiment


def _check_prefect(settings: StackSettings) -> None:
    api = settings.prefect_api_url
    with urllib.request.urlopen(f"{api}/health", timeout=10) as response:
        assert json.load(response) is True
    with urllib.request.urlopen(f"{api}/work_pools/{settings.work_pool}", timeout=10) as response:
        assert json.load(response)["type"] == "process"
    workers = _post(f"{api}/work_pools/{settings.work_pool}/workers/filter")
    assert {w["name"]: w["status"] for w in workers} == dict.fromkeys(
        worker_names(settings), "ONLINE"
    )
    automations = _post(f"{api}/automations/filter")
    crash = [a for a in automations if a["name"] == AUTOMATION]
    assert len(crash) == 1 and crash[0]["trigger"]["posture"] == "Proactive"
    assert crash[0]["trigger"]["within"] == settings.crashed_after_s


def test_up_serves_then_down_stops_all_and_keeps_data(
    stack_repo: StackHandle, tmp_path: Path
) -> None:
    repo, env, settings = stack_repo.repo, stack_repo.env, stack_repo.settings
    state = settings.state_dir(repo)
    secrets = (state / SECRETS_FILE).read_text()
    assert (state / SECRETS_FILE).stat().st_mode & 0o777 == 0o600
    _check_object_store(settings)
    experiment = _check_mlflow(settings, tmp_path)
    _check_prefect(settings)
    local = (repo / ".dvc" / "config.local").read_text()
    assert settings.dvc_remote_url in local and settings.s3_endpoint in local
    assert settings.aws_secret_access_key not in local

    before = _pids(state)
    again = run_stack(repo, env, "up", UP_TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert "started in" not in again.stdout  # every service was reused
    assert {k: v[0] for k, v in _pids(state).items()} == {k: v[0] for k, v in before.items()}

    down = run_stack(repo, env, "down", 300)
    assert down.returncode == 0, down.stderr
    left = [pid for tree in before.values() for pid in tree if _alive(pid)]
    assert left == [], f"processes left after down: {left}\n{down.stdout}"
    assert not list((state / "run").glob("*.pid"))
    assert not list(Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{settings.s3_port}.sock"))

    start_stack(repo, env)  # the data is still there, and the same keys still work
    assert (state / SECRETS_FILE).read_text() == secrets
    s3 = s3_client(settings)
    assert (
        s3.get_object(Bucket=settings.s3_bucket, Key="probe/hello.txt")["Body"].read() == b"hello"
    )
    from mlflow import MlflowClient

    assert MlflowClient(settings.mlflow_url).get_experiment(experiment).name == "stack-probe"
    status = run_stack(repo, env, "status", 60)
    assert status.returncode == 0, status.stdout
