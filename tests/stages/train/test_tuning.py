"""Tuning's library (stages/train/tuning.py, tune_space.py, tune_write.py, tune_liveness.py)
and one trial (stages/train/trial.py): real Optuna on a sqlite storage, real MLflow, the real
features stage on sklearn's breast cancer table."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from stages.common.config import SearchRange, TrainParams, load_params, parse_params
from stages.common.errors import ConfigError, PipelineError
from stages.common.io import write_parquet
from stages.features import stage as features
from stages.train import trial as trial_process
from stages.train import tune_liveness, tune_space, tune_write, tuning
from tests.builders import breast_cancer_frame

ROOT = Path(__file__).resolve().parents[3]
R = SearchRange


def _study(tmp_path: Path, space: dict, sampler: str = "grid") -> optuna.Study:
    storage = tuning.open_storage(tuning.resolve_storage(f"sqlite:///{tmp_path}/s/studies.db"))
    return tuning.open_study(
        "s", storage, tuning.make_sampler(sampler, space, 0), optuna.pruners.NopPruner()
    )


def test_grid_visits_every_point_and_list_choices_come_back_as_lists(tmp_path: Path) -> None:
    space = {"hidden_sizes": R(choices=[[8], [16, 8]]), "dropout": R(low=0.0, high=0.2, step=0.1)}
    study = _study(tmp_path, space)
    seen = []
    for _ in range(tune_space.grid_size(space)):
        trial = tuning.ask(study)
        values = tuning.suggest(trial, space)
        study.tell(trial, 1.0)  # the last grid point: no study.stop() error outside optimize
        seen.append((tuple(values["hidden_sizes"]), values["dropout"]))

    assert tune_space.grid_size(space) == 6
    assert sorted(seen) == [(h, d) for h in [(8,), (16, 8)] for d in (0.0, 0.1, 0.2)]
    assert study.trials[0].params["hidden_sizes"] in ("[8]", "[16, 8]")  # stored as text


def test_the_current_params_are_the_first_trial_of_a_new_study(tmp_path: Path) -> None:
    space = {"lr": R(low=1e-4, high=1e-2, log=True), "hidden_sizes": R(choices=[[8], [64, 32]])}
    study = _study(tmp_path, space, sampler="tpe")
    current = TrainParams(lr=0.001, hidden_sizes=[64, 32])

    assert tune_space.enqueue_current(study, current, space)
    assert not tune_space.enqueue_current(study, current, space)  # once, in a new study only
    trial = tuning.ask(study)
    assert tuning.suggest(trial, space) == {"lr": 0.001, "hidden_sizes": [64, 32]}
    assert trial.user_attrs["baseline"] is True
    # values outside the space cannot be a trial of it
    assert tune_space.current_values(TrainParams(lr=0.5), space) is None
    assert tune_space.current_values(TrainParams(hidden_sizes=[7]), space) is None


def test_grid_refuses_a_continuous_range() -> None:
    with pytest.raises(ConfigError, match="lr is a continuous range"):
        tune_space.grid_space({"lr": R(low=1e-4, high=1e-2, log=True)})


def test_apply_values_sets_dotted_keys_rounds_floats_and_caps_epochs() -> None:
    base = TrainParams(model="transformer", max_epochs=100)
    train, applied = tuning.apply_values(
        base, {"lr": 0.00123456789, "transformer.n_blocks": 3}, max_epochs=7
    )

    assert applied == {"lr": 0.001235, "transformer.n_blocks": 3}
    assert (train.lr, train.transformer.n_blocks, train.max_epochs) == (0.001235, 3, 7)
    with pytest.raises(ConfigError, match="n_heads 4 must divide d_token 30"):
        tuning.apply_values(base, {"transformer.d_token": 30})


def test_write_back_keeps_comments_and_the_file_loads(tmp_path: Path) -> None:
    params_file = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text(encoding="utf-8")
    params_file.write_text(original, encoding="utf-8")
    values = {"lr": 1e-05, "hidden_sizes": [128, 64], "transformer.d_token": 64}

    changes = tune_write.write_back(params_file, "transformer", values, read_text=original)

    text = params_file.read_text(encoding="utf-8")
    assert changes["lr"] == (0.001, 1e-05) and changes["model"] == ("mlp", "transformer")
    assert "  lr: 1.0e-05\n" in text  # PyYAML (YAML 1.1) reads 1e-05 as a string
    assert "  hidden_sizes: [128, 64]\n" in text
    assert "  model: transformer  # mlp | transformer" in text  # its comment kept, where it was
    changed = [a for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b]
    assert len(changed) == 4  # model, hidden_sizes, lr, d_token: nothing else moved
    params = load_params(params_file)
    assert (params.train.lr, params.train.transformer.d_token) == (1e-05, 64)
    # edited by hand while tuning ran: not overwritten, the values named
    with pytest.raises(tune_write.ParamsChanged, match="changed while tuning ran.*lr: 0.01"):
        tune_write.write_back(params_file, "transformer", {"lr": 0.01}, read_text=original)


def test_study_name_follows_the_data_tuning_reads_not_test(tmp_path: Path) -> None:
    for name in tuning.READ_FILES:
        (tmp_path / name).write_bytes(b"v1")
    settings = tuning.study_settings(parse_params({}), "mlp")
    name = tuning.study_name("sklearn:breast_cancer", "mlp", tmp_path, settings)
    (tmp_path / "test.parquet").write_bytes(b"anything")
    assert tuning.study_name("sklearn:breast_cancer", "mlp", tmp_path, settings) == name
    assert name.startswith("sklearn-breast_cancer-mlp-")
    (tmp_path / "val.parquet").write_bytes(b"v2")
    assert tuning.study_name("sklearn:breast_cancer", "mlp", tmp_path, settings) != name
    (tmp_path / "train.parquet").unlink()
    with pytest.raises(PipelineError, match="train.parquet not found: run the pipeline first"):
        tuning.study_name("sklearn:breast_cancer", "mlp", tmp_path, settings)


def test_a_new_search_is_a_new_study_and_the_write_back_keeps_it() -> None:
    def settings(**sections: dict) -> dict:
        return tuning.study_settings(parse_params(sections), "mlp")

    base = settings()
    lr = {"lr": {"low": 0.01, "high": 0.05, "log": True}}
    changed = {
        "tune.space.mlp": settings(tune={"space": {"mlp": lr}}),
        "tune.sampler": settings(tune={"sampler": "random"}),
        "tune.pruner": settings(tune={"pruner": "none"}),
        "tune.max_epochs": settings(tune={"max_epochs": 5}),
        "train.batch_size": settings(train={"batch_size": 32}),
        "train.max_epochs": settings(train={"max_epochs": 7}),
    }
    for what, other in changed.items():
        assert tuning.settings_hash(other) != tuning.settings_hash(base), what
        # (a smaller space also fixes the values it no longer searches: train.dropout, ...)
        assert tuning.settings_changes(base, other)[0] == what
    # the same study: values inside the space (what the write-back changes), how a trial
    # runs, another family's section
    for same in (
        {"lr": 0.0042, "hidden_sizes": [128, 64]},
        {"data_on_device": "never", "checkpoint_every_steps": 0},
        {"transformer": {"d_token": 64}},
    ):
        assert tuning.settings_hash(settings(train=same)) == tuning.settings_hash(base), same
    assert tuning.settings_hash(tuning.study_settings(parse_params({}), "gbdt")) != (
        tuning.settings_hash(base)
    )


def test_previous_study_names_what_changed(tmp_path: Path) -> None:
    storage = tuning.open_storage(tuning.resolve_storage(f"sqlite:///{tmp_path}/studies.db"))
    old = tuning.study_settings(parse_params({}), "mlp")
    new = tuning.study_settings(parse_params({"tune": {"sampler": "random"}}), "mlp")
    sampler = optuna.samplers.RandomSampler()
    pruner = optuna.pruners.NopPruner()
    first = tuning.open_study("src-mlp-data1-aaaa", storage, sampler, pruner)
    first.set_user_attr(tuning.SETTINGS_ATTR, old)
    tuning.open_study("src-mlp-data2-aaaa", storage, sampler, pruner)  # other data: not it

    assert tuning.previous_study(storage, "src-mlp-data1-bbbb", new) == (
        "src-mlp-data1-aaaa",
        ["tune.sampler"],
    )
    assert tuning.previous_study(storage, "src-mlp-data3-bbbb", new) is None


def _tell_grid_trial(storage_url: str, space: dict, fail: bool = False) -> dict:
    # as a trial process does: load the study with its own sampler, ask, suggest, tell
    study = optuna.load_study(
        study_name="s", storage=storage_url, sampler=tuning.make_sampler("grid", space, 0)
    )
    trial = tuning.ask(study)
    values = tune_space.suggest(trial, space)
    study.tell(trial, state=TrialState.FAIL) if fail else study.tell(trial, 1.0)
    return values


def test_a_failed_grid_point_runs_again_and_no_point_twice(tmp_path: Path) -> None:
    space = {"lr": R(choices=[0.01, 0.1]), "dropout": R(low=0.0, high=0.2, step=0.2)}
    study = _study(tmp_path, space)
    url = f"sqlite:///{tmp_path}/s/studies.db"
    assert tune_space.queue_grid_points(study, space, 0, count=4) == 4
    for number in range(4):  # round 1: trial 2 fails (or was killed: marked FAIL)
        _tell_grid_trial(url, space, fail=number == 2)
    failed = study.trials[2].params

    # the resume: one finished trial short, so a round of one trial, on the failed point
    assert tune_space.queue_grid_points(study, space, 0, count=1) == 1
    assert tune_space.queue_grid_points(study, space, 0, count=1) == 0  # already waiting
    assert _tell_grid_trial(url, space) == failed

    finished = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    points = sorted((t.params["lr"], t.params["dropout"]) for t in finished)
    assert points == [(lr, d) for lr in (0.01, 0.1) for d in (0.0, 0.2)]  # each exactly once
    assert tune_space.queue_grid_points(study, space, 0, count=3) == 0  # nothing left to run


def test_trials_of_a_killed_process_are_marked_fail(tmp_path: Path) -> None:
    study = _study(tmp_path, {"dropout": R(choices=[0.0, 0.1])})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    killed, alive = tuning.ask(study), tuning.ask(study)
    host = tune_liveness.process_identity()[0]
    killed.set_user_attr(tuning.PROCESS_ATTR, [host, int(dead.stdout), 0.0])
    alive.set_user_attr(tuning.PROCESS_ATTR, tune_liveness.process_identity())

    assert [t.number for t in tune_liveness.fail_dead_trials(study)] == [killed.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {killed.number: TrialState.FAIL, alive.number: TrialState.RUNNING}


# --- one trial, in this process ------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """data/features from the real features stage; test.parquet garbled (never read)."""
    write_parquet(tmp_path / "validated" / "data.parquet", breast_cancer_frame())
    features.run(tmp_path / "validated", tmp_path / "data" / "features", parse_params({}))
    (tmp_path / "data" / "features" / "test.parquet").write_bytes(b"not parquet")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_trial_trails_the_median_and_is_pruned(
    workspace: Path, mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stages.train.batches")
    params = parse_params(
        {
            "train": {
                "hidden_sizes": [16],
                "max_epochs": 6,
                "patience": 6,
                "batch_size": 32,
                "data_on_device": "never",  # streamed from Parquet, as the stage would
            },
            "tune": {"pruner": "median", "space": {"mlp": {"lr": {"choices": [0.03, 1e-6]}}}},
        }
    )
    storage_url = tuning.resolve_storage(f"sqlite:///{workspace}/tune.db")
    study = tuning.open_study(
        "bc", tuning.open_storage(storage_url), tuning.make_sampler("tpe", {}, 0),
        tuning.make_pruner("median", 6, trials=4),
    )  # fmt: skip
    study.enqueue_trial({"lr": 0.03})  # learns: completes
    study.enqueue_trial({"lr": 1e-6})  # barely moves: trails the median from epoch 2
    client = MlflowClient(mlflow_uri)
    parent = client.create_run(client.create_experiment("tune")).info.run_id
    setup = trial_process.TrialSetup(
        "bc", storage_url, workspace / "data/features", parent, mlflow_uri, trials=4
    )

    results = [trial_process.run_trial(setup, params) for _ in range(2)]

    assert [r["state"] for r in results] == ["COMPLETE", "PRUNED"]
    pruned = study.trials[1]
    assert max(pruned.intermediate_values) < 6  # stopped before max_epochs
    assert study.trials[0].user_attrs[tuning.VALUES_ATTR] == {"lr": 0.03}
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    by_state = {run.data.tags[trial_process.STATE_TAG]: run for run in children}
    assert set(by_state) == {"COMPLETE", "PRUNED"}
    assert by_state["COMPLETE"].data.params["tuned.lr"] == "0.03"
    history = client.get_metric_history(by_state["PRUNED"].info.run_id, "val_loss")
    assert [m.step for m in history] == sorted(pruned.intermediate_values)
    assert "streaming" in caplog.text  # train.data_on_device honoured (test.parquet unread)


def test_gbdt_trial_uses_fit_gbdt(workspace: Path, mlflow_uri: str) -> None:
    params = parse_params({"train": {"model": "gbdt", "max_epochs": 3}, "tune": {"pruner": "none"}})
    storage_url = tuning.resolve_storage(f"sqlite:///{workspace}/tune.db")
    space = params.tune.space["gbdt"]
    tuning.open_study(
        "g", tuning.open_storage(storage_url), tuning.make_sampler("random", space, 0),
        optuna.pruners.NopPruner(),
    )  # fmt: skip
    client = MlflowClient(mlflow_uri)
    parent = client.create_run(client.create_experiment("tune")).info.run_id
    setup = trial_process.TrialSetup(
        "g", storage_url, workspace / "data/features", parent, mlflow_uri
    )

    result = trial_process.run_trial(setup, params)

    assert result["state"] == "COMPLETE" and 0 < result["value"] < 0.7
    values = optuna.load_study(study_name="g", storage=storage_url).trials[0].user_attrs
    assert set(values[tuning.VALUES_ATTR]) == set(space)


def test_an_invalid_combination_fails_the_trial_naming_it(workspace: Path, mlflow_uri: str) -> None:
    params = parse_params(
        {
            "train": {"model": "transformer", "max_epochs": 2},
            # each value is valid alone (checked at load); together 8 heads do not divide 12
            "tune": {
                "space": {
                    "transformer": {
                        "transformer.d_token": {"choices": [12]},
                        "transformer.n_heads": {"choices": [8]},
                    }
                }
            },
        }
    )
    storage_url = tuning.resolve_storage(f"sqlite:///{workspace}/tune.db")
    tuning.open_study(
        "t", tuning.open_storage(storage_url), tuning.make_sampler("tpe", {}, 0),
        optuna.pruners.NopPruner(),
    )  # fmt: skip
    client = MlflowClient(mlflow_uri)
    parent = client.create_run(client.create_experiment("tune")).info.run_id
    setup = trial_process.TrialSetup(
        "t", storage_url, workspace / "data/features", parent, mlflow_uri
    )

    with pytest.raises(PipelineError, match="trial 0: .*n_heads 8 must divide d_token 12"):
        trial_process.run_trial(setup, params)

    trial = optuna.load_study(study_name="t", storage=storage_url).trials[0]
    assert trial.state == TrialState.FAIL and "d_token 12" in trial.user_attrs["fail_reason"]


ASKER = """
import sys
import optuna
from stages.train import tuning

url, n = sys.argv[1], int(sys.argv[2])
study = optuna.load_study(study_name="race", storage=url)
for _ in range(n):
    trial = tuning.ask(study, url)
    print(trial.number, trial.params.get("x"), flush=True)
"""


def test_processes_asking_at_once_never_take_the_same_queued_trial(tmp_path: Path) -> None:
    # sqlite ignores Optuna's row lock: without tuning.ask's file lock two processes could
    # both pop the same WAITING trial (CI: grid point 0 trained twice)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name="race", storage=url)
    for x in range(24):
        study.enqueue_trial({"x": x})
    askers = [
        subprocess.Popen(
            [sys.executable, "-c", ASKER, url, "12"], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    taken = [
        line.split()[0]
        for proc in askers
        for line in proc.communicate(timeout=120)[0].split("\n")
        if line
    ]

    assert all(proc.returncode == 0 for proc in askers)
    assert sorted(map(int, taken)) == list(range(24))  # each queued trial taken exactly once
