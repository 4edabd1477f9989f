"""``make tune`` with ``tune.executor: dask``: the trials on two real Dask workers (a ``dask
scheduler`` and two ``dask worker`` processes on 127.0.0.1), a worker killed mid-trial (the
local cluster's), and the checks that refuse a cluster before anything starts."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.client.schemas.sorting import FlowRunSort

from flows import tune
from stages.common.config import load_params, parse_params
from stages.common.errors import ConfigError
from stages.train import tuning
from tests.flows.test_tune import TINY_TRAIN, _study, make_workspace
from tests.postgres import free_port

ROOT = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).parent / "dask"
LR = {"low": 0.001, "high": 0.03, "log": True}
# random search, no pruner: 4 trials that each train their few epochs
TUNE = {"executor": "dask", "parallel": 2, "sampler": "random", "pruner": "none",
        "space": {"mlp": {"lr": LR}}}  # fmt: skip


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [str(DASK), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the workers import flows.tune
        start_new_session=True,  # its own group: the teardown stops the nanny and its worker
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def dask_cluster() -> Iterator[str]:
    """A ``dask scheduler`` and two one-thread ``dask worker`` processes on 127.0.0.1; yields
    the scheduler's address once both workers are connected."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    procs = [_start(["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                     "--no-dashboard", "--dashboard-address", "127.0.0.1:0"])]  # fmt: skip
    try:
        for name in ("w1", "w2"):
            procs.append(_start(["worker", address, "--name", name, "--nthreads", "1",
                                 "--host", "127.0.0.1", "--no-dashboard"]))  # fmt: skip
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.mark.stack
def test_trials_run_on_both_dask_workers(
    tmp_path: Path,
    mlflow_uri: str,
    prefect_api: str,
    dask_cluster: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = make_workspace(
        tmp_path / "ws",
        {"train": TINY_TRAIN, "tune": {**TUNE, "dask_address": dask_cluster}},
        monkeypatch,
    )

    assert tune.main(["--repo", str(repo), "--trials", "4"]) == 0

    study = _study(repo)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    printed = capsys.readouterr().out
    assert "Dask workers: 2 (tcp://127.0.0.1:" in printed, printed
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(study.user_attrs[tuning.PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3]
    # the workers reported the trials' task runs to the flow's Prefect API (the test harness)
    with get_client(sync_client=True) as prefect:
        (run,) = prefect.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
    assert sorted((t.name, t.state.type.value) for t in tasks) == [
        (f"trial-{i}", "COMPLETED") for i in range(4)
    ]
    # the best value in params.yaml, as with threads
    best = study.best_trial.user_attrs[tuning.VALUES_ATTR]
    assert load_params(repo / "params.yaml").train.lr == best["lr"]


def _training(repo: Path) -> list[int]:
    """The numbers of the RUNNING trials that reported an epoch (training, past start-up)."""
    db = repo / "data/tune/studies.db"
    query = (
        "SELECT t.number FROM trials t WHERE t.state = 'RUNNING' AND EXISTS (SELECT 1 FROM "
        "trial_intermediate_values v WHERE v.trial_id = t.trial_id) ORDER BY t.number"
    )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return [number for (number,) in conn.execute(query)]
    except sqlite3.OperationalError:  # no database or tables yet
        return []


def _kill_a_worker_mid_trial(repo: Path, proc: subprocess.Popen) -> int:
    """SIGKILL the Dask worker process running the first trial to train; return the trial."""
    deadline = time.monotonic() + 180
    while not (training := _training(repo)):
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail("no trial got to train")
        time.sleep(0.2)
    trial = _study(repo).trials[training[0]]
    _, pid, _ = trial.user_attrs[tuning.PROCESS_ATTR]
    worker = psutil.Process(pid).parent()  # the trial's parent: the Dask worker process
    assert worker is not None and worker.pid != proc.pid  # not the flow's own process
    worker.kill()
    return trial.number


@pytest.mark.stack
def test_a_worker_killed_mid_trial_fails_that_trial_and_the_next_round_runs_it(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local cluster, as ``make tune`` starts it, with Prefect's temporary server: the
    workers report to the flow's (its database in a PREFECT_HOME of the test's own)."""
    repo = make_workspace(
        tmp_path / "ws",
        {"train": {**TINY_TRAIN, "max_epochs": 60, "patience": 60}, "tune": TUNE},
        monkeypatch,
    )
    command = [sys.executable, "-m", "flows.tune", "--repo", str(repo), "--trials", "2"]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    out_file = tmp_path / "tune.log"
    with open(out_file, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        killed = _kill_a_worker_mid_trial(repo, proc)
        proc.wait(timeout=300)  # no hang: the flow ends by itself
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = out_file.read_text(encoding="utf-8")
    assert proc.returncode == 0, out
    trials = _study(repo).get_trials()
    assert trials[killed].state == TrialState.FAIL  # the killed worker's trial
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2  # rerun: the target
    assert len(trials) == 3
    assert "This run: 3 trial(s) {'COMPLETE': 2, 'PRUNED': 0, 'FAIL': 1}" in out, out
    assert "a trial failed: the Dask worker running it ended (KilledWorker: " in out, out
    # one temporary Prefect server, the flow's: the workers report their task runs to it
    assert out.count("Starting temporary server on") == 1, out
    with contextlib.closing(sqlite3.connect(tmp_path / "prefect" / "prefect.db")) as conn:
        states = sorted(state for (state,) in conn.execute("SELECT state_type FROM task_run"))
    assert states == ["COMPLETED", "COMPLETED", "CRASHED"]  # the killed trial's: none Running


# --- refused before anything starts ---------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:8786", "tcp://host", "http://host:8786"])
def test_a_malformed_scheduler_address_is_refused_at_load(address: str) -> None:
    with pytest.raises(ConfigError, match=r"tune\.dask_address: .* tcp://host:8786"):
        parse_params({"tune": {"executor": "dask", "dask_address": address}})


def _params(repo: Path, tune_section: dict) -> Path:
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"tune": tune_section}))
    return repo


def test_a_remote_scheduler_with_a_sqlite_study_is_refused(tmp_path: Path) -> None:
    repo = _params(tmp_path / "ws", {"executor": "dask", "dask_address": "tcp://10.9.8.7:8786"})

    with pytest.raises(ConfigError, match=r"10\.9\.8\.7.*sqlite.*postgresql\+psycopg://"):
        tune.plan_study(repo, None, None, None)


def test_a_scheduler_address_with_threads_is_refused(tmp_path: Path) -> None:
    repo = _params(tmp_path / "ws", {"dask_address": "tcp://127.0.0.1:8786"})

    with pytest.raises(ConfigError, match=r"tune\.executor is threads: set tune\.executor: dask"):
        tune.plan_study(repo, None, None, None)


def test_a_scheduler_that_does_not_answer_is_named_at_once(
    tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    repo = _params(tmp_path / "ws", {"executor": "dask", "dask_address": address})
    (repo / ".dvc").mkdir()  # the run lock's workspace marker
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))

    started = time.monotonic()
    assert tune.main(["--repo", str(repo), "--trials", "2"]) == 1

    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert f"Tuning not started: params.yaml: tune.dask_address {address}: no Dask" in err, err
    assert "dask scheduler --port" in err and "dask_address: null" in err
    after = sorted(p.relative_to(repo) for p in repo.rglob("*") if ".dvc" not in p.parts)
    assert after == [p for p in before if ".dvc" not in p.parts]  # nothing written


def test_a_remote_scheduler_needs_a_prefect_api_the_workers_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # (the test harness: 127.0.0.1)
    repo = _params(
        tmp_path / "ws",
        {
            "executor": "dask",
            "dask_address": "tcp://10.9.8.7:8786",
            "storage": "postgresql+psycopg://tune@10.9.8.7/studies",
        },  # fmt: skip
    )

    with pytest.raises(
        ConfigError, match=r"Prefect API is .+ on this machine: set PREFECT_API_URL"
    ):
        tune.plan_study(repo, None, None, None)
