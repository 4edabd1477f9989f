"""The issue's end-to-end test: the pipeline on the server stack, through its worker.

One checkout (the project, TINY params, committed) and one stack (PostgreSQL, SeaweedFS S3,
the MLflow and Prefect servers, a process worker) on free ports on 127.0.0.1. It deploys the
pipeline (``flows.remote deploy``), runs it through the worker (``flows.remote run``, as ``make
run REMOTE=1``) and checks: the flow run Completed on the Prefect server; ``champion`` in the
MLflow server's registry with its artifacts as objects in the bucket; the DVC objects in the
bucket; ``reproduce --stack`` of that version into a clean workspace matches its metrics
exactly. Then a second run (train's params changed) loses its worker (SIGKILL to the worker's
process tree, its flow-run process included) once train has started: the stack's automation
marks it Crashed once its heartbeats stop, ``flows.remote run`` exits 1 naming the state, and
after ``stack up`` restarts the worker a rerun completes.

Bounded: every wait has a deadline (heartbeats every 30 s, Crashed after 50 s of silence); the
stack is taken down and its data removed even when a check fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_PARAMS, deep_merge, make_pipeline_repo, write_params
from tests.stack.harness import (
    StackHandle,
    require_postgres,
    run_stack,
    stack_env,
    start_stack,
    stop_stack,
)

pytestmark = [pytest.mark.slow, pytest.mark.stack]

MODEL = "classifier"
HEARTBEAT_S, CRASHED_AFTER_S = 30, 50  # the settings' minimum heartbeat; silence -> Crashed
RUN_TIMEOUT_S = 420  # one tiny pipeline run on 2 busy cores takes about 90 s
_FLOW_RUN_URL = re.compile(r"/runs/flow-run/(?P<id>[0-9a-f-]{36})")


@pytest.fixture(scope="module")
def stack() -> Iterator[StackHandle]:
    """The project in a committed temp checkout, with the whole stack up in it."""
    require_postgres()
    # Under /tmp, reachable by PostgreSQL's user when we are root (not pytest's tmp_path).
    repo = Path(tempfile.mkdtemp(prefix="stack-e2e-"))
    repo.chmod(0o755)
    env = stack_env()
    env.update(FLOW_HEARTBEAT_S=str(HEARTBEAT_S), CRASHED_AFTER_S=str(CRASHED_AFTER_S))
    try:
        make_pipeline_repo(repo)  # committed, stack/ included (tests/conftest.py PROJECT_FILES)
        started = time.monotonic()
        settings = start_stack(repo, env)
        print(f"stack up: {time.monotonic() - started:.1f} s", file=sys.stderr)
        yield StackHandle(repo=repo, env=env, settings=settings)
    finally:
        stop_stack(repo, env, purge=True)
        shutil.rmtree(repo, ignore_errors=True)


def _command(stack: StackHandle, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``python -m <args>`` in the checkout, as a user's shell there would run it."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=stack.repo,
        env={**stack.env, "PYTHONPATH": str(stack.repo)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _prefect(stack: StackHandle):  # noqa: ANN202 - a context manager yielding a sync client
    from contextlib import ExitStack

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    held = ExitStack()
    held.enter_context(
        temporary_settings(updates={PREFECT_API_URL: stack.settings.prefect_api_url})
    )
    client = held.enter_context(get_client(sync_client=True))
    return held, client


def _bucket_keys(stack: StackHandle, prefix: str) -> list[str]:
    import boto3

    s = stack.settings
    s3 = boto3.client(
        "s3",
        endpoint_url=s.s3_endpoint,
        aws_access_key_id=s.aws_access_key_id,
        aws_secret_access_key=s.aws_secret_access_key,
        region_name=s.s3_region,
    )
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s.s3_bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def _wait_for(what: str, check, timeout_s: float, every_s: float = 1.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and every descendant (its flow runs in their own sessions too)."""
    from stack.procs import process_tree

    pids = process_tree(pid)  # the whole tree first: killed children would be re-parented
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)
    return pids


