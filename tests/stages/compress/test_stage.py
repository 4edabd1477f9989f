"""The compress stage on a real trained MLP (breast cancer): every method builds a model file
that loads, the gate passes and fails candidates for the reason it says, the report and the
run record it all; disabled; a failure leaves the previous folder; fitting never sees test."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from model.artifacts import file_sha256
from model.nets import load_network
from model.onnx_model import load_onnx_model
from stages.compress import candidate, gate
from stages.compress import stage as compress
from tests.builders import TEST_PARAMS, fresh_run, make_params

FAST = {"row_repeats": 5, "batch_repeats": 3, "distill_hidden_sizes": [4], "distill_epochs": 30}
# Gains by size only (latency is noise on a shared machine): the parent MLP [16] is ~5.5 kB,
# the pruned [8] ~1.2x and the student [4] ~1.3x smaller (a model.pt has ~3.5 kB of overhead).
BY_SIZE = {"max_relative_drop": 0.5, "min_speedup": 1e6, "min_size_ratio": 1.1}


def workspace(root: Path, trained: tuple[Path, Path], ensemble: str = "disabled") -> Path:
    """features/, models/ (with a fresh run in this test's store), ensemble/report.json."""
    shutil.copytree(trained[0], root / "features")
    shutil.copytree(trained[1], root / "models")
    fresh_run(root / "models", make_params())
    (root / "ensemble").mkdir()
    (root / "ensemble" / "report.json").write_text(json.dumps({"status": ensemble}))
    return root


def params_file(path: Path, compress_params: dict) -> Path:
    raw = {name: dict(section) for name, section in TEST_PARAMS.items()}
    raw["compress"] = {**FAST, **compress_params}
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def run_stage(root: Path, compress_params: dict) -> tuple[int, dict]:
    code = compress.main([
        "--features", str(root / "features"),
        "--model", str(root / "models"),
        "--ensemble", str(root / "ensemble"),
        "--out", str(root / "compact"),
        "--params", str(params_file(root / "params.yaml", compress_params)),
    ])  # fmt: skip
    report = root / "compact" / "report.json"
    return code, json.loads(report.read_text()) if report.is_file() else {}


def run_metrics(root: Path) -> dict[str, float]:
    run_id = json.loads((root / "models" / "run.json").read_text())["run_id"]
    return mlflow.MlflowClient().get_run(run_id).data.metrics


def test_every_method_builds_a_loadable_model_and_the_gate_chooses(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    root = workspace(tmp_path, trained)

    code, report = run_stage(root, BY_SIZE)

    assert code == 0 and report["status"] == "built"
    parent = report["parent"]
    assert parent["file"] == str(root / "models" / "model.pt") and parent["family"] == "mlp"
    assert parent["sha256"] == file_sha256(root / "models" / "model.pt")
    candidates = report["candidates"]
    assert set(candidates) == {"prune", "quantize", "distill"}
    for method, c in candidates.items():
        assert c["file"] == f"compact/{method}/{compress.METHOD_FILES[method]}"
        assert (tmp_path / c["file"]).is_file() and c["sha256"] == file_sha256(tmp_path / c["file"])
        assert c["size_bytes"] == (tmp_path / c["file"]).stat().st_size
        assert c["speedup"] == pytest.approx(parent["latency_ms_row"] / c["latency_ms_row"])
        assert c["size_ratio"] == pytest.approx(parent["size_bytes"] / c["size_bytes"])
        assert c["status"] in ("passed", "failed") and c["reason"]
    for method in ("prune", "distill"):
        assert candidates[method]["status"] == "passed", candidates[method]["reason"]
    assert report["chosen"] == gate.choose(candidates, "accuracy")
    assert report["chosen_file"] == candidates[report["chosen"]]["file"]

    pruned, meta = load_network(tmp_path / candidates["prune"]["file"])  # a smaller MLP
    assert (
        meta["train_params"]["hidden_sizes"]
        == [8]
        == candidates["prune"]["details"]["widths"]["pruned"]
    )
    assert meta["compress"]["parent_sha256"] == parent["sha256"]
    _, student = load_network(tmp_path / candidates["distill"]["file"])
    assert student["train_params"]["hidden_sizes"] == [4]
    int8 = load_onnx_model(tmp_path / candidates["quantize"]["file"])
    assert int8.meta["compress"]["quantization"] == "dynamic" and int8.n_features == 30
    # what int8 buys over the float ONNX graph it is made from (measured, not kept)
    details = candidates["quantize"]["details"]
    assert details["int8_weight_share"] > 0.9 and details["pre_processed"] is False
    float_onnx, versus = details["float_onnx"], details["int8_vs_float_onnx"]
    assert float_onnx["accuracy"] >= parent["metrics"]["accuracy"] - 1e-9  # same network
    assert versus["size_ratio"] == pytest.approx(
        float_onnx["size_bytes"] / candidates["quantize"]["size_bytes"]
    )
    assert versus["size_ratio"] > 1 and versus["speedup"] > 0
    assert sorted(p.name for p in (root / "compact" / "quantize").iterdir()) == ["model.int8.onnx"]

    logged = run_metrics(root)
    for method in candidates:
        for key in ("accuracy", "speedup", "size_ratio", "relative_drop", "passed"):
            assert f"compress.{method}.{key}" in logged
    assert logged["compress.parent.accuracy"] == parent["metrics"]["accuracy"]
    run_id = report["run_id"]
    assert mlflow.get_run(run_id).data.tags["compress.chosen"] == report["chosen"]
    stored = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "compact")}
    assert {"compact/report.json", "compact/prune", "compact/quantize", "compact/distill"} <= stored


