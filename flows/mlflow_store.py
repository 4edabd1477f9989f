"""The project's MLflow store as a flow process sees it (`flows/page.py`, `flows/monitor.py`)."""

from __future__ import annotations

from pathlib import Path

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
