"""The compression and ensemble benchmark at its smallest, so its code cannot rot: nothing here is
timed or compared. The real numbers come from ``make bench-compress``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench import compress
from stages.common.io import read_json
from stages.ensemble import stage as ensemble_stage


def _numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_quick_run_compresses_ensembles_and_distills_without_the_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []  # was test.parquet in the features folder when the ensemble was fitted?
    for name in ("run", "build"):
        real = getattr(ensemble_stage, name)

        def spy(features: Path, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append((Path(features) / "test.parquet").exists())
            return _real(features, *args, **kwargs)

        monkeypatch.setattr(ensemble_stage, name, spy)
    argv = ["--quick", "--cases", "breast_cancer/mlp", "--results-dir", str(tmp_path)]

    assert compress.main(argv) == 0

    result = read_json(tmp_path / "compress.json")
    assert {"cpu", "cpu_count", "torch"} <= set(result["machine"])
    assert set(result["load_average"]) == {"before", "after"}
    assert all(math.isfinite(n) for n in _numbers(result))
    case = result["cases"]["breast_cancer/mlp"]
    assert sum(case["data"]["rows"].values()) == 569
    report = case["compress"]
    assert report["parent"]["family"] == "mlp" and report["parent"]["size_bytes"] > 0
    assert set(report["candidates"]) == {"prune", "quantize", "distill"}
    for candidate in report["candidates"].values():
        assert candidate["status"] in {"passed", "failed"}, candidate["reason"]
        assert candidate["speedup"] > 0 and candidate["size_ratio"] > 0
    ensemble = case["ensemble"]
    # run once (which calls build), then build for each other method: never with test there
    assert len(seen) == len(compress.FUSIONS) + 1 and not any(seen)
    assert [m["name"] for m in ensemble["members"]] == ["train", "seed1", "gbdt"]
    assert set(ensemble["fusions"]) == set(compress.FUSIONS)
    for method, fused in ensemble["fusions"].items():
        assert isinstance(fused["beats_best_member"], bool)
        assert fused["beats_best_member"] == (fused["f1_minus_best_member"] > 0)
        if method in {"caruana", "weighted"}:
            assert sum(fused["weights"]) == pytest.approx(1.0)
    beats = result["summary"]["beats_best_member"]["breast_cancer/mlp"]
    assert beats == [m for m, f in ensemble["fusions"].items() if f["beats_best_member"]]
    distill = case["distill"]
    assert distill["parent"]["family"] == "ensemble" and distill["parent_method"] == "caruana"
    assert {m: c["status"] for m, c in distill["candidates"].items()}.keys() == {
        "prune",
        "quantize",
        "distill",
    }
    assert distill["candidates"]["prune"]["status"] == "skipped"
    assert distill["candidates"]["quantize"]["status"] == "skipped"
    assert distill["candidates"]["distill"]["status"] in {"passed", "failed"}


def _member(name: str, f1: float, val_loss: float) -> dict[str, Any]:
    return {"name": name, "test_f1_macro": f1, "test_log_loss": 1 - f1, "val_log_loss": val_loss,
            "test_errors": round(100 * (1 - f1))}  # fmt: skip


def test_the_ensemble_is_compared_with_its_best_member_and_says_why_it_does_not_beat_it() -> None:
    report = {"val_accuracy": 0.9, "val_f1_macro": 0.9, "val_log_loss": 0.2, "weights": None}
    members = [_member("a", 0.90, 0.3), _member("b", 0.95, 0.1)]

    def compare(f1: float, members: list[dict[str, Any]] = members) -> dict[str, Any]:
        metrics = {"accuracy": f1, "f1_macro": f1, "log_loss": 0.1, "errors": round(100 * (1 - f1))}
        return compress.compare(metrics, members, report)

    won = compare(0.97)
    assert won["beats_best_member"] and won["why_not"] is None
    assert won["best_member"] == "b" and won["f1_minus_best_member"] == pytest.approx(0.02)
    assert won["val_pick"] == "b" and (won["test_errors"], won["best_member_errors"]) == (3, 5)
    assert compare(0.95)["why_not"] == "a tie with b"
    assert compare(0.92)["why_not"] == "b alone is better on test"
    perfect = compare(1.0, [_member("a", 0.9, 0.3), _member("c", 1.0, 0.4)])
    assert not perfect["beats_best_member"]
    assert perfect["why_not"] == "the best member (c) is already perfect on test"


def test_the_distilled_parent_must_be_one_of_the_fusions(tmp_path: Path) -> None:
    argv = ["--fusions", "mean", "--distill-parent", "caruana", "--results-dir", str(tmp_path)]

    with pytest.raises(SystemExit):
        compress.main(argv)
    assert not (tmp_path / "compress.json").exists()