def test_a_candidate_that_loses_too_much_fails_and_none_is_chosen(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    root = workspace(tmp_path, trained)
    # 95% of the hidden units gone and no fine-tuning: one unit left to tell the classes apart
    lossy = {"methods": ["prune"], "prune_fraction": 0.95, "finetune_epochs": 0,
             "metric": "log_loss", "max_relative_drop": 0.0}  # fmt: skip

    code, report = run_stage(root, lossy)

    assert code == 0
    prune = report["candidates"]["prune"]
    assert prune["details"]["widths"]["pruned"] == [1]
    assert prune["status"] == "failed" and prune["relative_drop"] > 0
    assert prune["reason"].startswith("loses too much: log_loss")
    assert (report["status"], report["chosen"], report["chosen_file"]) == (
        "none_passed",
        None,
        None,
    )
    assert "no candidate passed" in report["reason"]
    assert run_metrics(root)["compress.prune.passed"] == 0.0


def test_a_candidate_neither_faster_nor_smaller_enough_fails(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    root = workspace(tmp_path, trained)
    greedy = {"methods": ["prune", "distill"], "max_relative_drop": 0.99,
              "min_speedup": 1e6, "min_size_ratio": 1e6}  # fmt: skip

    code, report = run_stage(root, greedy)

    assert code == 0 and report["status"] == "none_passed"
    for c in report["candidates"].values():
        assert c["status"] == "failed" and c["reason"].startswith("gains too little")
        assert "(< 1e+06x)" in c["reason"]


def test_a_candidate_that_builds_but_cannot_be_measured_fails_alone(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = workspace(tmp_path, trained)
    real_build = candidate.build

    def corrupt_int8(method: str, parent, data, params, out: Path, meta, scratch) -> dict:  # noqa: ANN001
        details = real_build(method, parent, data, params, out, meta, scratch)
        if method == "quantize":  # built fine, then unreadable: onnxruntime refuses to load it
            out.write_bytes(b"not an onnx graph")
        return details

    monkeypatch.setattr(candidate, "build", corrupt_int8)

    code, report = run_stage(root, {"methods": ["quantize", "distill"], **BY_SIZE})

    assert code == 0 and report["status"] == "built"
    quantize = report["candidates"]["quantize"]
    assert quantize["status"] == "failed" and quantize["file"] is None
    assert quantize["reason"].startswith("could not load and measure it: ")
    assert "model.int8.onnx" in quantize["reason"]
    assert not (root / "compact" / "quantize").exists()  # no unusable file kept or logged
    assert report["chosen"] == "distill"
    assert "compress.quantize.passed" not in run_metrics(root)


def test_disabled_writes_the_report_only(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    root = workspace(tmp_path, trained)

    code, report = run_stage(root, {"enabled": False})

    assert code == 0 and report["status"] == "disabled"
    assert (report["candidates"], report["chosen"], report["chosen_file"]) == ({}, None, None)
    assert report["parent"]["sha256"] == file_sha256(root / "models" / "model.pt")
    assert [p.name for p in (root / "compact").iterdir()] == ["report.json"]
    assert not [k for k in run_metrics(root) if k.startswith("compress.")]


def test_a_failure_leaves_the_previous_folder_and_names_the_file(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = workspace(tmp_path, trained)
    assert run_stage(root, {"enabled": False})[0] == 0
    before = (root / "compact" / "report.json").read_bytes()
    test = root / "features" / "test.parquet"
    pd.read_parquet(test).drop(columns=["target"]).to_parquet(test)

    with caplog.at_level(logging.ERROR):
        code, _ = run_stage(root, {"methods": ["distill"]})

    assert code == 1
    assert "target column not found" in caplog.text and "test.parquet" in caplog.text
    assert (root / "compact" / "report.json").read_bytes() == before
    assert [p.name for p in (root / "compact").iterdir()] == ["report.json"]


def test_a_missing_ensemble_report_stops_the_stage(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = workspace(tmp_path, trained)
    (root / "ensemble" / "report.json").unlink()

    with caplog.at_level(logging.ERROR):
        code, _ = run_stage(root, {})

    assert code == 1 and "run the ensemble stage" in caplog.text
    assert not (root / "compact").exists()


def test_fitting_never_sees_the_test_split(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # the same run with the test labels shuffled and its features scrambled: the candidates'
    # weights are identical (only the measured numbers move)
    first = workspace(tmp_path / "a", trained)
    second = workspace(tmp_path / "b", trained)
    test = second / "features" / "test.parquet"
    frame = pd.read_parquet(test)
    scrambled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    scrambled["target"] = frame["target"].to_numpy()[::-1]
    scrambled.to_parquet(test)
    methods = {"methods": ["prune", "distill"]}

    reports = [run_stage(root, methods)[1] for root in (first, second)]

    for method in ("prune", "distill"):
        a, b = (torch.load(r / "compact" / method / "model.pt", weights_only=True)
                for r in (first, second))  # fmt: skip
        assert a["state_dict"].keys() == b["state_dict"].keys()
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]), (method, key)
        assert a["val_loss"] == b["val_loss"]
    assert (
        reports[0]["candidates"]["prune"]["metrics"] != reports[1]["candidates"]["prune"]["metrics"]
    )
