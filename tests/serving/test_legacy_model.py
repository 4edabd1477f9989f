"""A version registered before the ``model`` package existed ships its code as ``stages``; the
service and batch scoring import this checkout's ``stages`` (``flows.serve``,
``flows.batch_score``), where those modules no longer are. They load it with its own code
(``model.loading``), and never hide this process's ``model`` package while they load, since
request threads import ``model.*`` lazily during a hot swap (review A1)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import mlflow
import pandas as pd
import pytest

import stages.common.config  # noqa: F401 - as flows.serve / flows.batch_score have
from model.servable import log_servable
from model.variants import load_variant
from serving.model import load_model
from tests.model.legacy_model import forget_legacy_modules, log_old_layout_model
from tests.serving.conftest import Store, record_version  # as register records hashes

NAME = "legacy-clf"  # this module's own models in the session's integrity store
CURRENT = "current-clf"


@pytest.fixture(scope="module")
def legacy_version(store: Store, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An old-layout model registered with its hashes recorded, as register did."""
    info = log_old_layout_model(tmp_path_factory.mktemp("legacy"), NAME)
    version = str(info.registered_model_version)
    record_version(mlflow.MlflowClient(), NAME, version)
    return version


@pytest.fixture(autouse=True)
def _fresh_process() -> Iterator[None]:
    forget_legacy_modules()  # loading it leaves them for its lazy imports: each test loads anew
    yield
    forget_legacy_modules()


class _SeesModules:
    """Wraps ``mlflow.pyfunc.load_model``: records what ``sys.modules`` held during the load."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = mlflow.pyfunc.load_model
        self.seen: list[dict[str, Any]] = []
        monkeypatch.setattr(mlflow.pyfunc, "load_model", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append({top: sys.modules.get(top) for top in ("model", "stages")})
        return self.real(*args, **kwargs)


def test_the_service_loads_a_version_that_ships_the_old_stages_package(
    legacy_version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout = {top: sys.modules[top] for top in ("model", "stages")}
    path_before = list(sys.path)
    spy = _SeesModules(monkeypatch)

    loaded = load_model(f"models:/{NAME}/{legacy_version}")
    out = loaded.predict(pd.DataFrame({"x": [1.0, 2.0]}))

    assert out["y"].tolist() == [20.0, 40.0]  # the model's own code, lazy import included
    assert loaded.integrity.startswith("sha256")  # the recorded hashes were checked
    assert spy.seen == [{"model": checkout["model"], "stages": None}]  # model never hidden
    assert {top: sys.modules[top] for top in ("model", "stages")} == checkout
    assert sys.path == path_before  # no code/ folder left behind per (hot-swapped) load


def test_the_pyfunc_variant_loader_loads_it_too(legacy_version: str) -> None:
    model = load_variant(f"models:/{NAME}/{legacy_version}", "pyfunc")

    assert model.predict(pd.DataFrame({"x": [3.0]}))["y"].tolist() == [60.0]


def test_a_current_version_loads_with_the_processs_model_package_in_place(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow.start_run():
        info = log_servable(
            store.features / "preprocessor.joblib",
            store.network,
            store.rows.head(5),
            registered_model_name=CURRENT,
        )
    version = str(info.registered_model_version)
    record_version(mlflow.MlflowClient(), CURRENT, version)
    model_package = sys.modules["model"]
    spy = _SeesModules(monkeypatch)

    loaded = load_model(f"models:/{CURRENT}/{version}")

    assert spy.seen[0]["model"] is model_package  # request threads keep importing model.*
    assert sys.modules["model"] is model_package
    assert len(loaded.predict(store.rows.head(3))) == 3
