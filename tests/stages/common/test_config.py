"""params.yaml is typed and checked at load: a bad value names its section and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from stages.common.config import load_params, parse_params
from stages.common.errors import ConfigError
from tests.conftest import ROOT


def test_project_params_load_with_their_documented_defaults() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.ingest.source == "sklearn:breast_cancer"
    assert params.train.model == "mlp"
    assert params.register.alias == "champion"
    assert (ROOT / params.validate.suite_path).exists()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"lr": -0.01}}, "train.lr: Input should be greater than 0"),
        ({"train": {"model": "rnn"}}, "train.model"),
        ({"train": {"model": "cnn"}}, "image_shape"),
        ({"train": {"hidden_sizes": [64, 0]}}, "train.hidden_sizes"),
        ({"train": {"batch_size": 0}}, "train.batch_size"),
        ({"features": {"test_size": 0.5, "val_size": 0.45}}, "at least 10% for training"),
        ({"ingest": {"source": "sklearn:iris"}}, "unknown sklearn dataset 'sklearn:iris'"),
        ({"base": {"device": "tpu"}}, "base.device"),
        ({"trian": {}}, "trian: unknown section"),
        ({"train": {"epochs": 3}}, "train.epochs: Extra inputs are not permitted"),
    ],
)
def test_invalid_values_fail_naming_the_field(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match="invalid value") as info:
        parse_params(raw)
    assert fragment in str(info.value)


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"train": {"lr": 0, "dropout": 1.5}})
    assert "train.lr" in str(info.value) and "train.dropout" in str(info.value)


def test_missing_or_malformed_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad}: not valid YAML"):
        load_params(bad)


def test_params_are_frozen() -> None:
    params = parse_params({})
    with pytest.raises(ValidationError):
        params.train.lr = 1.0  # type: ignore[misc]
