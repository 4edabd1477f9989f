"""The batch-scoring flow on Prefect's test harness, with a real registry (tests/serving)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.batch_score import batch_score, render_summary
from tests.serving.conftest import NAME, Registry, registry  # noqa: F401 - the fixture

OUTPUTS = ["prediction", "proba_0", "proba_1", "model_version"]


def params_file(path: Path) -> Path:
    path.write_text(
        json.dumps({"register": {"model_name": NAME}, "serve": {"batch_size": 8}})
    )  # JSON is YAML
    return path


@pytest.mark.slow
def test_flow_scores_every_file_of_a_folder_with_the_champion(
    prefect_api: str, registry: Registry, tmp_path: Path
) -> None:  # noqa: F811
    rows = registry.rows.head(30).assign(row_id=range(30))
    (tmp_path / "in" / "day2").mkdir(parents=True)
    rows.head(20).to_parquet(tmp_path / "in" / "day1.parquet", index=False)
    rows.tail(10).to_parquet(tmp_path / "in" / "day2" / "part.parquet", index=False)

    summary = batch_score(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        params_path=str(params_file(tmp_path / "params.yaml")),
    )

    assert summary["model_name"] == NAME and summary["model_version"] == "1"
    assert summary["rows"] == 30 and [f["rows"] for f in summary["files"]] == [20, 10]
    scored = pd.concat(
        [
            pd.read_parquet(tmp_path / "out" / "day1.parquet"),
            pd.read_parquet(tmp_path / "out" / "day2" / "part.parquet"),
        ]
    )
    assert list(scored.columns) == [*rows.columns, *OUTPUTS]
    assert scored["row_id"].tolist() == list(range(30))  # every row, in order
    assert set(scored["model_version"]) == {"1"}
    assert "| 20 |" in render_summary(summary) and f"{NAME} v1" in render_summary(summary)


@pytest.mark.slow
def test_a_file_the_model_cannot_score_fails_the_flow_naming_the_column(
    prefect_api: str, registry: Registry, tmp_path: Path
) -> None:  # noqa: F811
    (tmp_path / "in").mkdir()
    registry.rows.head(5).drop(columns=["mean_area"]).to_parquet(tmp_path / "in" / "x.parquet")

    state = batch_score(
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        params_path=str(params_file(tmp_path / "params.yaml")),
        return_state=True,
    )

    assert state.is_failed()
    assert "missing column(s) ['mean_area']" in state.message
    assert not (tmp_path / "out" / "x.parquet").exists()
