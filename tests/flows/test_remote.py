"""``flows.remote`` (deploy / run on the stack), the pushed-state per DVC remote, and
``reproduce --remote NAME``, without the stack: a stack that is down, a real temporary Prefect
API for the deployment, real DVC configs. The run through a worker is the stack's end-to-end
test (tests/stack/test_stack_e2e.py)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from flows import remote, reproduce
from flows.pipeline import note_push, pushed_already
from stack.settings import load_settings
from tests.conftest import ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkout(dest: Path, deployment: str = "daily") -> Path:
    """What deploy and run read from a checkout: stack.env, params.yaml, the flow's file."""
    (dest / "stack").mkdir(parents=True)
    shutil.copy2(ROOT / "stack" / "stack.env", dest / "stack" / "stack.env")
    (dest / "flows").mkdir()
    for flow_file in ("pipeline_flow.py", "monitor.py"):
        shutil.copy2(ROOT / "flows" / flow_file, dest / "flows" / flow_file)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["schedule"]["deployment"] = deployment
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


def _flow_runs() -> set[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {str(run.id) for run in client.read_flow_runs()}


def test_a_stack_that_is_down_is_named_with_make_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = _checkout(tmp_path)
    prefect_port, mlflow_port = _free_port(), _free_port()  # nothing listens on either
    monkeypatch.setenv("PREFECT_PORT", str(prefect_port))
    monkeypatch.setenv("MLFLOW_PORT", str(mlflow_port))

    for command in ("run", "deploy"):
        assert remote.main([command, "--repo", str(repo)]) == 1
        err = capsys.readouterr().err
        assert f"http://127.0.0.1:{prefect_port}/api/health" in err
        assert f"http://127.0.0.1:{mlflow_port}/health" in err
        assert "`make up`" in err and f"flows.remote {command}:" in err


def test_mlflow_down_submits_nothing_to_a_live_prefect(
    prefect_api: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = _checkout(tmp_path)
    monkeypatch.setenv("PREFECT_PORT", str(urlsplit(prefect_api).port))
    monkeypatch.setenv("MLFLOW_PORT", str(_free_port()))
    before = _flow_runs()

    assert remote.main(["run", "--repo", str(repo)]) == 1

    err = capsys.readouterr().err
    assert "the MLflow server at http://127.0.0.1:" in err and "Prefect API" not in err
    assert _flow_runs() == before


def test_deploy_makes_one_pool_deployment_from_the_checkout(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    repo = _checkout(tmp_path / "repo", deployment="remote-test")
    monkeypatch.setenv("WORK_POOL", "remote-test-pool")
    monkeypatch.setenv("PIPELINE_CONCURRENCY", "1")
    settings = load_settings(repo)
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name="remote-test-pool", type="process"), overwrite=True
        )

    first = remote.deploy(repo.resolve(), settings)
    again = remote.deploy(repo.resolve(), settings)  # idempotent: the same deployment, updated

    assert again == first
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(first)
        name = remote.deployment_name(repo)
        assert client.read_deployment_by_name(name).id == deployment.id
    assert name == "pipeline/remote-test"
    assert deployment.work_pool_name == "remote-test-pool"
    assert deployment.entrypoint == remote.ENTRYPOINT
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(repo.resolve())}}
    ]
    assert deployment.parameters["repo"] == str(repo.resolve())
    assert deployment.parameters["dvc_remote"] == "stack"
    (schedule,) = deployment.schedules
    assert (
        schedule.schedule.cron
        == yaml.safe_load((repo / "params.yaml").read_text())["schedule"]["cron"]
    )
    # one run per workspace: a deployment concurrency limit, queued (shown in the UI)
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    with get_client(sync_client=True) as client:
        # the monitor's retraining trigger, once (deploying again replaced it)
        [automation] = client.read_resource_related_automations(
            f"prefect.deployment.{deployment.id}"
        )
        [action] = automation.actions
        assert action.parameters == {"reason": "{{ event.payload.reason }}"}
        assert automation.trigger.match.get("prefect.resource.id") == [
            f"pipeline.model.{params['register']['model_name']}"
        ]
        monitor = client.read_deployment_by_name(remote.monitor_deployment_name(repo))
    assert remote.monitor_deployment_name(repo) == "monitor/remote-test"
    assert monitor.work_pool_name == "remote-test-pool"
    assert monitor.entrypoint == remote.MONITOR_ENTRYPOINT
    assert monitor.parameters == {"repo": str(repo.resolve())}
    (cron,) = monitor.schedules
    assert cron.schedule.cron == params["monitor"]["cron"]
    assert monitor.global_concurrency_limit.limit == 1
    assert monitor.concurrency_options.collision_strategy.value == "CANCEL_NEW"


