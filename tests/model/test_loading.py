"""A registered model runs the code it shipped, even where this checkout's packages of the same
names are imported (the register stage loading a champion registered by older code)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

import stages.common.config  # noqa: F401 - this process has imported the checkout's `stages`
from model.loading import load_pyfunc, shipped_packages
from tests.model.legacy_model import forget_legacy_modules, save_old_layout_model


@pytest.fixture(autouse=True)
def _fresh_process() -> Iterator[None]:
    forget_legacy_modules()  # another test may have loaded it
    yield
    forget_legacy_modules()


def test_a_model_with_its_own_stages_package_loads_and_predicts_with_its_code(
    tmp_path: Path,
) -> None:
    model_dir = save_old_layout_model(tmp_path)
    assert shipped_packages(model_dir) == {"stages"}
    checkout = sys.modules["stages"]

    path_before = list(sys.path)
    with pytest.raises(Exception, match="No module named 'stages.legacy'"):
        mlflow.pyfunc.load_model(str(model_dir))  # what register did before
    sys.path[:] = path_before  # (MLflow leaves the model's code/ on sys.path)

    model = load_pyfunc(model_dir)
    out = model.predict(pd.DataFrame({"x": [1.0, 2.0]}))

    assert out["y"].tolist() == [20.0, 40.0]
    assert sys.modules["stages"] is checkout  # this process's package is back
    assert str(model_dir / "code") not in sys.path
    assert "stages.legacy.helpers" in sys.modules  # shadows nothing: kept for lazy imports
