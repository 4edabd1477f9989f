"""Serving fixtures: a real MLflow registry holding two versions of a tiny trained model.

The model is trained once per session with the real features and train stages
(``tests.stages.evaluate.test_stage.build_trained``) and logged through the real ``log_servable``
twice into one temporary sqlite store: v1 as trained (``champion``), v2 with its output layer
zeroed, so v2 answers exactly 0.5 for every class and a response shows which version produced
it. The ``registry`` fixture points MLflow at that store for one test module at a time.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import torch

from model.artifacts import DEFAULT_KEY_ENV
from model.servable import log_servable
from stages.common.tracking import configure_mlflow
from stages.register.manifest import record_version
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
    """Log + register one version through the real ``log_servable``; record its artifact
    hashes as the register stage does (a version without them is refused); tag it with
    lineage."""
    with mlflow.start_run():
        info = log_servable(
            features / "preprocessor.joblib", network, example, registered_model_name=NAME
        )
    version = str(info.registered_model_version)
    record_version(mlflow.MlflowClient(), NAME, version)
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


# --- the artifact-integrity store (tests/serving/test_artifact_integrity.py and the modules
# that tamper with it: test_signing_key_env, tests/flows/test_batch_score_integrity) ------------

INTEGRITY_KEY_ENV = DEFAULT_KEY_ENV  # unset while the store is in use: no signing


@dataclass(frozen=True)
class Store:
    """A temporary MLflow store and the trained model's files."""

    uri: str
    root: Path
    features: Path
    network: Path
    zeroed: Path  # another network: a second version with other weights
    rows: pd.DataFrame