def test_deploy_and_run_refuse_a_pool_missing_or_without_workers(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    repo = _checkout(tmp_path / "repo", deployment="remote-idle")
    monkeypatch.setenv("WORK_POOL", "remote-idle-pool")
    settings = load_settings(repo)
    with pytest.raises(remote.RemoteError, match="no work pool 'remote-idle-pool'.*`make up`"):
        remote.deploy(repo.resolve(), settings)
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name="remote-idle-pool", type="process"), overwrite=True
        )
        with pytest.raises(remote.RemoteError, match="no deployment 'pipeline/remote-idle'"):
            remote.check_pool(client, settings, remote.deployment_name(repo))
        remote.deploy(repo.resolve(), settings)
        before = _flow_runs()
        with pytest.raises(remote.RemoteError, match="no worker online.*'remote-idle-pool'"):
            remote.check_pool(client, settings, remote.deployment_name(repo))
    assert _flow_runs() == before


def test_a_push_is_noted_per_remote(tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")

    note_push(tmp_path, "stack")

    assert pushed_already(tmp_path, "stack")
    assert not pushed_already(tmp_path)  # the default remote has not got it
    note_push(tmp_path)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert not pushed_already(tmp_path, "stack") and not pushed_already(tmp_path)


def _dvc(repo: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, check=True, capture_output=True)


def test_reproduce_copies_a_named_remote_whole(tmp_path: Path) -> None:
    from dvc.config import Config

    repo, workspace = tmp_path / "repo", tmp_path / "ws"
    for path in (repo, workspace):
        path.mkdir()
        _dvc(path, "init", "--no-scm", "-q")
    _dvc(repo, "remote", "add", "-d", "local", "../store")
    _dvc(repo, "remote", "add", "--local", "stack", "s3://pipeline/dvc")
    _dvc(repo, "remote", "modify", "--local", "stack", "endpointurl", "http://127.0.0.1:8333")
    _dvc(repo, "remote", "modify", "--local", "stack", "region", "us-east-1")

    assert reproduce.is_remote_name(repo, "stack")
    assert not reproduce.is_remote_name(repo, "s3://pipeline/dvc")
    assert not reproduce.is_remote_name(repo, "elsewhere")  # a relative path, as before
    config = reproduce.read_remote_config(repo, "stack")
    reproduce.write_remote_config(workspace, config)

    copied = Config(dvc_dir=str(workspace / ".dvc")).load_one("local")
    assert copied["core"]["remote"] == reproduce.REMOTE_NAME
    origin = copied["remote"][reproduce.REMOTE_NAME]
    assert origin["url"] == "s3://pipeline/dvc"
    assert origin["endpointurl"] == "http://127.0.0.1:8333"
    assert origin["region"] == "us-east-1"
    assert reproduce.read_remote_config(repo)["url"] == str(tmp_path / "store")  # the default
    with pytest.raises(reproduce.ReproduceError, match=r"no DVC remote 'nope' \(configured: "):
        reproduce.read_remote_config(repo, "nope")
