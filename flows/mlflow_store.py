"""The project's MLflow store as a flow process sees it (`flows/page.py`, `flows/monitor.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.common.config import MlflowParams
from stages.common.tracking import tracking_uri

SQLITE = "sqlite:///"


def store_uri(repo: Path, params: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` or params ``mlflow.tracking_uri``, a relative ``sqlite:///``
    store taken from ``repo`` (the stages run there; the flow process may not)."""
    uri = tracking_uri(params)
    if uri.startswith(SQLITE) and not Path(uri.removeprefix(SQLITE)).is_absolute():
        uri = f"{SQLITE}{Path(repo).resolve() / uri.removeprefix(SQLITE)}"
    return uri


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name`` through an ``MlflowClient`` (created when missing, with
    its artifacts beside a sqlite database, as the pipeline's: stages.common.tracking); the
    client API leaves no experiment set in the process."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith(SQLITE):
        location = (Path(uri.removeprefix(SQLITE)).parent / "artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)