def integrity_store_once(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """An empty MLflow store (its experiment made, artifacts beside the db) and the session's
    trained model, built once per session: each module registers versions of its own in it."""
    if "integrity" not in _SESSION:
        features, models = trained_once(tmp_path_factory)
        root = tmp_path_factory.mktemp("integrity")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        rows = pd.read_parquet(features / "test.parquet").drop(columns=["target"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.delenv(INTEGRITY_KEY_ENV, raising=False)
            configure_mlflow(make_params().mlflow)
            mlflow.set_tracking_uri(None)
        zeroed = zero_output_layer(models / "model.pt", root / "zeroed" / "model.pt")
        _SESSION["integrity"] = Store(uri, root, features, models / "model.pt", zeroed, rows)
    return _SESSION["integrity"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """The integrity store, with MLflow pointed at it for the whole module."""
    built = integrity_store_once(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", built.uri)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.delenv(INTEGRITY_KEY_ENV, raising=False)
        configure_mlflow(make_params().mlflow)  # the experiment, artifacts beside the db
        yield built
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


# --- real public tables, served through their input contract ---------------------------------

TABLES = {  # name -> (file, target, columns the features stage drops, package folder)
    "penguins": ("penguins.csv", "species", [], "palmerpenguins/data"),
    "penguins-raw": (
        "penguins-raw.csv",
        "Species",
        ["Sample Number", "Individual ID", "Comments"],
        "palmerpenguins/data",
    ),
    "seattle-weather": ("seattle-weather.csv", "weather", [], "vega_datasets/_data"),
}
CONTRACT_NAME = "penguins-clf"  # v1: penguins, v2: penguins-raw (another input contract)
WEATHER_NAME = "weather-clf"  # v1: seattle-weather (a text date like 2012/01/01)


def table_path(name: str) -> Path:
    """The CSV of a real public table shipped inside a package."""
    from importlib.resources import files

    file, _, _, folder = TABLES[name]
    package, _, inside = folder.partition("/")
    return Path(str(files(package) / inside / file))


def source_rows(name: str) -> list[dict[str, Any]]:
    """The table's rows exactly as they stand in the source (ingest's CSV reader: NA = null),
    target dropped."""
    import pyarrow as pa

    from stages.common.csvfiles import iter_csv_batches

    path, target = table_path(name), TABLES[name][1]
    table = pa.Table.from_batches(list(iter_csv_batches(lambda: str(path), str(path), ",")))
    rows = table.drop_columns([target]).to_pylist()
    return [
        {
            key: (value.isoformat() if hasattr(value, "isoformat") else value)
            for key, value in row.items()
        }
        for row in rows
    ]


def as_validated(table: Any, suite: Any) -> Any:
    """``table`` cast to the suite's types by the validate stage's own code (``stages.common
    .rules``: ``output_field``, with a text date's format in the field metadata ``b"format"``,
    and ``cast_column``), so these tests see any difference between validate and serving."""
    import pyarrow as pa

    from stages.validate.rules import cast_column, output_field

    fields, columns = [], []
    for name, spec in suite.columns.items():
        raw = table.column(name).combine_chunks()
        field = output_field(name, spec.kind, raw.type, spec.format)
        cast, _ = cast_column(raw, spec.kind, field.type, "source", name, date_format=spec.format)
        fields.append(field)
        columns.append(cast)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


@dataclass(frozen=True)
class TableModel:
    """A model trained on one real table, with the contract built from its profiled suite."""

    features: Path
    network: Path
    contract: dict[str, Any]


def train_on_table(root: Path, name: str) -> TableModel:
    """Profile the suite, run the real features and train stages, build the contract."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.common.csvfiles import iter_csv_batches
    from stages.common.suite import load_suite
    from stages.features import stage as features
    from stages.register.contract import build_contract
    from stages.train import stage as train
    from stages.validate.stage import write_suite

    path, (_, target, drop, _) = table_path(name), TABLES[name]
    write_suite(path, root / "suite.json", target, margin=0.1, batch_rows=10_000)
    table = pa.Table.from_batches(list(iter_csv_batches(lambda: str(path), str(path), ",")))
    table = as_validated(table, load_suite(root / "suite.json"))
    (root / "validated").mkdir(parents=True)
    pq.write_table(table, root / "validated" / "data.parquet")
    params = make_params({"ingest": {"target": target}, "features": {"drop_columns": drop}})
    feature_set = features.run(root / "validated", root / "features", params)
    train.run(root / "features", root / "no-report", root / "models", root / "history.csv", params)
    contract = build_contract(
        load_suite(root / "suite.json"),
        params.validate.rules,
        feature_set.preprocessor.feature_columns,
    )
    return TableModel(root / "features", root / "models" / "model.pt", contract)


def register_table_model(model: TableModel, name: str) -> str:
    """Log + register through the real ``log_servable`` with the contract; the input example
    is test-split rows with all their source columns."""
    example = pd.read_parquet(model.features / "test.parquet").head(5)
    with mlflow.start_run():
        info = log_servable(
            model.features / "preprocessor.joblib",
            model.network,
            example,
            registered_model_name=name,
            contract=model.contract,
        )
    version = str(info.registered_model_version)
    record_version(mlflow.MlflowClient(), name, version)  # as register does
    return version


def tables_once(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> dict[str, Any]:
    """penguins (v1) and penguins-raw (v2) as ``CONTRACT_NAME``, seattle-weather as
    ``WEATHER_NAME``, in the session's store."""
    if "tables" not in _SESSION:
        models = {}
        for table in TABLES:
            root = tmp_path_factory.mktemp(f"table-{table}")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
                models[table] = train_on_table(root, table)
        mlflow.set_tracking_uri(registry.uri)  # train set it globally: back to the store
        configure_mlflow(make_params().mlflow)  # ...and its experiment, artifacts beside it
        for table in TABLES:
            register_table_model(
                models[table], WEATHER_NAME if table == "seattle-weather" else CONTRACT_NAME
            )
        _SESSION["tables"] = models
    return _SESSION["tables"]


@pytest.fixture(scope="module")
def tables(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The real-table models, registered (``penguins-clf@champion`` on v1, penguins); MLflow
    points at the registry for the module."""
    models = tables_once(tmp_path_factory, registry)
    mlflow.MlflowClient().set_registered_model_alias(CONTRACT_NAME, "champion", "1")
    return models
