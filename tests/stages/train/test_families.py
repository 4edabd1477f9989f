"""Training the transformer and sequence families: deterministic on CPU, learning, their
params in MLflow, and the step grouping train checks for ``model: rnn``."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from model.nets import build_network
from model.preprocess import fit_preprocessor
from stages.common import tracking
from stages.common.config import TrainParams
from stages.common.errors import ConfigError
from stages.common.io import write_parquet
from stages.features import stage as features
from stages.train import loop
from stages.train.batches import TrainData
from stages.train.mlflow_run import _log_sequence_steps, flatten_params, sequence_steps
from tests.builders import make_params

CPU = torch.device("cpu")
TINY = {"lr": 0.01, "batch_size": 16, "max_epochs": 3, "patience": 3, "dropout": 0.1}
FAMILIES = {
    "transformer": TrainParams(
        model="transformer", transformer={"d_token": 8, "n_heads": 2, "n_blocks": 1}, **TINY
    ),
    "gru": TrainParams(model="rnn", rnn={"sequence_length": 4, "hidden_size": 8}, **TINY),
    "lstm": TrainParams(
        model="rnn", rnn={"sequence_length": 4, "cell": "lstm", "hidden_size": 8}, **TINY
    ),
    "attention": TrainParams(
        model="rnn",
        rnn={"sequence_length": 4, "cell": "transformer", "hidden_size": 8, "n_heads": 2},
        **TINY,
    ),
}


def windows(n: int = 96, steps: int = 4, seed: int = 0) -> TrainData:
    """Rows of ``steps`` steps of 2 values; the class: did the first value rise over the window."""
    gen = torch.Generator().manual_seed(seed)
    series = torch.randn(n, steps, 2, generator=gen).cumsum(dim=1)
    y = (series[:, -1, 0] > series[:, 0, 0]).long()
    X = series.reshape(n, steps * 2)
    cut = n * 3 // 4
    return TrainData(X[:cut], y[:cut], X[cut:], y[cut:])


def fit(params: TrainParams, data: TrainData, seed: int = 0) -> loop.TrainResult:
    loop.seed_torch(seed, CPU)  # deterministic kernels on CPU
    network = build_network(params, data.X_train.shape[1], 2)
    return loop.train_model(network, data, params, CPU, seed)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_deterministically_on_cpu(family: str) -> None:
    data = windows()

    first, again = fit(FAMILIES[family], data), fit(FAMILIES[family], data)
    other = fit(FAMILIES[family], data, seed=1)

    assert len(first.history) == 3 and first.history == again.history
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)
    assert any(not torch.equal(first.state_dict[k], other.state_dict[k]) for k in first.state_dict)


@pytest.mark.parametrize("family", ["transformer", "gru"])
def test_family_learns_a_rising_window(family: str) -> None:
    params = FAMILIES[family].model_copy(update={"max_epochs": 25, "patience": 25})

    result = fit(params, windows(n=240))

    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert max(row["val_accuracy"] for row in result.history) >= 0.8


def test_nested_family_params_log_as_dotted_keys() -> None:
    params = make_params({"train": {"model": "rnn", "rnn": {"sequence_length": 7}}})

    flat = flatten_params(params, ("train",))

    assert flat["train.model"] == "rnn"
    assert flat["train.rnn.sequence_length"] == 7
    assert flat["train.rnn.cell"] == "gru"
    assert flat["train.transformer.d_token"] == 32
    assert flat["train.gbdt.max_bins"] == 255
    assert flat["train.hidden_sizes"] == "[16]"
    assert not any(isinstance(value, dict) for value in flat.values())


def _window_frame(columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({col: [float(i), i + 1.0, i + 2.0, 0.5] for i, col in enumerate(columns)})
    return frame.assign(label=[0, 1, 0, 1])


def test_rnn_step_grouping_names_the_columns_per_step() -> None:
    columns = ["rain_d0", "temp_d0", "rain_d1", "temp_d1", "rain_d2", "temp_d2"]
    preprocessor = fit_preprocessor(_window_frame(columns), "label")
    rnn = TrainParams(model="rnn", rnn={"sequence_length": 3})

    assert sequence_steps(preprocessor, rnn) == [
        ["rain_d0", "temp_d0"],
        ["rain_d1", "temp_d1"],
        ["rain_d2", "temp_d2"],
    ]
    assert sequence_steps(preprocessor, TrainParams()) == []  # not a sequence family
    uneven = rnn.model_copy(update={"rnn": rnn.rnn.model_copy(update={"sequence_length": 4})})
    with pytest.raises(ConfigError, match=r"6 feature columns \(rain_d0, temp_d0, .*temp_d2\)"):
        sequence_steps(preprocessor, uneven)


def test_uneven_rnn_columns_fail_the_train_stage_naming_them(
    tmp_path: Path, mlflow_uri: str
) -> None:
    from stages.train import stage as train

    columns = ["rain_d0", "temp_d0", "rain_d1", "temp_d1", "rain_d2"]  # day 2 lacks temp
    frame = pd.concat([_window_frame(columns)] * 6, ignore_index=True)
    params = make_params(
        {"ingest": {"target": "label"}, "train": {"model": "rnn", "rnn": {"sequence_length": 3}}}
    )
    write_parquet(tmp_path / "validated" / "data.parquet", frame)
    features.run(tmp_path / "validated", tmp_path / "features", params)

    with pytest.raises(ConfigError, match=r"5 feature columns \(rain_d0, .*rain_d2\) do not split"):
        train.run(
            tmp_path / "features", tmp_path / "r", tmp_path / "models", tmp_path / "h.csv", params
        )
    assert not (tmp_path / "models").exists()


def test_steps_with_unlike_columns_are_logged_with_a_warning(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    # the one-hot columns of a text column land behind the numeric ones
    moved = [["rain_d0", "rain_d1"], ["sky_d0_sun", "sky_d1_sun"]]
    tracking.configure_mlflow(make_params().mlflow)  # artifacts beside the test's store
    with caplog.at_level(logging.INFO), mlflow.start_run() as run:
        _log_sequence_steps(moved)

    assert "rnn: 2 steps of 2 columns; step 0: rain_d0, rain_d1" in caplog.text
    assert "step 1 holds columns ['sky_d0_sun', 'sky_d1_sun']" in caplog.text
    logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/sequence_steps.json")
    assert logged == {"steps": moved}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_family_trains_on_cuda_with_autocast(family: str, precision: str) -> None:
    # cuDNN's GRU/LSTM and the attention kernels under autocast (not checked on CPU)
    cuda = torch.device("cuda")
    data = TrainData(*(t.to(cuda) for t in dataclasses.astuple(windows())))
    params = FAMILIES[family].model_copy(update={"precision": precision, "max_grad_norm": 1.0})
    torch.manual_seed(0)
    network = build_network(params, data.X_train.shape[1], 2).to(cuda)

    result = loop.train_model(network, data, params, cuda, seed=0)

    assert all(math.isfinite(row["val_loss"]) for row in result.history)
    assert all(t.device.type == "cpu" for t in result.state_dict.values())
