"""Typed, validated ``params.yaml``: one model per section, checked when it is loaded.

A bad value fails at start with the section and field named, e.g.
``params.yaml: train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages.common.errors import ConfigError

SKLEARN_SOURCES = ("breast_cancer", "digits")


class StrictModel(BaseModel):
    """Frozen, and an unknown key is an error (a typo in a YAML file never passes silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)



def read_yaml(path: str | Path, what: str, hint: str = "") -> Any:
    """Read a YAML config file; a missing or malformed file raises ConfigError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {what} not found{hint}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """``section.field: message`` for each problem pydantic found."""
    return [f"{'.'.join([p for p in [prefix] if p] + [str(part) for part in err['loc']]) or '(top)'}"
            f": {err['msg']}" for err in exc.errors()]


class BaseParams(StrictModel):
    seed: int = 42  # one seed for splits, weight init and data order: runs are repeatable
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when present, else CPU


class MlflowParams(StrictModel):
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"  # env MLFLOW_TRACKING_URI overrides
    experiment: str = "pipeline"  # one experiment holds every pipeline run
    ui_port: int = Field(5000, ge=1, le=65535)  # `make ui` serves here, on 127.0.0.1


class IngestParams(StrictModel):
    # sklearn:breast_cancer | sklearn:digits | a local CSV/Parquet file or folder
    source: str = "sklearn:breast_cancer"
    target: str = "target"  # label column in the source (the sklearn sources use "target")

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value.startswith("sklearn:") and value.split(":", 1)[1] not in SKLEARN_SOURCES:
            raise ValueError(f"unknown sklearn dataset {value!r}; choose one of "
                             + ", ".join(f"sklearn:{name}" for name in SKLEARN_SOURCES))
        return value

    @property
    def is_sklearn(self) -> bool:
        return self.source.startswith("sklearn:")


class ValidateParams(StrictModel):
    schema_path: str = "schemas/breast_cancer.yaml"  # column rules the GX suite is built from


class FeaturesParams(StrictModel):
    test_size: float = Field(0.2, gt=0, lt=1)  # held out for evaluation and champion/challenger
    val_size: float = Field(0.2, gt=0, lt=1)  # for early stopping; taken from what is left

    @model_validator(mode="after")
    def _sizes_leave_train(self) -> FeaturesParams:
        if self.test_size + self.val_size >= 0.9:
            raise ValueError("test_size + val_size must leave at least 10% for training")
        return self


class TrainParams(StrictModel):
    model: Literal["mlp", "cnn"] = "mlp"  # mlp for tables, cnn for images
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 32])  # MLP layer widths
    channels: list[int] = Field(default_factory=lambda: [16, 32])  # CNN conv channels
    image_shape: list[int] | None = None  # CNN input as [C, H, W], e.g. [1, 8, 8]
    dropout: float = Field(0.1, ge=0, lt=1)  # regularisation between layers
    lr: float = Field(1e-3, gt=0, le=10)  # AdamW learning rate
    weight_decay: float = Field(1e-4, ge=0)  # AdamW weight decay
    batch_size: int = Field(64, gt=0)  # training batch size
    max_epochs: int = Field(100, gt=0)  # upper bound; early stopping usually ends sooner
    patience: int = Field(10, gt=0)  # epochs without val-loss improvement before stopping

    @field_validator("hidden_sizes", "channels")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if not value or any(width <= 0 for width in value):
            raise ValueError("must be a non-empty list of positive integers")
        return value

    @model_validator(mode="after")
    def _cnn_needs_shape(self) -> TrainParams:
        if self.model == "cnn" and (self.image_shape is None or len(self.image_shape) != 3):
            raise ValueError("model 'cnn' needs image_shape: [channels, height, width]")
        return self


class EvaluateParams(StrictModel):
    batch_size: int = Field(1024, gt=0)  # scoring batch size; does not change the metrics


class RegisterParams(StrictModel):
    model_name: str = Field("classifier", min_length=1)  # registered model in MLflow
    alias: str = "champion"  # the alias that serving follows
    challenger_alias: str = "challenger"  # set on versions that were not promoted
    min_metrics: dict[str, float] = Field(  # absolute floor a new champion must clear
        default_factory=lambda: {"accuracy": 0.9, "f1_macro": 0.9, "roc_auc": 0.95})
    max_metrics: dict[str, float] = Field(default_factory=lambda: {"log_loss": 0.5})
    compare_metric: str = "f1_macro"  # challenger must not be worse than champion on this


class ScheduleParams(StrictModel):
    deployment: str = "daily"  # Prefect deployment name
    cron: str = "0 6 * * *"  # when the pipeline runs (cron syntax)
    timezone: str = "UTC"  # time zone the cron is read in


SECTIONS: dict[str, type[StrictModel]] = {
    "base": BaseParams, "mlflow": MlflowParams, "ingest": IngestParams,
    "validate": ValidateParams, "features": FeaturesParams, "train": TrainParams,
    "evaluate": EvaluateParams, "register": RegisterParams, "schedule": ScheduleParams,
}


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``: ``base`` plus one section per stage (and the schedule)."""

    base: BaseParams
    mlflow: MlflowParams
    ingest: IngestParams
    validate: ValidateParams
    features: FeaturesParams
    train: TrainParams
    evaluate: EvaluateParams
    register: RegisterParams
    schedule: ScheduleParams


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and check ``params.yaml``; any bad value raises ConfigError naming the field."""
    raw = read_yaml(path, "params file") or {}
    return parse_params(raw, source=str(path))


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Check an in-memory params mapping (what ``load_params`` reads from the file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    problems = [f"{key}: unknown section (known: {', '.join(SECTIONS)})"
                for key in raw if key not in SECTIONS]
    sections = {}
    for name, model in SECTIONS.items():
        try:
            sections[name] = model.model_validate(raw.get(name) or {})
        except ValidationError as exc:
            problems += describe_errors(exc, prefix=name)
    if problems:
        raise ConfigError(f"{source}: invalid value: " + "; ".join(problems))
    return Params(**sections)
