"""ONNX and int8 variants: export, accuracy vs the float network, size, MLflow logging, loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from model import variants
from model.nets import build_network
from model.servable import log_servable
from stages.common import tracking
from stages.common.config import TrainParams
from stages.common.errors import DataError, PipelineError
from stages.register import stage as register
from tests.builders import make_params
from tests.stages.register.test_stage import NAME, params_file, prepare, register_args

FEW = (5, 3)  # latency repeats: the numbers are logged, never asserted
ONNX_TOLERANCE = 1e-5  # float32 ONNX vs torch: same arithmetic, different kernels
INT8_MAX_DROP = 0.05  # int8 may cost a little accuracy, never much on this data


def test_compare_variants_reports_the_drop_against_the_reference() -> None:
    X = np.zeros((4, 2), dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    exact = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    one_wrong = exact.copy()
    one_wrong[3] = [0.4, 0.6]

    metrics = variants.compare_variants(
        {"torch": lambda _: exact, "int8": lambda _: one_wrong}, X, labels, repeats=(1, 1)
    )

    assert metrics["variant.torch.accuracy"] == 1.0
    assert metrics["variant.int8.accuracy"] == 0.75
    assert metrics["variant.int8.accuracy_drop"] == 0.25
    assert metrics["variant.int8.max_proba_diff"] == pytest.approx(0.2)
    assert metrics["variant.torch.latency_ms_row"] >= 0


def test_onnx_matches_torch_and_int8_is_smaller(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    features, models = trained
    folder = variants.build_variants(
        features / "preprocessor.joblib", models / "model.pt", tmp_path / "variants"
    )
    test = pd.read_parquet(features / "test.parquet")

    metrics = variants.evaluate_variants(folder, models / "model.pt", test, repeats=FEW)

    assert metrics["variant.onnx.max_proba_diff"] < ONNX_TOLERANCE
    assert metrics["variant.onnx.accuracy_drop"] == 0.0
    assert metrics["variant.int8.accuracy_drop"] <= INT8_MAX_DROP
    assert metrics["variant.int8.accuracy"] >= 0.8
    assert metrics["variant.int8.size_bytes"] < metrics["variant.onnx.size_bytes"]
    # the batch axis is dynamic: one row and many rows through the same file
    scorer = variants.load_onnx_scorer(folder, "onnx")
    one, many = scorer.predict(test.head(1)), scorer.predict(test)
    assert len(one) == 1 and len(many) == len(test)
    assert one.iloc[0].equals(many.iloc[0])


def test_cnn_exports_with_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    params = TrainParams(model="cnn", image_shape=[1, 8, 8], channels=[4, 8])
    module = build_network(params, n_features=64, n_classes=10).eval()

    path = variants.export_onnx(module, 64, tmp_path / "cnn.onnx")

    session = variants.open_session(path)
    for n in (1, 5):
        X = np.random.default_rng(n).normal(size=(n, 64)).astype(np.float32)
        (proba,) = session.run([variants.OUTPUT_NAME], {variants.INPUT_NAME: X})
        expected = torch.softmax(module(torch.from_numpy(X)), dim=1).detach().numpy()
        np.testing.assert_allclose(proba, expected, atol=ONNX_TOLERANCE)


def test_register_logs_the_variants_and_the_loader_serves_them(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())
    assert register.main(register_args(work, params_file(tmp_path / "p.yaml"))) == 0

    uri = f"models:/{NAME}@champion"
    run_id = mlflow.models.get_model_info(uri).run_id
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    for name in ("onnx", "int8"):
        for metric in (
            "accuracy",
            "accuracy_drop",
            "size_bytes",
            "latency_ms_row",
            "latency_ms_batch64",
        ):
            assert f"variant.{name}.{metric}" in metrics
    assert metrics["variant.onnx.accuracy_drop"] == 0.0
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "variants")}
    assert logged == {
        "variants/model.onnx",
        "variants/model.int8.onnx",
        "variants/preprocessor.joblib",
    }

    rows = pd.read_parquet(work / "features" / "test.parquet").drop(columns=["target"])
    served = {name: variants.load_variant(uri, name).predict(rows) for name in variants.VARIANTS}
    assert (
        list(served["onnx"].columns)
        == list(served["pyfunc"].columns)
        == ["prediction", "proba_0", "proba_1"]
    )
    assert list(served["int8"].columns) == list(served["pyfunc"].columns)
    pd.testing.assert_frame_equal(served["onnx"], served["pyfunc"], atol=ONNX_TOLERANCE)
    agree = (served["int8"]["prediction"] == served["pyfunc"]["prediction"]).mean()
    assert agree >= 1 - INT8_MAX_DROP
    # the service's --variant flag goes through the same loader
    from serving.model import load_model

    loaded = load_model(uri, "int8")
    assert (loaded.version, loaded.variant) == ("1", "int8")
    pd.testing.assert_frame_equal(loaded.predict(rows), served["int8"])


def test_loader_names_the_problem(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    features, models = trained
    tracking.configure_mlflow(make_params().mlflow)
    with mlflow.start_run():  # a version logged the old way: the pyfunc without variants
        log_servable(
            features / "preprocessor.joblib",
            models / "model.pt",
            pd.read_parquet(features / "test.parquet").head(5),
            registered_model_name="plain",
        )

    with pytest.raises(
        PipelineError,
        match=r"models:/plain/1: run \w+ has no variants/ "
        r"artifacts .*serve it with variant 'pyfunc'",
    ):
        variants.load_variant("models:/plain/1", "onnx")
    with pytest.raises(
        PipelineError,
        match=r"unknown model variant 'fp16' \(one of pyfunc, "
        r"onnx, int8\)",
    ):
        variants.load_variant("models:/plain/1", "fp16")  # type: ignore[arg-type]
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy2(features / "preprocessor.joblib", empty / variants.PREPROCESSOR_FILE)
    with pytest.raises(DataError, match=r"no int8 variant here.*model\.int8\.onnx"):
        variants.load_onnx_scorer(empty, "int8")
