"""The pre-promotion check: load as the service does, answer the input example, in time."""

from __future__ import annotations

from serving.check import check_answer, check_servable
from tests.serving.conftest import NAME, Registry

GOOD = [{"prediction": 0, "proba_0": 0.75, "proba_1": 0.25}]
COLUMNS = ("prediction", "proba_0", "proba_1")


def test_answers_are_checked_for_rows_columns_and_probabilities() -> None:
    assert check_answer(GOOD, 1, COLUMNS) == []
    assert check_answer(GOOD, 2, COLUMNS) == ["answered 1 rows for 2"]
    assert check_answer([{"prediction": 0, "proba_0": 1.0}], 1, COLUMNS) == [
        (
            "answered columns ['prediction', 'proba_0'], the signature says "
            "['prediction', 'proba_0', 'proba_1']"
        )
    ]
    assert check_answer([{**GOOD[0], "proba_1": float("nan")}], 1, COLUMNS) == [
        "probabilities outside [0, 1] or not finite in ['proba_1']"
    ]


def test_a_servable_version_passes_with_its_latency(registry: Registry) -> None:
    check = check_servable(f"models:/{NAME}/2", max_latency_ms=10_000, repeats=3)

    assert check.passed and check.latency_ms > 0
    assert check.describe().startswith(
        "the service loads it and answers its input example (median "
    )


def test_too_slow_or_unloadable_versions_fail_with_the_reason(registry: Registry) -> None:
    slow = check_servable(f"models:/{NAME}/1", max_latency_ms=1e-6, repeats=3)
    unloadable = check_servable(f"models:/{NAME}/1", max_latency_ms=10_000, variant="tflite")

    assert not slow.passed and slow.problems[0].startswith("median latency ")
    assert slow.problems[0].endswith("is above register.max_latency_ms 1e-06")
    assert unloadable.problems[0].startswith("the service cannot load it: ")
    assert "unknown model variant 'tflite'" in unloadable.describe()
