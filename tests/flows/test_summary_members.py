"""The run summary shows an ensemble's members beside it and register's compact model."""

from __future__ import annotations

from flows.summary import ensemble_members, render_markdown, summarize_run

METRICS = {
    "accuracy": 0.99,
    "f1_macro": 0.98,
    "log_loss": 0.05,
    "baseline_majority_f1_macro": 0.39,
    "strong_gbdt_f1_macro": 0.97,
    "member_train_f1_macro": 0.96,
    "member_train_accuracy": 0.97,
    "member_seed_1_f1_macro": 0.95,  # a member name holding an underscore
    "member_seed_1_accuracy": 0.96,
}
REGISTRATION = {
    "model_name": "clf",
    "version": 3,
    "decision": "promoted",
    "reason": "beats v1",
    "compact": {
        "status": "registered",
        "version": 4,
        "method": "quantize",
        "reason": "3.4x faster",
    },
}


def test_members_are_read_from_evaluates_keys() -> None:
    assert ensemble_members(METRICS) == {
        "train": {"f1_macro": 0.96, "accuracy": 0.97},
        "seed_1": {"f1_macro": 0.95, "accuracy": 0.96},
    }
    assert ensemble_members({"f1_macro": 0.9}) is None  # no ensemble: no table
    assert ensemble_members(None) is None


def test_markdown_has_the_members_table_and_the_compact_line() -> None:
    reports = {"metrics": METRICS, "registration": REGISTRATION, "run": None}
    summary = summarize_run(["evaluate", "register"], {}, reports, "http://127.0.0.1:5000")
    text = render_markdown(summary)
    assert "## Ensemble members on the same test split" in text
    assert "| seed_1 | 0.9500 | 0.9600 |" in text
    assert "| member_train_f1_macro |" not in text  # not repeated in the metrics table
    assert "- Compact model: version **4** (quantize), registered: 3.4x faster" in text
