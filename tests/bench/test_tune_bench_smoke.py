"""The tuning benchmark at its smallest, so its code cannot rot: nothing here is timed or compared.

The real numbers come from ``make bench-tune``. Part 3 (``flows.tune`` in a fresh clone) is left
to it: a clone, ``dvc repro features`` and two flow runs take over a minute; its output parser is
checked here against the flow's own summary text.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import tune
from flows.tune import render
from stages.common.io import read_json


def test_quick_run_searches_prunes_and_scores_the_test_split(tmp_path: Path) -> None:
    argv = ["--quick", "--parts", "sampler", "pruning", "table", "--datasets", "breast_cancer"]
    argv += ["--families", "mlp", "gbdt", "--results-dir", str(tmp_path)]

    assert tune.main(argv) == 0

    result = read_json(tmp_path / "tune.json")
    assert {"cpu", "cpu_count", "torch"} <= set(result["machine"])
    assert set(result["load_average"]) == {"before", "after"}
    out = result["datasets"]["breast_cancer"]
    assert sum(out["data"]["rows"].values()) == 569  # all of it split by the features stage
    studies = out["studies"]
    assert {(s["sampler"], s["pruner"]) for s in studies} == {
        ("tpe", "none"),
        ("random", "none"),
        ("tpe", "median"),
        ("tpe", "hyperband"),
    }
    for study in studies:  # 3 trials of at most 3 epochs (--quick)
        assert sum(study["states"].values()) == len(study["best_so_far"]) == 3
        assert 3 <= study["epochs"] <= 9
        assert study["best"] == min(study["best_so_far"])
    assert set(out["sampler"]["best_after"]["tpe"]) == {"3"}
    assert set(out["pruning"]) == {"none", "median", "hyperband"}
    assert [row["model"] for row in out["table"]] == ["mlp", "gbdt", "mlp (tuned)"]
    for row in out["table"]:
        assert 0.5 < row["accuracy"] <= 1 and row["log_loss"] > 0 and row["train_s"] > 0
        assert 1 <= row["epochs"] <= 3
    assert out["tuned_values"] is not None and "lr" in out["tuned_values"]


def test_the_test_split_is_out_of_reach_during_the_search(tmp_path: Path) -> None:
    features = tmp_path / "features"
    features.mkdir()
    (features / "test.parquet").write_bytes(b"rows")

    with tune.TestSplitAway(features):
        assert sorted(p.name for p in features.iterdir()) == []

    assert (features / "test.parquet").read_bytes() == b"rows"


def test_flow_wall_time_is_read_from_the_flows_own_summary() -> None:
    summary = {
        "study": "s",
        "family": "mlp",
        "target": 2,
        "ran_now": 2,
        "ran_now_states": {"COMPLETE": 2, "PRUNED": 0, "FAIL": 0},
        "study_states": {"COMPLETE": 2},
        "marked_failed_from_killed_run": [],
        "best_trial": 1,
        "best_is_baseline": False,
        "best_val_loss": 0.14,
        "best_values": {"lr": 0.001},
        "params_changed": {},
        "mlflow_run": "http://127.0.0.1:5000/#/experiments/1/runs/r",
        "wall_s": 12.3,
        "error": None,
    }

    assert tune.flow_wall_seconds("log line\n" + render(summary) + "\n") == 12.3
    with pytest.raises(ValueError, match="Wall time"):
        tune.flow_wall_seconds("Tuning failed: ...")


def test_comparisons_pair_studies_by_seed() -> None:
    def study(sampler: str, pruner: str, seed: int, best: float, epochs: int) -> dict:
        pruned = 0 if pruner == "none" else 2
        curve = [best * 2, best * 2, best]
        return {"sampler": sampler, "pruner": pruner, "seed": seed, "best": best,
                "best_so_far": curve, "epochs": epochs,
                "states": {"COMPLETE": 3 - pruned, "PRUNED": pruned}}  # fmt: skip

    studies = [
        study("tpe", "none", 1, 0.10, 100),
        study("random", "none", 1, 0.20, 100),
        study("tpe", "none", 2, 0.30, 200),
        study("random", "none", 2, 0.15, 100),
        study("tpe", "median", 1, 0.10, 50),
        study("tpe", "median", 2, 0.33, 50),
    ]

    samplers = tune.compare_samplers(studies, trials=3)
    assert samplers["tpe_over_random"] == {"median": 1.25, "min": 0.5, "max": 2.0}
    assert samplers["tpe_better_in"] == "1 of 2 seeds"
    assert samplers["best_after"]["random"] == {"3": 0.175}
    pruning = tune.compare_pruners(studies)
    assert pruning["median"]["epochs_saved"] == {"median": 0.625, "min": 0.5, "max": 0.75}
    assert pruning["median"]["pruned"]["median"] == 2
    assert pruning["median"]["best_over_none"]["max"] == pytest.approx(1.1)
    assert "hyperband" not in pruning
