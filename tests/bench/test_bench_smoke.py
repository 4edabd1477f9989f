"""Smoke runs of the benchmarks at minimal sizes, so their code cannot rot.

Nothing here is timed or compared: the real numbers come from ``make bench-train``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import train_loop, train_mlflow
from bench.common import peak_bf16_flops
from stages.common.io import read_json

TINY = ["--repeats", "1", "--warmup", "0", "--device", "cpu", "--batch-size", "16", "--epochs", "1"]
TINY_LOOP = [
    *TINY,
    "--rows",
    "64",
    "--features",
    "4",
    "--cnn-rows",
    "32",
    "--image-size",
    "4",
    "--classes",
    "2",
]


def test_train_loop_writes_samples_per_s_and_ratios(tmp_path: Path) -> None:
    assert train_loop.main([*TINY_LOOP, "--no-lightning", "--results-dir", str(tmp_path)]) == 0

    result = read_json(tmp_path / "train_loop.json")
    assert {"cpu", "cpu_count", "torch", "device"} <= set(result["machine"])
    assert [case["model"] for case in result["cases"]] == ["mlp", "cnn"]
    for case in result["cases"]:
        assert set(case["samples_per_s"]) == {"stage", "bare"}
        assert case["samples_per_s"]["stage"]["median"] > 0
        assert set(case["ratios"]) == {"stage/bare"}
        assert case["flops"]["per_sample_train_step"] > 0


def test_train_loop_against_lightning(tmp_path: Path) -> None:
    if os.environ.get("CI"):  # `make test` installs it first (make bench-setup): fail, not skip
        import pytorch_lightning  # noqa: F401
    else:
        pytest.importorskip("pytorch_lightning", reason="bench-only dependency: make bench-setup")
    assert train_loop.main([*TINY_LOOP, "--cases", "mlp", "--results-dir", str(tmp_path)]) == 0

    (case,) = read_json(tmp_path / "train_loop.json")["cases"]
    assert set(case["ratios"]) == {"stage/bare", "stage/lightning"}


@pytest.mark.slow
def test_train_mlflow_logs_into_a_temporary_store_only(tmp_path: Path) -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    argv = [*TINY, "--cases", "pipeline", "--pipeline-epochs", "2", "--results-dir", str(tmp_path)]
    assert train_mlflow.main(argv) == 0

    result = read_json(tmp_path / "train_mlflow.json")
    (case,) = result["cases"]
    assert case["case"] == "pipeline" and case["epochs"] == 2
    assert set(case["ratios"]) == {"batched/off", "sync/off", "async/off"}
    assert result["per_call"]["log_epoch_sync_ms"] > 0
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the temp store is forgotten


def test_peak_table_matches_specific_names_first() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("Some Unknown GPU") is None
