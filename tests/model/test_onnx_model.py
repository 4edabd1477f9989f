"""The compact ONNX model file: meta inside, loaded as a Predictor, served through the pyfunc's
scorer (``model.servable.load_scorer``) and a logged pyfunc, and clear errors for a file that is
not one."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from model import onnx_model, variants
from model.errors import DataError
from model.nets import build_network, predict_proba
from model.predictors import load_predictor
from model.preprocess import fit_preprocessor, save_preprocessor
from model.servable import load_scorer, log_servable
from stages.common import onnx_export, tracking
from tests.builders import make_params

INT8_TOLERANCE = 0.1  # int8 vs float probabilities on a tiny random network


def breast_cancer() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    return frame


@pytest.fixture(scope="module")
def compact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    """A fitted preprocessor and an int8 ONNX model of a small (untrained) MLP over it."""
    root = tmp_path_factory.mktemp("onnx-model")
    preprocessor = fit_preprocessor(breast_cancer(), "target")
    save_preprocessor(preprocessor, root / "preprocessor.joblib")
    torch.manual_seed(0)
    spec = {"model": "mlp", "hidden_sizes": [8], "dropout": 0.0}
    network = build_network(spec, preprocessor.n_features, 2).eval()
    onnx_export.export_onnx(network, preprocessor.n_features, root / "model.onnx")
    onnx_export.quantize_int8(root / "model.onnx", root / "int8.onnx")
    meta = {"n_features": preprocessor.n_features, "n_classes": 2, "train_params": spec}
    onnx_model.save_onnx_model(root / "int8.onnx", meta, root / "model.int8.onnx")
    return root / "preprocessor.joblib", root / "model.int8.onnx", network


def test_the_graph_names_are_the_ones_the_variants_run_by() -> None:
    assert (onnx_export.INPUT_NAME, onnx_export.OUTPUT_NAME) == (
        variants.INPUT_NAME,
        variants.OUTPUT_NAME,
    )


def test_round_trip_keeps_the_meta_and_predicts_like_the_network(
    compact: tuple[Path, Path, torch.nn.Module],
) -> None:
    preprocessor_path, path, network = compact
    from model.preprocess import load_preprocessor

    predictor = load_predictor(path)  # dispatched by the .onnx suffix

    assert isinstance(predictor, onnx_model.OnnxPredictor)
    assert (predictor.family, predictor.n_features, predictor.n_classes) == ("onnx", 30, 2)
    assert predictor.meta["train_params"]["hidden_sizes"] == [8]
    assert not predictor.is_network and predictor.to("cuda") is predictor
    frame = breast_cancer().drop(columns=["target"])
    X = predictor.features(load_preprocessor(preprocessor_path), frame)
    proba = predictor.predict_proba(X)
    assert proba.dtype == np.float64 and proba.shape == (len(frame), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    expected = predict_proba(network, X, torch.device("cpu"))
    assert np.abs(proba - expected).max() < INT8_TOLERANCE
    # dynamic int8 quantizes activations with a scale per call: a row's probabilities move a
    # little with the batch it comes in (static int8, fixed scales, would not)
    np.testing.assert_allclose(predictor.predict_proba(X, batch_size=7), proba, atol=0.02)
    assert predictor.predict_proba(X[:0]).shape == (0, 2)


def test_saving_again_replaces_the_meta_and_keeps_other_entries(
    tmp_path: Path, compact: tuple[Path, Path, torch.nn.Module]
) -> None:
    import onnx

    _, path, _ = compact
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="note", value="kept")

    saved = onnx_model.save_onnx_model(
        proto.SerializeToString(), {"n_features": 30, "n_classes": 2, "v": 2}, tmp_path / "m.onnx"
    )

    props = {p.key: p.value for p in onnx.load(str(saved)).metadata_props}
    assert props["note"] == "kept" and list(props).count("meta") == 1
    assert onnx_model.load_onnx_model(saved).meta == {"n_features": 30, "n_classes": 2, "v": 2}


def test_the_scorer_the_pyfunc_runs_serves_the_onnx_model(
    compact: tuple[Path, Path, torch.nn.Module],
) -> None:
    preprocessor_path, path, _ = compact
    frame = breast_cancer().drop(columns=["target"]).head(20)

    scorer = load_scorer(preprocessor_path, path, device="cpu")
    predictions = scorer.predict(frame)

    assert list(predictions.columns) == ["prediction", "proba_0", "proba_1"]
    assert len(predictions) == 20 and set(predictions["prediction"]) <= {0, 1}


def test_a_logged_pyfunc_round_trips_the_onnx_model(
    tmp_path: Path, mlflow_uri: str, compact: tuple[Path, Path, torch.nn.Module]
) -> None:
    preprocessor_path, path, _ = compact
    frame = breast_cancer().drop(columns=["target"]).head(10)
    expected = load_scorer(preprocessor_path, path, device="cpu").predict(frame)

    tracking.configure_mlflow(make_params().mlflow)  # artifacts beside the temporary store
    with mlflow.start_run():
        info = log_servable(preprocessor_path, path, frame)
    loaded = mlflow.pyfunc.load_model(info.model_uri)

    pd.testing.assert_frame_equal(loaded.predict(frame), expected)


def test_errors_name_the_file_and_the_fix(
    tmp_path: Path, compact: tuple[Path, Path, torch.nn.Module]
) -> None:
    _, path, network = compact
    with pytest.raises(DataError, match=r"ONNX model not found; run the compress stage"):
        onnx_model.load_onnx_model(tmp_path / "absent.onnx")

    plain = onnx_export.export_onnx(network, 30, tmp_path / "plain.onnx")  # export's kind
    with pytest.raises(DataError, match=r"no 'meta' metadata entry.*plain\.onnx.*onnx_meta"):
        load_predictor(plain)

    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(DataError, match=r"not a loadable ONNX model.*junk\.onnx"):
        onnx_model.load_onnx_model(tmp_path / "junk.onnx")
    with pytest.raises(DataError, match=r"not an ONNX graph"):
        onnx_model.save_onnx_model(
            b"not a graph", {"n_features": 1, "n_classes": 2}, tmp_path / "x"
        )
    with pytest.raises(DataError, match=r"meta lacks \['n_classes'\]"):
        onnx_model.save_onnx_model(path, {"n_features": 30}, tmp_path / "y.onnx")
    assert not (tmp_path / "y.onnx").exists()
