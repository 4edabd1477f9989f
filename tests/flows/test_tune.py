"""``make tune`` (flows/tune.py): the real flow on Prefect's test server, trials as real
processes, Optuna on sqlite and MLflow in temporary places, sklearn's breast cancer table; and
its planning and conclusion (the write-back decision) on their own."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from flows import tune, tune_report
from stages.common.config import load_params, parse_params
from stages.common.errors import ConfigError
from stages.common.io import write_parquet
from stages.features import stage as features
from stages.train import tune_write, tuning
from tests.builders import breast_cancer_frame

ROOT = Path(__file__).resolve().parents[2]
slow = pytest.mark.slow  # the flow tests run several training processes (~20-60 s)


def _merge(node, overrides: dict) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict) and key != "space":
            _merge(node[key], value)
        else:
            node[key] = value


def make_workspace(root: Path, overrides: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's commented params.yaml with ``overrides``, data/features from the real
    features stage and its test split garbled (tuning must never read it)."""
    rt = tune_write.round_trip_yaml()
    params = rt.load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    _merge(params, overrides)
    root.mkdir()
    (root / ".dvc").mkdir()  # the run lock's workspace marker
    out = io.StringIO()
    rt.dump(params, out)
    (root / "params.yaml").write_text(out.getvalue(), encoding="utf-8")
    write_parquet(root / "validated" / "data.parquet", breast_cancer_frame())
    features.run(root / "validated", root / "data" / "features", parse_params({}))
    (root / "data" / "features" / "test.parquet").write_bytes(b"garbled")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the trial processes import the project
    return root


def _study(repo: Path) -> optuna.Study:
    params = load_params(repo / "params.yaml")
    family = params.train.model
    settings = tuning.study_settings(params, family)
    name = tuning.study_name(params.ingest.source, family, repo / "data/features", settings)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{repo}/data/tune/studies.db")


LR = {"low": 0.001, "high": 0.03, "log": True}


def _states(repo: Path) -> list[tuple[str, int]]:
    """(state, has an MLflow run) of each trial, in order."""
    # read-only SQL while the flow creates the database: Optuna itself would race to create
    # its tables (``optuna.load_study`` on a database that is not set up yet)
    db = repo / "data/tune/studies.db"
    query = (
        "SELECT t.state, (SELECT COUNT(*) FROM trial_user_attributes a WHERE "
        f"a.trial_id = t.trial_id AND a.key = '{tuning.RUN_ATTR}') FROM trials t ORDER BY number"
    )
    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return list(conn.execute(query))
    except sqlite3.OperationalError:  # no tables yet
        return []


