"""The export stage: ONNX and int8 variants (export, accuracy vs the float network, size),
logged to the train run before register records them; never rewritten once recorded; the
loader."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from model import artifacts, variants
from model.nets import build_network
from model.servable import log_servable
from stages.common import onnx_export, tracking
from stages.common.config import TrainParams
from stages.common.errors import DataError, PipelineError
from stages.export import compare, onnx
from stages.export import stage as export
from stages.register import stage as register
from tests.builders import make_params
from tests.stages.register.test_stage import LOOSE, NAME, params_file, prepare, register_args

FEW = (5, 3)  # latency repeats: the numbers are logged, never asserted
QUICK = {"export": {"row_repeats": FEW[0], "batch_repeats": FEW[1]}}
ONNX_TOLERANCE = 1e-5  # float32 ONNX vs torch: same arithmetic, different kernels
INT8_MAX_DROP = 0.05  # int8 may cost a little accuracy, never much on this data
FILES_INT8 = "variants/model.int8.onnx"
FILES = {"variants/model.onnx", FILES_INT8, "variants/preprocessor.joblib"}
METRICS = ("accuracy", "accuracy_drop", "size_bytes", "latency_ms_row", "latency_ms_batch64")


def export_args(root: Path, params: Path) -> list[str]:
    return [
        "--features",
        str(root / "features"),
        "--model",
        str(root / "models"),
        "--out",
        str(root / "reports" / "export.json"),
        "--params",
        str(params),
    ]


def stored_variants(run_id: str) -> dict[str, str]:
    """``variants/<file> -> sha256`` of the run's stored variants."""
    location = mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")
    return artifacts.hash_folder(Path(location) / variants.ARTIFACT_DIR, "variants/")


def test_compare_variants_reports_the_drop_against_the_reference() -> None:
    X = np.zeros((4, 2), dtype=np.float32)
    labels = np.array([0, 1, 1, 0])
    exact = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    one_wrong = exact.copy()
    one_wrong[3] = [0.4, 0.6]

    metrics = compare.compare_variants(
        {"torch": lambda _: exact, "int8": lambda _: one_wrong}, X, labels, repeats=(1, 1)
    )

    assert metrics["variant.torch.accuracy"] == 1.0
    assert metrics["variant.int8.accuracy"] == 0.75
    assert metrics["variant.int8.accuracy_drop"] == 0.25
    assert metrics["variant.int8.max_proba_diff"] == pytest.approx(0.2)
    assert metrics["variant.torch.latency_ms_row"] >= 0


