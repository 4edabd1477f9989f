"""Fixtures for the stage tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builders import breast_cancer_frame, build_trained, make_params
from tests.postgres import postgres_url  # noqa: F401  (a real PostgreSQL server, session-wide)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Features + a trained MLP (the real features and train stages), built once per module
    in an MLflow store of its own."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        return build_trained(root, make_params(), breast_cancer_frame())