TINY_TRAIN = {"hidden_sizes": [8], "max_epochs": 3, "patience": 3, "batch_size": 64}


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@slow
def test_grid_in_parallel_writes_the_best_back(
    tmp_path: Path, mlflow_uri: str, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    space = {"lr": {"choices": [0.03, 0.003]}, "hidden_sizes": {"choices": [[8], [16, 8]]}}
    repo = make_workspace(
        tmp_path / "ws",
        {
            "train": TINY_TRAIN,
            "tune": {"sampler": "grid", "pruner": "none", "parallel": 2, "space": {"mlp": space}},
        },
        monkeypatch,
    )
    before = (repo / "params.yaml").read_text(encoding="utf-8")

    assert tune.main(["--repo", str(repo), "--trials", "10"]) == 0  # the grid has 4 points

    study = _study(repo)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert {(t.params["lr"], t.params["hidden_sizes"]) for t in trials} == {
        (lr, hs) for lr in (0.03, 0.003) for hs in ("[8]", "[16, 8]")
    }
    # two at a time: some trial started before another one had finished
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    # one MLflow run for the study, a child run per trial
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(study.user_attrs[tuning.PARENT_RUN_ATTR])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3]
    assert {r.data.tags["optuna.state"] for r in children} == {"COMPLETE"}
    # the best values in params.yaml, every other line (comments included) as it was
    after = (repo / "params.yaml").read_text(encoding="utf-8")
    best = study.best_trial.user_attrs[tuning.VALUES_ATTR]
    train = load_params(repo / "params.yaml").train
    assert (train.lr, train.hidden_sizes) == (best["lr"], best["hidden_sizes"])
    changed = [a for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert all(line.startswith(("  lr:", "  hidden_sizes:")) for line in changed)

    # again: the study holds its trials already (the data and family are the same): none run
    assert tune.main(["--repo", str(repo), "--trials", "4"]) == 0
    assert len(_study(repo).get_trials()) == 4


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@slow
def test_a_killed_tune_resumes_to_exactly_the_target(
    tmp_path: Path, mlflow_uri: str, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_workspace(
        tmp_path / "ws",
        {
            "train": {**TINY_TRAIN, "max_epochs": 120, "patience": 120},
            "tune": {"sampler": "tpe", "pruner": "none", "space": {"mlp": {"lr": LR}}},
        },
        monkeypatch,
    )
    command = [sys.executable, "-m", "flows.tune", "--repo", str(repo), "--trials", "3"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # a finished trial, and a later one training
            time.sleep(0.1)
            states = _states(repo)
            if ("COMPLETE", 1) in states and states[-1] == ("RUNNING", 1):
                break
        else:
            pytest.fail("the first tune never got to train a second trial")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow and its trial process: no clean-up
        proc.wait()
    study = _study(repo)
    killed = study.get_trials()[-1]
    assert killed.state == TrialState.RUNNING  # what a kill -9 leaves behind
    parent_run_id = study.user_attrs[tuning.PARENT_RUN_ATTR]

    assert tune.main(["--repo", str(repo), "--trials", "3"]) == 0

    study = _study(repo)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == 3  # exactly the target, the killed trial run again
    assert study.trials[killed.number].state == TrialState.FAIL
    killed_run = MlflowClient(mlflow_uri).get_run(killed.user_attrs[tuning.RUN_ATTR])
    assert (killed_run.info.status, killed_run.data.tags["optuna.state"]) == ("KILLED", "FAIL")
    assert study.user_attrs[tuning.PARENT_RUN_ATTR] == parent_run_id  # the same MLflow run
    assert MlflowClient(mlflow_uri).get_run(parent_run_id).info.status == "FINISHED"


# --- planning and concluding, without the flow ----------------------------------------------


def test_a_grid_over_a_continuous_range_is_refused_by_make_tune_only(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tune": {"sampler": "grid"}}))
    assert load_params(tmp_path / "params.yaml").tune.sampler == "grid"  # make run still loads

    with pytest.raises(ConfigError, match=r"grid needs choices.*tune\.space\.mlp\.lr, "):
        tune.plan_study(tmp_path, None, None, None)


def _finished_study(tmp_path: Path, values: dict) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/studies.db")
    trial = study.ask()
    trial.set_user_attr(tuning.VALUES_ATTR, values)
    study.tell(trial, 0.1)
    return study


def _plan(repo: Path, family: str, switch: bool = False, target: int = 1) -> dict:
    text = (repo / "params.yaml").read_text(encoding="utf-8")
    return {"repo": str(repo), "params_text": text, "family": family, "current_model": "mlp",
            "switch": switch, "target": target}  # fmt: skip


@pytest.fixture
def params_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return repo


def test_another_family_is_written_only_with_switch(tmp_path: Path, params_repo: Path) -> None:
    study = _finished_study(tmp_path, {"gbdt.learning_rate": 0.05, "gbdt.max_leaf_nodes": 16})
    before = (params_repo / "params.yaml").read_text(encoding="utf-8")

    changes, error, note = tune.conclude(_plan(params_repo, "gbdt"), study)

    assert (changes, error) == ({}, None)
    assert "tuned gbdt, but train.model is mlp" in note and "--switch" in note
    assert (params_repo / "params.yaml").read_text(encoding="utf-8") == before

    changes, error, note = tune.conclude(_plan(params_repo, "gbdt", switch=True), study)

    assert (error, note) == (None, None)
    assert changes["model"] == ["mlp", "gbdt"] and changes["gbdt.max_leaf_nodes"][1] == 16
    train = load_params(params_repo / "params.yaml").train
    assert (train.model, train.gbdt.learning_rate) == ("gbdt", 0.05)


def test_a_refused_write_back_says_the_target_was_reached(
    tmp_path: Path, params_repo: Path
) -> None:
    study = _finished_study(tmp_path, {"lr": 0.005})
    plan = _plan(params_repo, "mlp")
    with open(params_repo / "params.yaml", "a", encoding="utf-8") as handle:
        handle.write("# edited while tuning ran\n")

    changes, error, note = tune.conclude(plan, study)

    assert (changes, note) == ({}, None)
    assert error.startswith("tuning reached its target (1 trials finished), but params.yaml ")
    assert "changed while tuning ran" in error and "lr: 0.005" in error
    _, error, _ = tune.conclude(_plan(params_repo, "mlp", target=2), study)
    assert error == "tuning did not reach its target: 1 of 2 trials finished"


def test_the_parent_run_leaves_the_process_mlflow_settings_alone(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    before = mlflow.get_tracking_uri()
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/studies.db")
    plan = {"tracking_uri": mlflow_uri, "experiment": "x-tune", "study": "s",
            "storage": "sqlite:///s.db", "family": "mlp", "sampler": "tpe", "pruner": "none",
            "target": 1}  # fmt: skip

    run_id = tune_report.parent_run(plan, study)

    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == before
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.name == "x-tune"
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()
    db = mlflow_uri.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db)) as conn:  # parallel trials write to it
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert study.user_attrs[tuning.PARENT_RUN_ATTR] == run_id
