"""The compress stage on the other parents: a gbdt (prune and quantize skipped, distill teaches
an MLP), a CNN on sklearn's digits (channels pruned, static int8 calibrated on train rows), a
transformer (dynamic int8), an LSTM (its recurrent weights int8; a GRU skipped), and an
ensemble (distilled into one student)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model import ensemble
from model.nets import load_network
from model.onnx_model import load_onnx_model
from tests.builders import breast_cancer_frame, build_trained, make_params
from tests.stages.compress.test_stage import run_stage, workspace


def _trained(factory: pytest.TempPathFactory, name: str, train: dict, frame: pd.DataFrame):
    root = factory.mktemp(name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        return build_trained(root, make_params({"train": train}), frame)


def digits_frame() -> pd.DataFrame:
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame  # pixel_<row>_<col> columns, target 0-9


@pytest.fixture(scope="module")
def gbdt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _trained(tmp_path_factory, "gbdt", {"model": "gbdt", "max_epochs": 5},
                    breast_cancer_frame())  # fmt: skip


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    train = {"model": "cnn", "image_shape": [1, 8, 8], "channels": [8, 16], "max_epochs": 5,
             "patience": 3}  # fmt: skip
    return _trained(tmp_path_factory, "cnn", train, digits_frame())


def test_a_gbdt_parent_is_distilled_and_neither_pruned_nor_quantized(
    tmp_path: Path, mlflow_uri: str, gbdt: tuple[Path, Path]
) -> None:
    root = workspace(tmp_path, gbdt)

    code, report = run_stage(root, {"max_relative_drop": 0.2, "min_size_ratio": 2.0})

    assert code == 0 and report["parent"]["family"] == "gbdt"
    candidates = report["candidates"]
    for method, words in (("prune", "needs a network"), ("quantize", "no ONNX export")):
        assert candidates[method]["status"] == "skipped" and words in candidates[method]["reason"]
        assert candidates[method]["file"] is None
    distilled = candidates["distill"]
    _, student = load_network(tmp_path / distilled["file"])
    assert student["train_params"]["model"] == "mlp"
    assert student["train_params"]["hidden_sizes"] == [4]
    # the trees' file is far larger than a 4-unit MLP; the student reads the encoded view
    assert distilled["size_ratio"] > 2 and distilled["status"] == "passed", distilled["reason"]
    assert report["chosen"] == "distill"


@pytest.mark.slow
def test_a_cnn_is_pruned_by_channels_and_quantized_statically(
    tmp_path: Path, mlflow_uri: str, cnn: tuple[Path, Path]
) -> None:
    root = workspace(tmp_path, cnn)
    n_train = len(pd.read_parquet(root / "features" / "train.parquet"))

    code, report = run_stage(root, {"calibration_rows": 100, "distill_channels": [4],
                                    "max_relative_drop": 0.2})  # fmt: skip

    assert code == 0 and report["parent"]["family"] == "cnn"
    candidates = report["candidates"]
    pruned, meta = load_network(tmp_path / candidates["prune"]["file"])
    assert meta["train_params"]["channels"] == [4, 8]
    assert (
        candidates["prune"]["details"]["parameters"]["pruned"]
        < (candidates["prune"]["details"]["parameters"]["parent"])
    )
    quantized = candidates["quantize"]
    assert quantized["details"]["mode"] == "static" and n_train > 100
    assert quantized["details"]["calibration_rows"] == 100
    int8 = load_onnx_model(tmp_path / quantized["file"])
    assert int8.meta["compress"]["quantization"] == "static"
    # static int8: weights and activations int8, yet nearly the parent's accuracy
    parent_accuracy = report["parent"]["metrics"]["accuracy"]
    assert quantized["metrics"]["accuracy"] >= parent_accuracy - 0.05
    # int8 weights and QDQ around every conv; on a network this small the added nodes outweigh
    # the 4x smaller weights (the file is larger than the float model.pt): measured, reported
    import onnx

    graph = onnx.load(str(tmp_path / quantized["file"])).graph
    assert {t.data_type for t in graph.initializer} >= {onnx.TensorProto.INT8}
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) >= 2
    _, student = load_network(tmp_path / candidates["distill"]["file"])
    assert (student["train_params"]["model"], student["train_params"]["channels"]) == ("cnn", [4])
    # static scales are fixed: a row's probabilities do not depend on the batch it comes in
    X = np.random.default_rng(0).random((9, 64)).astype(np.float32) * 16
    np.testing.assert_allclose(int8.predict_proba(X[:1]), int8.predict_proba(X)[:1], atol=1e-6)


@pytest.mark.slow
def test_a_transformer_is_quantized_dynamically_and_not_pruned(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, mlflow_uri: str
) -> None:
    train = {"model": "transformer", "max_epochs": 3, "transformer": {"d_token": 8, "n_blocks": 1,
             "n_heads": 2, "ffn_factor": 1.0}}  # fmt: skip
    trained = _trained(tmp_path_factory, "transformer", train, breast_cancer_frame())
    root = workspace(tmp_path, trained)

    code, report = run_stage(root, {"methods": ["prune", "quantize"]})

    assert code == 0
    candidates = report["candidates"]
    assert candidates["prune"]["status"] == "skipped"
    assert "attention heads" in candidates["prune"]["reason"]
    assert candidates["quantize"]["details"]["mode"] == "dynamic"
    assert candidates["quantize"]["metrics"]["accuracy"] > 0.8


@pytest.mark.slow
def test_an_lstm_is_quantized_to_int8_and_a_gru_is_skipped(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, mlflow_uri: str
) -> None:
    import onnx

    from stages.compress.stage import skip_reason

    train = {"model": "rnn", "max_epochs": 3, "rnn": {"sequence_length": 5, "cell": "lstm",
             "hidden_size": 64}}  # fmt: skip
    trained = _trained(tmp_path_factory, "rnn", train, breast_cancer_frame())
    root = workspace(tmp_path, trained)

    code, report = run_stage(root, {"methods": ["quantize"], "max_relative_drop": 0.05})

    assert code == 0 and report["parent"]["family"] == "rnn"
    quantized = report["candidates"]["quantize"]
    details = quantized["details"]
    assert details["mode"] == "dynamic" and details["pre_processed"] is True
    # the LSTM's weights became int8 (DynamicQuantizeLSTM), not only the head's
    assert details["int8_weight_share"] > 0.9
    graph = onnx.load(str(tmp_path / quantized["file"])).graph
    ops = {node.op_type for node in graph.node}
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    assert details["int8_vs_float_onnx"]["size_ratio"] > 3  # ~4x: int8 vs float32 weights
    assert quantized["size_ratio"] > 2.5, quantized["reason"]  # vs the parent's model.pt
    assert quantized["metrics"]["accuracy"] > 0.8
    # the same parent with a GRU cell: skipped, the reason saying why (train_params as stored)
    train_params = load_onnx_model(tmp_path / quantized["file"]).meta["train_params"]
    assert train_params["rnn"]["cell"] == "lstm"
    gru = {**train_params, "rnn": {**train_params["rnn"], "cell": "gru"}}
    assert "no int8 GRU kernel" in skip_reason("quantize", "rnn", gru)


def test_an_ensemble_parent_is_distilled_into_one_student(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], gbdt: tuple[Path, Path]
) -> None:
    root = workspace(tmp_path, trained, ensemble="built")
    members = [
        {"name": "train", "source": "train", "file": root / "models" / "model.pt"},
        {"name": "gbdt", "source": "family:gbdt", "file": gbdt[1] / "model.skops"},
    ]
    ensemble.write_ensemble(root / "ensemble" / "model.ensemble.zip", members, "mean")

    code, report = run_stage(root, {"max_relative_drop": 0.2})

    assert code == 0 and report["parent"]["family"] == "ensemble"
    assert report["parent"]["file"].endswith("model.ensemble.zip")
    candidates = report["candidates"]
    assert candidates["prune"]["status"] == candidates["quantize"]["status"] == "skipped"
    assert "ensemble" in candidates["quantize"]["reason"]
    _, student = load_network(tmp_path / candidates["distill"]["file"])
    assert student["compress"]["parent_file"] == "model.ensemble.zip"
    assert candidates["distill"]["metrics"]["accuracy"] > 0.8
    assert json.loads((root / "compact" / "report.json").read_text()) == report
