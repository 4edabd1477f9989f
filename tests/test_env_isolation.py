"""Tests leave the process environment as they found it (review #6).

``configure_mlflow`` bounds MLflow's HTTP retries through ``os.environ`` (so a stage's children
inherit the bounds); in pytest's process, ``tests/conftest.py`` restores those keys after each
test. The second test fails when the first one's settings leak (pytest runs a file in order).
"""

from __future__ import annotations

import os

from stages.common import tracking
from stages.common.config import MlflowParams

LEAKED = [*tracking.HTTP_LIMITS, tracking.HTTP_LIMITS_MARKER]
AT_COLLECTION = {key: os.environ.get(key) for key in LEAKED}  # before any test ran


def test_configure_mlflow_sets_the_http_limits(mlflow_uri: str) -> None:
    for key in LEAKED:
        os.environ.pop(key, None)  # restored after the test by the conftest fixture too
    tracking.configure_mlflow(MlflowParams(experiment="limits", max_retries=1))
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert tracking.HTTP_LIMITS_MARKER in os.environ


def test_the_limits_do_not_leak_into_the_next_test() -> None:
    assert {key: os.environ.get(key) for key in LEAKED} == AT_COLLECTION
