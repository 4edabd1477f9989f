"""Batch scoring of Parquet files: predictions and the version beside every row, atomically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from serving import batch
from serving.model import LoadedModel, load_model
from serving.payloads import PayloadError
from stages.common.errors import DataError
from tests.serving.conftest import NAME, Registry

OUTPUTS = ["prediction", "proba_0", "proba_1", "model_version"]


@pytest.fixture(scope="module")
def model(registry: Registry) -> LoadedModel:
    return load_model(f"models:/{NAME}@champion")


def test_score_frame_appends_predictions_and_version_row_for_row(
    model: LoadedModel, registry: Registry
) -> None:
    rows = registry.rows.head(6).assign(patient="p").set_index(pd.Index(range(10, 16)))

    scored = batch.score_frame(model, rows)

    assert list(scored.columns) == [*rows.columns, *OUTPUTS]
    pd.testing.assert_frame_equal(scored[list(rows.columns)], rows.reset_index(drop=True))
    expected = model.predict(registry.rows.head(6))
    pd.testing.assert_frame_equal(scored[OUTPUTS[:-1]], expected)
    assert scored["model_version"].tolist() == ["1"] * 6
    with pytest.raises(PayloadError, match=r"already has the output column\(s\) \['proba_1'\]"):
        batch.score_frame(model, rows.assign(proba_1=0.0))


def test_plan_outputs_maps_files_and_folders(tmp_path: Path) -> None:
    for name in ["a.parquet", "sub/b.parquet", ".hidden/c.parquet", "notes.txt"]:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text("")

    assert batch.plan_outputs(tmp_path / "in", tmp_path / "out") == [
        (tmp_path / "in/a.parquet", tmp_path / "out/a.parquet"),
        (tmp_path / "in/sub/b.parquet", tmp_path / "out/sub/b.parquet"),
    ]
    assert batch.plan_outputs(tmp_path / "in/a.parquet", tmp_path / "x.parquet") == [
        (tmp_path / "in/a.parquet", tmp_path / "x.parquet")
    ]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet files in the folder"):
        batch.plan_outputs(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(DataError, match="input not found"):
        batch.plan_outputs(tmp_path / "missing", tmp_path / "out")


def test_score_file_in_batches_equals_scoring_it_whole(
    model: LoadedModel, registry: Registry, tmp_path: Path
) -> None:
    src = tmp_path / "rows.parquet"
    registry.rows.head(50).to_parquet(src, index=False)

    n = batch.score_file(model, src, tmp_path / "out" / "scored.parquet", batch_size=7)

    scored = pd.read_parquet(tmp_path / "out" / "scored.parquet")
    assert n == 50 and len(scored) == 50
    pd.testing.assert_frame_equal(
        scored, batch.score_frame(model, registry.rows.head(50)), check_dtype=False
    )
    empty = tmp_path / "empty.parquet"
    registry.rows.head(0).to_parquet(empty, index=False)
    assert batch.score_file(model, empty, tmp_path / "out" / "empty.parquet") == 0
    assert list(pd.read_parquet(tmp_path / "out" / "empty.parquet").columns)[-4:] == OUTPUTS


def test_a_file_missing_a_column_fails_naming_it_and_writes_nothing(
    model: LoadedModel, registry: Registry, tmp_path: Path
) -> None:
    src = tmp_path / "rows.parquet"
    registry.rows.head(20).drop(columns=["worst_area"]).to_parquet(src, index=False)
    dest = tmp_path / "scored.parquet"
    dest.write_text("previous")

    with pytest.raises(
        DataError,
        match=r"missing column\(s\) \['worst_area'\] .*rows\.parquet, "
        r"column=worst_area, rule=model_signature",
    ):
        batch.score_file(model, src, dest, batch_size=7)

    assert dest.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.parquet", "scored.parquet"]
