"""Serving fixtures: a real MLflow registry holding two versions of a tiny trained model.

The model is trained once per session with the real features and train stages
(``tests.stages.test_evaluate.build_trained``) and logged through the real ``log_servable``
twice into one temporary sqlite store: v1 as trained (``champion``), v2 with its output layer
zeroed, so v2 answers exactly 0.5 for every class and a response shows which version produced
it. The ``registry`` fixture points MLflow at that store for one test module at a time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
import pandas as pd
import pytest
import torch

from stages.common.servable import log_servable
from stages.common.tracking import configure_mlflow
from tests.builders import breast_cancer_frame, build_trained, make_params

NAME = "serve-clf"
LINEAGE = {"git.commit": "0123abc", "dvc.data/features.md5": "feedbeef"}
_SESSION: dict[str, Any] = {}  # built once per test session, shared by every module


def trained_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(features dir, model dir) of one small trained model, built once per test session."""
    if "trained" not in _SESSION:
        root = tmp_path_factory.mktemp("serving-trained")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
            _SESSION["trained"] = build_trained(root, make_params(), breast_cancer_frame())
            mlflow.set_tracking_uri(None)  # train set it globally; leave no trace
    return _SESSION["trained"]


def zero_output_layer(src: Path, dest: Path) -> Path:
    """A copy of checkpoint ``src`` whose last linear layer is all zeros (p = 1/n_classes)."""
    checkpoint = torch.load(src, weights_only=True)
    state = checkpoint["state_dict"]
    last = [k for k in state if k.endswith(".weight")][-1].removesuffix(".weight")
    state[f"{last}.weight"].zero_()
    state[f"{last}.bias"].zero_()
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, dest)
    return dest


@dataclass(frozen=True)
class Registry:
    """A temporary MLflow store with ``NAME`` v1 (trained, champion) and v2 (zeroed)."""

    uri: str
    name: str
    features: Path  # the features dir: test.parquet, preprocessor.joblib
    rows: pd.DataFrame  # raw test rows (feature columns only)

    def move_alias(self, version: int, alias: str = "champion") -> None:
        mlflow.MlflowClient().set_registered_model_alias(self.name, alias, str(version))


def register_version(features: Path, network: Path, example: pd.DataFrame) -> str:
    """Log + register one version through the real ``log_servable``; tag it with lineage."""
    with mlflow.start_run():
        info = log_servable(features / "preprocessor.joblib", network, example,
                            registered_model_name=NAME)
    version = str(info.registered_model_version)
    for key, value in LINEAGE.items():
        mlflow.MlflowClient().set_model_version_tag(NAME, version, key, value)
    return version


def registry_once(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """The session's registry store (creating an MLflow sqlite store takes seconds: once)."""
    if "registry" not in _SESSION:
        features, models = trained_once(tmp_path_factory)
        root = tmp_path_factory.mktemp("serving-registry")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        rows = pd.read_parquet(features / "test.parquet").drop(columns=["target"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            configure_mlflow(make_params().mlflow)  # artifacts beside the db, not ./mlruns
            register_version(features, models / "model.pt", rows.head(5))
            zeroed = zero_output_layer(models / "model.pt", root / "zeroed" / "model.pt")
            register_version(features, zeroed, rows.head(5))
            mlflow.set_tracking_uri(None)
        _SESSION["registry"] = Registry(uri, NAME, features, rows)
    return _SESSION["registry"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The registry, with MLflow pointed at it for the whole module and ``champion`` on v1."""
    store = registry_once(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store.uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(store.uri)
        store.move_alias(1)
        yield store
        mlflow.set_tracking_uri(None)


@pytest.fixture
def champion_v1(registry: Registry) -> Registry:
    """The registry with ``champion`` on v1 (tests that move it leave it anywhere)."""
    registry.move_alias(1)
    return registry


def copy_features(registry: Registry, dest: Path) -> Path:
    """A copy of the test split as a Parquet file to score."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(registry.features / "test.parquet", dest)
    return dest