def test_the_pipeline_on_the_stack_then_a_killed_worker(stack: StackHandle) -> None:
    from mlflow import MlflowClient

    repo, settings = stack.repo, stack.settings
    held, prefect = _prefect(stack)
    _last[0] = time.monotonic()
    with held:
        # --- deploy, run through the worker -----------------------------------------------
        deployed = _command(stack, "flows.remote", "deploy", "--repo", ".", timeout=180)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        first = _command(
            stack, "flows.remote", "run", "--repo", ".", "--timeout", str(RUN_TIMEOUT_S),
            timeout=RUN_TIMEOUT_S + 60,
        )  # fmt: skip
        _phase("deploy + pipeline run on the stack")
        assert first.returncode == 0, first.stdout[-5000:] + first.stderr[-3000:]
        assert "| register | ran |" in first.stdout  # the run summary artifact, printed
        flow_run_id = _FLOW_RUN_URL.search(first.stdout)["id"]
        assert prefect.read_flow_run(flow_run_id).state.is_completed()
        deployment = prefect.read_deployment(prefect.read_flow_run(flow_run_id).deployment_id)
        assert deployment.global_concurrency_limit.limit == settings.pipeline_concurrency

        # --- champion in the registry, its artifacts in the bucket ------------------------
        mlflow = MlflowClient(tracking_uri=settings.mlflow_url, registry_uri=settings.mlflow_url)
        champion = mlflow.get_model_version_by_alias(MODEL, "champion")
        registration = json.loads((repo / "reports/registration.json").read_text())
        assert int(champion.version) == registration["version"]
        prefix = settings.mlflow_artifacts_prefix.strip("/") + "/"
        artifacts = _bucket_keys(stack, prefix)
        model_id = champion.source.removeprefix("models:/").split("/")[0]
        mine = [key for key in artifacts if model_id in key or champion.run_id in key]
        assert any(key.endswith("MLmodel") for key in mine), (champion.source, artifacts[:20])
        assert not (repo / "mlruns").exists() and not (repo / "mlartifacts").exists()

        # --- the DVC objects in the bucket ------------------------------------------------
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        dvc_keys = _bucket_keys(stack, settings.dvc_prefix.strip("/") + "/files/md5/")
        # every directory output (data/raw, data/features, models, ...): its .dir listing
        outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
        pushed = {out["path"]: out["md5"] for out in outs if out["md5"].endswith(".dir")}
        assert {"data/raw", "data/features", "models"} <= set(pushed), pushed
        for md5 in pushed.values():
            assert any(key.endswith(f"/{md5[:2]}/{md5[2:]}") for key in dvc_keys), md5

        # --- reproduce the champion from the bucket, in a clean workspace ------------------
        metrics = json.loads((repo / "reports/metrics.json").read_text())
        workdir = Path(tempfile.mkdtemp(prefix="stack-e2e-reproduce-")) / "ws"
        try:
            again = _command(
                stack, "flows.reproduce", f"{MODEL}@champion", "--repo", ".", "--stack",
                "--workdir", str(workdir), timeout=300,
            )  # fmt: skip
            assert again.returncode == 0, again.stdout + again.stderr[-4000:]
            assert "match exactly" in again.stdout
            assert json.loads((workdir / "reports/metrics.json").read_text()) == metrics
            assert "url = s3://" in (workdir / ".dvc/config.local").read_text()
            _phase("checks + reproduce from the bucket")
        finally:
            shutil.rmtree(workdir.parent, ignore_errors=True)

        # --- a second run loses its worker mid-train: Crashed --------------------------------
        write_params(repo, deep_merge(TINY_PARAMS, {"train": {"max_epochs": 16}}))
        with _follow_in_background(stack) as (killed, lines):
            run_id = _wait_for(
                "the second flow run's id", lambda: _first_id(lines), timeout_s=120, every_s=0.5
            )
            _wait_for(
                "the train task to start",
                lambda: _task_running(prefect, run_id, "train"),
                timeout_s=RUN_TIMEOUT_S,
                every_s=0.5,
            )
            (pid_file,) = (repo / ".stack" / "run").glob("worker-*.pid")
            assert len(_kill_tree(int(pid_file.read_text().split()[0]))) >= 2  # worker + flow run
            _phase("second run killed once train started")
            state = _wait_for(
                "the automation to mark the run Crashed",
                lambda: (s := prefect.read_flow_run(run_id).state).is_final() and s,
                timeout_s=CRASHED_AFTER_S + 120,
                every_s=2,
            )
            assert state.is_crashed(), (state.name, state.message)
            assert "No heartbeat" in (state.message or ""), state.message  # the stack's automation
            _phase("marked Crashed")
            assert killed.wait(timeout=60) == 1
            assert "Crashed" in "".join(lines)

        # --- worker restarted by `stack up`, the rerun completes -------------------------
        restarted = run_stack(repo, stack.env, "up", timeout=300)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        rerun = _command(
            stack, "flows.remote", "run", "--repo", ".", "--timeout", str(RUN_TIMEOUT_S),
            timeout=RUN_TIMEOUT_S + 60,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stdout[-5000:] + rerun.stderr[-3000:]
        assert "| train | ran |" in rerun.stdout
        _phase("worker restarted + rerun")


_last = [time.monotonic()]


def _phase(name: str) -> None:
    """Print how long the phase that just ended took (the test's own timing, on stderr)."""
    now = time.monotonic()
    print(f"{name}: {now - _last[0]:.1f} s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    _last[0] = now


@contextmanager
def _follow_in_background(stack: StackHandle) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """``flows.remote run`` started, its output collected line by line as it comes; killed on
    exit if still running (a failed check)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.remote", "run", "--repo", ".", "--timeout", "600"],
        cwd=stack.repo,
        env={**stack.env, "PYTHONPATH": str(stack.repo)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _first_id(lines: list[str]) -> str | None:
    for line in list(lines):
        if match := _FLOW_RUN_URL.search(line):
            return match["id"]
    return None


def _task_running(prefect, flow_run_id: str, name: str) -> bool:  # noqa: ANN001
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    task_runs = prefect.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    )
    return any(
        run.name.startswith(f"{name}-") and run.state is not None and run.state.is_running()
        for run in task_runs
    )
