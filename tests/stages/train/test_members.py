"""The ensemble's member-training process (stages/train/members.py): train's own code on the
train split, the spec checked before anything trains, the best trials of the current tuning
study (real Optuna on sqlite), and the refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState, create_trial

from stages.common.errors import ConfigError
from stages.train import member_trials, members, tuning
from tests.builders import make_params


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _study(features: Path, storage: Path, values: list[float]) -> str:
    """The study ``make tune`` would run for the test params and these features, holding
    COMPLETE trials with ``values`` (lr 0.001 * (i + 1), hidden_sizes [8]) and one PRUNED."""
    params = make_params()
    family = params.train.model
    name = tuning.study_name(
        params.ingest.source, family, features, tuning.study_settings(params, family)
    )
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{storage}")
    for i, value in enumerate(values):
        attrs = {tuning.VALUES_ATTR: {"lr": 0.001 * (i + 1), "hidden_sizes": [8]}}
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={tuning.VALUES_ATTR: {}}))
    return name


def test_a_member_with_train_s_params_and_seed_is_train_s_model(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    features, model_dir = trained
    spec = [{"name": "again", "source": "seed:42", "overrides": {}, "seed": 42}]
    written = members.run(features, spec, tmp_path / "out", make_params())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["again", "members.json"]
    assert json.loads((tmp_path / "out" / "members.json").read_text()) == written
    assert written[0]["file"] == "again/model.pt" and written[0]["family"] == "mlp"
    # the same code, params and seed as the train stage: the same weights
    again, original = (
        _state(tmp_path / "out" / "again" / "model.pt"),
        _state(model_dir / "model.pt"),
    )
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_a_gbdt_member_is_saved_as_train_saves_a_gbdt(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from model.gbdt import NATIVE_INPUTS
    from model.predictors import load_predictor
    from model.preprocess import load_preprocessor

    features, _ = trained
    spec = [
        {
            "name": "gbdt",
            "source": "family:gbdt",
            "overrides": {"model": "gbdt", "max_epochs": 2},
            "seed": 3,
        }
    ]
    written = members.run(features, spec, tmp_path / "out", make_params())
    assert written[0]["file"] == "gbdt/model.skops" and written[0]["family"] == "gbdt"
    # what gbdt.model_meta gives the train stage: it loads and scores as train's gbdt does
    loaded = load_predictor(tmp_path / "out" / "gbdt" / "model.skops")
    preprocessor = load_preprocessor(features / "preprocessor.joblib")
    val = pd.read_parquet(features / "val.parquet")
    assert loaded.family == "gbdt" and loaded.meta["inputs"] == NATIVE_INPUTS
    assert loaded.meta["train_params"]["model"] == "gbdt"
    assert loaded.meta["epoch"] == written[0]["best_epoch"]
    assert loaded.predict_proba(loaded.features(preprocessor, val)).shape == (len(val), 2)


def test_the_best_complete_trials_train_as_members(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    features, _ = trained
    monkeypatch.setenv(tuning.STORAGE_ENV, f"sqlite:///{tmp_path / 'studies.db'}")
    _study(features, tmp_path / "studies.db", [0.3, 0.1, 0.2])  # trials 0, 1, 2 (+ 3 pruned)
    found = member_trials.tuning_members(make_params(), features, 2)
    assert [(m["name"], m["source"]) for m in found] == [
        ("trial1", "trial:1"),
        ("trial2", "trial:2"),
    ]
    assert found[0]["overrides"] == {"model": "mlp", "lr": 0.002, "hidden_sizes": [8]}
    written = members.run(features, [], tmp_path / "out", make_params(), tune_top_k=1)
    assert [m["name"] for m in written] == ["trial1"]
    saved = torch.load(tmp_path / "out" / "trial1" / "model.pt", weights_only=True)
    assert saved["train_params"]["lr"] == 0.002 and saved["train_params"]["hidden_sizes"] == [8]
    assert saved["train_params"]["max_epochs"] == make_params().train.max_epochs


def test_fewer_complete_trials_than_asked_names_tune_top_k_and_make_tune(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    features, _ = trained
    monkeypatch.setenv(tuning.STORAGE_ENV, f"sqlite:///{tmp_path / 'studies.db'}")
    with pytest.raises(ConfigError, match=r"tune_top_k is 2 but .* holds no study yet.*make tune"):
        member_trials.tuning_members(make_params(), features, 2)
    name = _study(features, tmp_path / "studies.db", [0.3])
    with pytest.raises(ConfigError, match=rf"tune_top_k is 2 but study {name} has 1 COMPLETE"):
        member_trials.tuning_members(make_params(), features, 2)
    other = make_params({"train": {"patience": 7}})  # another search: another study
    with pytest.raises(ConfigError, match=r"there is no study .* `make tune`"):
        member_trials.tuning_members(other, features, 1)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "a"}, "expected a JSON list of members"),
        ([{"name": "a", "seed": 1, "extra": 0}], r"member 0: expected \{name, source"),
        ([{"name": "../up", "seed": 1}], r"name '../up' must be letters"),
        ([{"name": "train", "seed": 1}], r"not 'train': member 0 is train's model"),
        ([{"name": "a", "seed": 1}, {"name": "a", "seed": 2}], "name 'a' is used twice"),
        ([{"name": "a", "seed": "1"}], r"\(a\): seed must be an integer"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_member(
    spec: object, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match=message):
        members.read_spec(path)


def test_overrides_are_checked_as_train_params() -> None:
    train = make_params().train
    assert members.member_train(train, {"gbdt.learning_rate": 0.2}, "g").gbdt.learning_rate == 0.2
    with pytest.raises(ConfigError, match="member c: .*train.image_shape.*needs image_shape"):
        members.member_train(train, {"model": "cnn"}, "c")
    with pytest.raises(ConfigError, match="member x: override 'learning_rate': not a train field"):
        members.member_train(train, {"learning_rate": 0.1}, "x")
    with pytest.raises(ConfigError, match="member x: override 'boost.depth': train has no section"):
        members.member_train(train, {"boost.depth": 3}, "x")


def test_the_process_fails_with_the_reason_and_writes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "spec.json").write_text(
        json.dumps([{"name": "c", "seed": 1, "overrides": {"model": "cnn"}}])
    )
    (tmp_path / "params.yaml").write_text("{}\n")
    argv = ["--features", str(tmp_path), "--spec", str(tmp_path / "spec.json")]
    argv += ["--out", str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml")]
    with caplog.at_level(logging.ERROR):
        assert members.main(argv) == 1
    assert "stage train.members failed: member c:" in caplog.text
    assert not (tmp_path / "out").exists()