def test_onnx_matches_torch_and_int8_is_smaller(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    features, models = trained
    folder = onnx.build_variants(
        features / "preprocessor.joblib", models / "model.pt", tmp_path / "variants"
    )
    test = pd.read_parquet(features / "test.parquet")

    metrics = compare.evaluate_variants(folder, models / "model.pt", test, repeats=FEW)

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

    path = onnx_export.export_onnx(module, 64, tmp_path / "cnn.onnx")  # shared with compress

    session = variants.open_session(path)
    for n in (1, 5):
        X = np.random.default_rng(n).normal(size=(n, 64)).astype(np.float32)
        (proba,) = session.run([variants.OUTPUT_NAME], {variants.INPUT_NAME: X})
        expected = torch.softmax(module(torch.from_numpy(X)), dim=1).detach().numpy()
        np.testing.assert_allclose(proba, expected, atol=ONNX_TOLERANCE)


@pytest.mark.slow
def test_export_logs_the_variants_register_records_them_and_the_loader_serves_them(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())
    quick = params_file(tmp_path / "p.yaml", QUICK)

    assert export.main(export_args(work, quick)) == 0

    report = json.loads((work / "reports" / "export.json").read_text())
    run_id = json.loads((work / "models" / "run.json").read_text())["run_id"]
    assert (report["run_id"], report["status"]) == (run_id, "exported")
    assert set(report["files"]) == FILES and report["files"] == stored_variants(run_id)
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    for name in ("onnx", "int8"):
        for metric in METRICS:
            assert f"variant.{name}.{metric}" in metrics
            assert (
                report["metrics"][f"variant.{name}.{metric}"] == metrics[f"variant.{name}.{metric}"]
            )
    assert metrics["variant.onnx.accuracy_drop"] == 0.0

    # register exports nothing: it records the variants export logged with the version
    assert register.main(register_args(work, quick)) == 0
    uri = f"models:/{NAME}@champion"
    tags = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").tags
    manifest = json.loads(tags[artifacts.MANIFEST_TAG])
    assert {k: v for k, v in manifest.items() if k.startswith("variants/")} == report["files"]

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


@pytest.mark.slow
def test_export_again_after_registration_keeps_the_recorded_variants(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # export's params change after a version from this train run recorded the variants'
    # hashes: new files would break that version's checks, so the stage keeps them and says so
    work = prepare(tmp_path / "v1", trained, make_params(QUICK), export=True)
    before = json.loads((work / "reports" / "export.json").read_text())
    assert register.main(register_args(work, params_file(tmp_path / "p.yaml", QUICK))) == 0

    changed = params_file(tmp_path / "changed.yaml", {"export": {"row_repeats": 4, "opset": 19}})
    with caplog.at_level(logging.WARNING):
        assert export.main(export_args(work, changed)) == 0

    report = json.loads((work / "reports" / "export.json").read_text())
    assert report["status"] == "kept" and report["run_id"] == before["run_id"]
    assert f"{NAME} v1 recorded their hashes at registration" in report["reason"]
    assert report["files"] == before["files"] == stored_variants(before["run_id"])
    assert report["metrics"] == before["metrics"]
    assert f"variants/ kept as they are: {NAME} v1 recorded" in caplog.text
    # the version still verifies and serves its variants; register again: identical
    assert variants.load_variant(f"models:/{NAME}/1", "int8") is not None
    assert register.main(register_args(work, params_file(tmp_path / "p.yaml", QUICK))) == 0
    record = json.loads((work / "reports" / "registration.json").read_text())
    assert record["decision"] == "identical"


@pytest.mark.slow
def test_export_disabled_logs_no_variants_and_register_takes_none(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params(), export=False)
    off = params_file(tmp_path / "off.yaml", {**LOOSE, "export": {"enabled": False}})

    assert export.main(export_args(work, off)) == 0

    report = json.loads((work / "reports" / "export.json").read_text())
    assert (report["status"], report["files"], report["metrics"]) == ("disabled", {}, {})
    assert not artifacts.has_variants(report["run_id"])
    assert register.main(register_args(work, off)) == 0
    tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
    assert not [k for k in json.loads(tags[artifacts.MANIFEST_TAG]) if k.startswith("variants/")]
    with pytest.raises(PipelineError, match="has no variants/ artifacts"):
        variants.load_variant(f"models:/{NAME}/1", "onnx")


@pytest.mark.slow
def test_register_refuses_an_export_report_of_another_run(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params(QUICK), export=True)
    stale = json.loads((work / "reports" / "export.json").read_text())
    (work / "reports" / "export.json").write_text(json.dumps({**stale, "run_id": "0" * 32}))

    assert register.main(register_args(work, params_file(tmp_path / "p.yaml", QUICK))) == 1

    assert f"the export report is about run {'0' * 32}" in caplog.text
    assert "re-run export" in caplog.text
    assert not mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")


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


@pytest.mark.slow
def test_variants_an_earlier_export_left_are_not_recorded_once_export_is_disabled(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # export ran enabled for this train run, then export.enabled became false and export ran
    # again (train did not): its report says disabled, yet the run still holds variants/
    work = prepare(tmp_path / "v1", trained, make_params(QUICK), export=True)
    off = params_file(tmp_path / "off.yaml", {**LOOSE, "export": {"enabled": False}})
    assert export.main(export_args(work, off)) == 0
    report = json.loads((work / "reports" / "export.json").read_text())
    assert report["status"] == "disabled" and artifacts.has_variants(report["run_id"])

    with caplog.at_level(logging.WARNING):
        assert register.main(register_args(work, off)) == 0

    tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
    assert not [k for k in json.loads(tags[artifacts.MANIFEST_TAG]) if k.startswith("variants/")]
    assert "variants/ not recorded: export's report does not vouch for them" in caplog.text
    with pytest.raises(
        artifacts.ArtifactIntegrityError,
        match=rf"{NAME} v1 recorded no variants/ at registration \(export was disabled.*"
        r"variants/model\.int8\.onnx.*refused.*serve it with variant 'pyfunc'",
    ):
        variants.load_variant(f"models:/{NAME}/1", "int8")
    from flows import artifacts as artifacts_cli  # the version itself verifies: pyfunc alone

    assert artifacts_cli.main(["verify", f"models:/{NAME}/1"]) == 0


@pytest.mark.slow
def test_register_compares_the_run_variants_with_a_kept_report_before_recording_them(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # v1 recorded the run's variants; export runs again (kept, with v1's hashes) and another
    # registered model takes a version from the same run: it records the variants only when
    # the stored files are still the ones the kept report names
    work = prepare(tmp_path / "v1", trained, make_params(QUICK), export=True)
    assert register.main(register_args(work, params_file(tmp_path / "p.yaml", QUICK))) == 0
    changed = params_file(tmp_path / "changed.yaml", {"export": {"row_repeats": 4}})
    assert export.main(export_args(work, changed)) == 0
    report = json.loads((work / "reports" / "export.json").read_text())
    assert report["status"] == "kept" and set(report["files"]) == FILES
    other = params_file(
        tmp_path / "other.yaml", {**QUICK, "register": {**LOOSE["register"], "model_name": "other"}}
    )
    location = mlflow.get_run(report["run_id"]).info.artifact_uri.removeprefix("file://")
    int8 = Path(location) / variants.ARTIFACT_DIR / variants.ONNX_FILES["int8"]
    original = int8.read_bytes()
    int8.write_bytes(original + b"\0")  # replaced in the artifact store since export

    with caplog.at_level(logging.ERROR):
        assert register.main(register_args(work, other)) == 1

    assert "other v1: the run's variants/ are not the files the export stage's report" in (
        caplog.text
    )
    assert f"variants/model.int8.onnx expected sha256 {report['files'][FILES_INT8]}" in caplog.text
    pending = mlflow.MlflowClient().get_model_version("other", "1")
    assert artifacts.DIGEST_TAG not in pending.tags  # nothing recorded or signed
    assert not mlflow.MlflowClient().get_registered_model("other").aliases

    int8.write_bytes(original)  # restored: the retry resumes v1 and records the variants
    assert register.main(register_args(work, other)) == 0
    tags = mlflow.MlflowClient().get_model_version("other", "1").tags
    manifest = json.loads(tags[artifacts.MANIFEST_TAG])
    assert {k: v for k, v in manifest.items() if k.startswith("variants/")} == report["files"]
    assert variants.load_variant("models:/other/1", "int8") is not None
