"""Loading for serving and the atomic swap, against a real MLflow registry."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from serving.model import (
    ModelHolder,
    ModelLoadError,
    RegistryFollower,
    load_model,
    register_variant,
)
from tests.serving.conftest import LINEAGE, NAME, Registry


def test_alias_resolves_to_one_version_with_its_lineage(champion_v1: Registry) -> None:
    model = load_model(f"models:/{NAME}@champion")

    assert (model.name, model.version, model.alias, model.uri) == (
        NAME,
        "1",
        "champion",
        f"models:/{NAME}/1",
    )
    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert model.run_id == version.run_id
    assert LINEAGE.items() <= model.tags.items()
    assert model.spec.names == tuple(champion_v1.rows.columns)
    assert {col.kind for col in model.spec.columns} == {"float"}
    assert model.output_columns == ("prediction", "proba_0", "proba_1")
    assert model.input_example is not None and len(model.input_example) == 5
    assert model.describe()["model_version"] == "1"


def test_served_predictions_equal_the_logged_pyfunc(champion_v1: Registry) -> None:
    rows = champion_v1.rows.head(50)

    served = load_model(f"models:/{NAME}/1").predict(rows)

    expected = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(rows)
    pd.testing.assert_frame_equal(served, expected)


def test_variants_are_pluggable_and_unknown_ones_are_refused(champion_v1: Registry) -> None:
    register_variant("same-as-pyfunc", "serving.model:load_pyfunc_predictor")
    by_name = load_model(f"models:/{NAME}/2", variant="same-as-pyfunc")
    by_path = load_model(f"models:/{NAME}/2", variant="serving.model:load_pyfunc_predictor")

    assert by_name.variant == "same-as-pyfunc" and by_name.version == "2"
    np.testing.assert_allclose(by_path.predict(champion_v1.rows.head(3))["proba_1"], 0.5)
    with pytest.raises(ModelLoadError, match=r"unknown model variant 'tflite' \(known: pyfunc"):
        load_model(f"models:/{NAME}/1", variant="tflite")
    with pytest.raises(ModelLoadError, match=f"models:/{NAME}@nobody: cannot resolve it"):
        load_model(f"models:/{NAME}@nobody")


def test_follower_swaps_only_when_the_alias_moves(champion_v1: Registry) -> None:
    holder, swaps = ModelHolder(), []
    follower = RegistryFollower(
        holder, NAME, "champion", on_swap=lambda new, old: swaps.append((new.version, old))
    )

    assert follower.check_once() is True and holder.current.version == "1"
    first = holder.current
    assert follower.check_once() is False and holder.current is first  # alias unchanged

    champion_v1.move_alias(2)
    assert follower.check_once() is True
    assert holder.current.version == "2" and holder.current.alias == "champion"
    assert swaps == [("1", None), ("2", first)]
    assert first.predict(champion_v1.rows.head(1))["proba_1"].iloc[0] != 0.5  # old one intact


def test_follower_keeps_serving_when_the_alias_disappears(champion_v1: Registry) -> None:
    holder, errors = ModelHolder(), []
    follower = RegistryFollower(holder, NAME, "champion", on_error=errors.append)
    follower.check_once()
    serving = holder.current

    mlflow.MlflowClient().delete_registered_model_alias(NAME, "champion")
    try:
        assert follower.check_once() is False
    finally:
        champion_v1.move_alias(1)

    assert holder.current is serving
    assert "champion" in follower.last_error and errors == [follower.last_error]
