"""The edit-run benchmark's pieces that run in seconds: the plain script, the output parsers.

Nothing here is timed and no pipeline runs: the real numbers come from ``make bench-feedback``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bench import feedback

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_plain_script_trains_the_params_mlp_and_scores_the_test_split(tmp_path: Path) -> None:
    result = feedback.run_plain(ROOT / "params.yaml", tmp_path)

    train = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    assert 0.9 <= result["f1_macro"] <= 1.0
    assert 1 <= result["best_epoch"] <= result["epochs"] <= train["max_epochs"]
    assert sum(result["rows"].values()) == 569  # breast_cancer, all of it split
    assert result["seconds"] > 0 and (tmp_path / "plain-model.pt").stat().st_size > 0


def test_set_lr_changes_only_train_lr(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    feedback.set_lr(tmp_path, 0.002)

    before = yaml.safe_load((ROOT / "params.yaml").read_text())
    after = yaml.safe_load((tmp_path / "params.yaml").read_text())
    assert after["train"].pop("lr") == 0.002
    before["train"].pop("lr")
    assert after == before


def test_repro_breakdown_splits_dvc_output_by_stage() -> None:
    lines = [
        (0.5, "Running stage 'ingest':"),
        (0.6, "> python -m stages.ingest"),
        (2.0, "Stage 'validate' didn't change, skipping"),
        (2.5, "Running stage 'train':"),
    ]

    parts = feedback.repro_breakdown(4.0, lines)

    assert parts == {
        "start-up": 0.5,
        "ingest (ran)": 1.5,
        "validate (skipped)": 0.5,
        "train (ran)": 1.5,
    }


def test_flow_breakdown_of_a_run_that_started_no_flow(tmp_path: Path) -> None:
    lines = [
        (0.4, "12:00:00.400 | INFO    | flows.pipeline - stage ingest: asking the source ..."),
        (0.9, "12:00:00.900 | INFO    | flows.pipeline - Running stage 'ingest':"),
        (3.0, ""),
        (3.0, "Nothing changed: ingest ran and left data/raw as it was, ..."),
    ]

    parts = feedback.flow_breakdown(3.2, lines, tmp_path / "no-store")

    assert parts == pytest.approx(
        {
            "start-up (imports, lock, MLflow check)": 0.4,
            "ingest + dvc status, before Prefect": 2.6,
            "summary": 0.2,
        }
    )
