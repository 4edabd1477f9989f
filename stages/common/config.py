"""Typed, validated ``params.yaml``: one model per section, checked when it is loaded.

A bad value fails at start with the section and field named, e.g.
``params.yaml: train.lr: Input should be greater than 0``.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from stages.common.errors import ConfigError
from stages.common.redact import redact_url

SKLEARN_SOURCES = ("breast_cancer", "digits")
URL_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs")  # read through fsspec
SQL_DIALECTS = ("postgresql", "mysql", "mariadb", "sqlite", "mssql", "oracle")  # SQLAlchemy
MLFLOW_ALIAS = re.compile(r"[\w-]+")  # MLflow's alias rules (mlflow.utils.validation)
PREFECT_BANNED = "/%&><"  # characters a Prefect name may not hold (prefect.types.names)
MLFLOW_VERSION_ALIAS = re.compile(r"[vV]\d+")  # reserved: it would read as a version


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
    return [
        f"{'.'.join([p for p in [prefix] if p] + [str(part) for part in err['loc']]) or '(top)'}"
        f": {_message(err)}"
        for err in exc.errors()
    ]


def _message(err: Any) -> str:
    # our validators' ValueError text as written, without pydantic's "Value error, " in front
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return err["msg"]


class BaseParams(StrictModel):
    seed: int = 42  # one seed for splits, weight init and data order: runs are repeatable
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when present, else CPU
    # ingest, validate and features stream the data in record batches of this many rows, so
    # their memory stays bounded however large the data grows
    batch_rows: int = Field(262_144, gt=0)


class MlflowParams(StrictModel):
    tracking_uri: str = "sqlite:///mlflow/mlflow.db"  # env MLFLOW_TRACKING_URI overrides
    experiment: str = "pipeline"  # one experiment holds every pipeline run
    ui_port: int = Field(5000, ge=1, le=65535)  # `make ui` serves here, on 127.0.0.1
    # A tracking server that is down or hangs fails a stage within a bounded time (MLflow's own
    # defaults wait minutes): each HTTP request waits this long for an answer...
    request_timeout_s: int = Field(30, ge=1, le=600)
    # ...and is retried this often, sleeping 0, 2, 4... x backoff_s seconds in between
    # (3 retries, backoff 1: a refused connection fails in ~6 s). Env MLFLOW_HTTP_REQUEST_*
    # variables, when set, win.
    max_retries: int = Field(3, ge=0, le=10)
    backoff_s: int = Field(1, ge=0, le=60)


class IngestParams(StrictModel):
    # sklearn:<name> | a CSV/Parquet file or (partitioned) folder under data_root | an fsspec
    # URL (https://, s3://, gs://) | a SQLAlchemy URL (postgresql+psycopg://user@host:5432/db;
    # the password comes from PGPASSWORD or ~/.pgpass, never from this file)
    source: str = "sklearn:breast_cancer"
    target: str = "target"  # label column in the source (the sklearn sources use "target")
    data_root: str = "data/source"  # local sources must lie inside it (no ../ escapes)
    format: Literal["auto", "csv", "parquet"] = "auto"  # auto: from the file suffix
    delimiter: str = Field(",", min_length=1, max_length=1)  # CSV field separator
    table: str | None = None  # SQL sources: the table to read...
    query: str | None = None  # ...or a SELECT statement (one of the two)
    # incremental ingestion: a timestamp or increasing-id column; each run appends only the
    # rows newer than the largest value already ingested (none new: training is skipped)
    watermark: str | None = None

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value.startswith("sklearn:") and value.split(":", 1)[1] not in SKLEARN_SOURCES:
            raise ValueError(
                f"unknown sklearn dataset {value!r}; choose one of "
                + ", ".join(f"sklearn:{name}" for name in SKLEARN_SOURCES)
            )
        if "://" in value and source_kind(value) == "path":
            raise ValueError(
                f"unknown URL scheme in {redact_url(value)!r}: use one of "
                f"{', '.join(URL_SCHEMES)} (files) or a SQLAlchemy dialect "
                f"({', '.join(SQL_DIALECTS)})"
            )
        return value

    @field_serializer("source", when_used="json")
    def _redacted_source(self, value: str) -> str:
        # what MLflow params and config/params.json get: a URL's credentials as ***
        return redact_url(value)

    @model_validator(mode="after")
    def _sql_needs_table_or_query(self) -> IngestParams:
        if self.kind == "sql" and (self.table is None) == (self.query is None):
            raise ValueError("a SQL source needs exactly one of table and query")
        if self.kind != "sql" and (self.table is not None or self.query is not None):
            raise ValueError("table/query apply to SQL sources only")
        return self

    @property
    def kind(self) -> Literal["sklearn", "url", "sql", "path"]:
        return source_kind(self.source)

    @property
    def is_sklearn(self) -> bool:
        return self.kind == "sklearn"


def source_kind(source: str) -> Literal["sklearn", "url", "sql", "path"]:
    """What ``ingest.source`` names: a bundled dataset, an fsspec URL, a database or a path."""
    if source.startswith("sklearn:"):
        return "sklearn"
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in URL_SCHEMES:
        return "url"
    if scheme.split("+", 1)[0] in SQL_DIALECTS:
        return "sql"
    return "path"


class ColumnRuleParams(StrictModel):
    """Row-level rules for one column from params, added on top of the suite's."""

    min: float | None = None  # inclusive bounds
    max: float | None = None
    positive: bool = False  # every value > 0
    not_null: bool = False  # every value present
    values: list[bool | int | float | str] | None = None  # the allowed values

    @model_validator(mode="after")
    def _some_rule(self) -> ColumnRuleParams:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class ValidateParams(StrictModel):
    # the reviewed GX expectation suite (write one with `python -m stages.validate suite`)
    suite_path: str = "suites/breast_cancer.json"
    rules: dict[str, ColumnRuleParams] = Field(default_factory=dict)  # on top of the suite
    # rows that break a row-level rule go to data/quarantine/; above this share of all rows
    # the run stops instead
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    max_duplicate_fraction: float = Field(0.01, ge=0, le=1)  # duplicated rows beyond: stop
    docs_rows: int = Field(100_000, gt=0)  # GX Data Docs are rendered on at most this many rows


class FeaturesParams(StrictModel):
    test_size: float = Field(0.2, gt=0, lt=1)  # held out for evaluation and champion/challenger
    val_size: float = Field(0.2, gt=0, lt=1)  # for early stopping; taken from what is left
    # columns kept in the data but not fed to the model (ids, the watermark timestamp, ...)
    drop_columns: list[str] = Field(default_factory=list)
    # datetime columns: calendar = cyclic month, weekday, day of year (and hour when times
    # vary) computed inside the preprocessor; drop = kept in the splits, not fed to the model
    datetime: Literal["calendar", "drop"] = "calendar"
    # a text column with more distinct train values than this share of the train rows is an
    # id or free text, not a category: one-hot encoding it would give a feature per row
    max_category_fraction: float = Field(0.5, gt=0, le=1)
    high_cardinality: Literal["drop", "error"] = "drop"  # drop it with a warning, or stop
    # stratified = seeded and stratified by class; ordered = data order kept (first rows
    # train, then val, then test): series, and rows that are windows of one (model: rnn)
    split: Literal["stratified", "ordered"] = "stratified"
    # ordered: rows dropped before val and before test, so that no window spans two splits
    # (windows of T steps: T - 1)
    gap_rows: int = Field(0, ge=0)

    @field_validator("val_size")
    @classmethod
    def _sizes_leave_train(cls, value: float, info: ValidationInfo) -> float:
        test_size = info.data.get("test_size")
        if test_size is not None and test_size + value >= 0.9:
            raise ValueError(
                f"test_size {test_size} + val_size {value} must leave at least 10% for training"
            )
        return value


class TransformerParams(StrictModel):
    """FT-Transformer (model: transformer): one token per feature, a few attention blocks."""

    d_token: int = Field(32, gt=0)  # width of each feature's token
    n_blocks: int = Field(2, gt=0)  # attention blocks
    n_heads: int = Field(4, gt=0)  # attention heads; must divide d_token
    ffn_factor: float = Field(2.0, gt=0)  # feed-forward width = ffn_factor x d_token

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerParams:
        if self.d_token % self.n_heads:
            raise ValueError(
                f"n_heads {self.n_heads} must divide d_token {self.d_token} "
                "(each head takes an equal share of the token)"
            )
        return self


class RnnParams(StrictModel):
    """Sequence model (model: rnn) for rows that are fixed-length windows of a series."""

    # steps per window: the row's feature columns are read as sequence_length steps of
    # n_features / sequence_length values each, in column order (step 0's columns first)
    sequence_length: int | None = Field(None, gt=0)
    cell: Literal["gru", "lstm", "transformer"] = "gru"  # the encoder over the steps
    hidden_size: int = Field(64, gt=0)  # state width (the transformer encoder's d_model)
    num_layers: int = Field(1, gt=0)  # stacked layers
    n_heads: int = Field(4, gt=0)  # cell transformer only; must divide hidden_size


class GbdtParams(StrictModel):
    """scikit-learn's HistGradientBoosting (model: gbdt), the strong tabular baseline.

    Boosting rounds are grouped into "epochs" of ``rounds_per_epoch`` so that early stopping
    (``train.patience``), the history and tuning's pruning read it like a network's curve.
    """

    learning_rate: float = Field(0.1, gt=0, le=1)  # shrinkage per boosting round
    rounds_per_epoch: int = Field(10, gt=0)  # rounds per history row; max = max_epochs x this
    max_leaf_nodes: int = Field(31, ge=2)  # leaves per tree
    min_samples_leaf: int = Field(20, gt=0)  # rows per leaf at least
    l2_regularization: float = Field(0.0, ge=0)  # on the leaf values
    max_bins: int = Field(255, ge=2, le=255)  # histogram bins per feature


class TrainParams(StrictModel):
    # mlp / transformer / gbdt for tables, cnn for images (set image_shape), rnn for rows that
    # are windows of a series (set rnn.sequence_length)
    model: Literal["mlp", "cnn", "transformer", "rnn", "gbdt"] = "mlp"
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 32])  # MLP layer widths
    channels: list[int] = Field(default_factory=lambda: [16, 32])  # CNN conv channels
    # CNN input as [C, H, W], e.g. [1, 8, 8] (checked even when left out: a CNN needs it)
    image_shape: list[int] | None = Field(None, validate_default=True)
    dropout: float = Field(0.1, ge=0, lt=1)  # regularisation between layers
    lr: float = Field(1e-3, gt=0, le=10)  # AdamW learning rate
    weight_decay: float = Field(1e-4, ge=0)  # AdamW weight decay
    batch_size: int = Field(64, gt=0)  # training batch size
    max_epochs: int = Field(100, gt=0)  # upper bound; early stopping usually ends sooner
    patience: int = Field(10, gt=0)  # epochs without val-loss improvement before stopping
    optimizer: Literal["adamw", "sgd"] = "adamw"  # adamw suits most nets; sgd for tuned recipes
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum (ignored by adamw)
    lr_schedule: Literal["none", "cosine", "onecycle"] = "none"  # per-step schedule over the run
    max_grad_norm: float = Field(0.0, ge=0)  # clip the gradient norm to this; 0 = no clipping
    # on-device image augmentation (CNN only; off by default, all zeros/false = off)
    augment_crop_pad: int = Field(0, ge=0)  # random crop after zero-padding by this many pixels
    augment_flip: bool = False  # random horizontal flip (not for digits/text: it changes labels)
    augment_noise: float = Field(0.0, ge=0)  # std of gaussian noise added to the inputs
    augment_seed: int = 0  # its own RNG: augmentation never shifts the weight-init/batch order
    # auto = bf16 autocast on CUDA, fp32 on CPU; fp16 uses a grad scaler and needs CUDA
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the network (pays off on GPU for long runs)
    channels_last: bool = True  # CNN on CUDA: NHWC memory layout for tensor-core convolutions
    # keep the training split as device tensors (no loader round trips) or stream Parquet
    # row groups through pinned memory; auto = on the device when it fits
    data_on_device: Literal["auto", "always", "never"] = "auto"
    device_memory_fraction: float = Field(0.5, gt=0, le=1)  # auto: data may take this share
    checkpoint_every_steps: int = Field(200, ge=0)  # resume checkpoint cadence; 0 = epoch ends
    # DDP processes (torchrun); null = one per visible GPU (1 on CPU); batch_size is global
    nproc: int | None = Field(None, gt=0)
    transformer: TransformerParams = Field(default_factory=TransformerParams)
    rnn: RnnParams = Field(default_factory=RnnParams)
    gbdt: GbdtParams = Field(default_factory=GbdtParams)

    @field_validator("hidden_sizes", "channels")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if not value or any(width <= 0 for width in value):
            raise ValueError("must be a non-empty list of positive integers")
        return value

    @field_validator("image_shape")
    @classmethod
    def _cnn_needs_shape(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if info.data.get("model") == "cnn" and (value is None or len(value) != 3):
            raise ValueError("model 'cnn' needs image_shape: [channels, height, width]")
        if value is not None and any(size <= 0 for size in value):
            raise ValueError(f"{value}: every size must be a positive integer")
        return value

    @field_validator("nproc")
    @classmethod
    def _batch_splits(cls, value: int | None, info: ValidationInfo) -> int | None:
        # batch_size is the global batch: each of the nproc DDP processes takes an equal share
        batch_size = info.data.get("batch_size")
        if value is not None and batch_size is not None and batch_size % value:
            raise ValueError(
                f"train.batch_size {batch_size} does not split over {value} processes: "
                f"use a multiple of {value}"
            )
        return value

    @model_validator(mode="after")
    def _augment_needs_cnn(self) -> TrainParams:
        if self.augments and self.model != "cnn":
            raise ValueError(
                "augment_crop_pad/augment_flip/augment_noise work on images: "
                "set model: cnn (or turn augmentation off)"
            )
        return self

    @model_validator(mode="after")
    def _family_settings(self) -> TrainParams:
        if self.model == "rnn":
            if self.rnn.sequence_length is None:
                raise ValueError(
                    "model 'rnn' needs rnn.sequence_length: the steps in each row's window"
                )
            if self.rnn.cell == "transformer" and self.rnn.hidden_size % self.rnn.n_heads:
                raise ValueError(
                    f"rnn.n_heads {self.rnn.n_heads} must divide rnn.hidden_size "
                    f"{self.rnn.hidden_size} (cell: transformer)"
                )
        if self.model == "gbdt" and (self.nproc or 1) > 1:
            raise ValueError("model 'gbdt' trains in one process: leave nproc unset (or 1)")
        return self

    @property
    def augments(self) -> bool:
        return bool(self.augment_crop_pad or self.augment_flip or self.augment_noise)


class EvaluateParams(StrictModel):
    batch_size: int = Field(1024, gt=0)  # scoring batch size; does not change the metrics
    # the baselines (majority class, logistic regression) fit on at most this many train rows
    baseline_max_rows: int = Field(100_000, gt=0)


class ExportParams(StrictModel):
    # false: no ONNX/int8 variants are built (the service then serves the pyfunc only)
    enabled: bool = True
    # ONNX opset of the exported graph: 18 is the torch.export-based exporter's own (lower ones
    # are converted down and may fail); onnxruntime must run it
    opset: int = Field(18, ge=18)
    # int8: one weight scale per output unit, not per tensor (small layers lose much less)
    per_channel: bool = True
    # latency numbers logged per variant: the median over this many single-row calls...
    row_repeats: int = Field(200, gt=0)
    # ...and over this many batch-of-64 calls (more: steadier numbers, a slower stage)
    batch_repeats: int = Field(50, gt=0)


class SearchRange(StrictModel):
    """One tuned value: a numeric range (``low``/``high``, ``log``, ``step``) or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False  # sample on a log scale (learning rates, regularisation)
    step: float | None = Field(None, gt=0)  # discretise the range (the grid sampler needs it)
    integer: bool = False  # an int range (layer sizes, heads, leaves)
    choices: list[Any] | None = None  # a categorical choice instead of a range

    @model_validator(mode="after")
    def _range_or_choices(self) -> SearchRange:
        if self.choices is not None:
            if not self.choices:
                raise ValueError("choices: give at least one value")
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or give choices)")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna's rule)")
        if self.integer and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an integer range needs whole low and high")
        return self

    @property
    def discrete(self) -> bool:
        """Whether the grid sampler can enumerate it."""
        return self.choices is not None or self.step is not None or self.integer


def _default_spaces() -> dict[str, dict[str, SearchRange]]:
    r = SearchRange
    return {
        "mlp": {
            "lr": r(low=1e-4, high=1e-2, log=True),
            "weight_decay": r(low=1e-6, high=1e-2, log=True),
            "dropout": r(low=0.0, high=0.4),
            "hidden_sizes": r(choices=[[32], [64, 32], [128, 64], [128, 64, 32]]),
        },
        "transformer": {
            "lr": r(low=1e-4, high=3e-3, log=True),
            "dropout": r(low=0.0, high=0.3),
            "transformer.d_token": r(choices=[16, 32, 64]),
            "transformer.n_blocks": r(low=1, high=3, integer=True),
        },
        "rnn": {
            "lr": r(low=1e-4, high=1e-2, log=True),
            "dropout": r(low=0.0, high=0.3),
            "rnn.cell": r(choices=["gru", "lstm"]),
            "rnn.hidden_size": r(choices=[32, 64, 128]),
        },
        "gbdt": {
            "gbdt.learning_rate": r(low=0.02, high=0.3, log=True),
            "gbdt.max_leaf_nodes": r(low=8, high=64, integer=True),
            "gbdt.min_samples_leaf": r(low=5, high=50, integer=True),
            "gbdt.l2_regularization": r(low=1e-6, high=1.0, log=True),
        },
    }


class TuneParams(StrictModel):
    """Hyper-parameter search (``make tune``, ``python -m flows.tune``) with Optuna."""

    trials: int = Field(20, gt=0)  # trials per `make tune` (TRIALS=N overrides)
    parallel: int = Field(1, gt=0)  # trials at a time, each in its own process
    sampler: Literal["tpe", "grid", "random"] = "tpe"  # tpe = Bayesian; grid needs discrete ranges
    pruner: Literal["median", "hyperband", "none"] = "median"  # stop hopeless trials early
    # the study database: sqlite under the project, or postgresql+psycopg://user@host/db so
    # that several machines share one study (env TUNE_STORAGE overrides)
    storage: str = "sqlite:///data/tune/studies.db"
    max_epochs: int | None = Field(None, gt=0)  # cap each trial's train.max_epochs (null: keep)
    # what is searched, per model family: keys are train fields (dotted for sub-sections,
    # e.g. gbdt.learning_rate); the family tuned is train.model
    space: dict[str, dict[str, SearchRange]] = Field(default_factory=_default_spaces)

    @field_validator("space")
    @classmethod
    def _known_fields(
        cls, value: dict[str, dict[str, SearchRange]]
    ) -> dict[str, dict[str, SearchRange]]:
        families = typing.get_args(TrainParams.model_fields["model"].annotation)
        problems = []
        for family, ranges in value.items():
            if family not in families:
                problems.append(f"{family}: not a model family ({', '.join(families)})")
                continue
            for key in ranges:
                if not _train_field_exists(key):
                    problems.append(f"{family}.{key}: not a field of train")
        if problems:
            raise ValueError("; ".join(problems))
        return value


def _train_field_exists(dotted: str) -> bool:
    model: type[BaseModel] = TrainParams
    *parents, leaf = dotted.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return False
        model = field.annotation
    return leaf in model.model_fields and leaf != "model"


class RegisterParams(StrictModel):
    model_name: str = Field("classifier", min_length=1)  # registered model in MLflow
    alias: str = "champion"  # the alias that serving follows
    # set on versions that were not promoted (never alias: checked even when left at default)
    challenger_alias: str = Field("challenger", validate_default=True)
    # the default gate, relative to the baselines evaluate scores on the same test split: beat
    # the majority class on compare_metric, and trail the best baseline by at most this much
    # (in compare_metric's units; null = no baseline gate)
    max_gap_to_baseline: float | None = Field(0.05, ge=0)
    # optional absolute thresholds, e.g. {accuracy: 0.9} / {log_loss: 0.5}; empty = none
    min_metrics: dict[str, float] = Field(default_factory=dict)
    max_metrics: dict[str, float] = Field(default_factory=dict)
    compare_metric: str = "f1_macro"  # the challenger must beat the champion on this (a tie: no)
    # promote a model whose input schema or label set differs from the champion's (not compared)
    allow_schema_change: bool = False
    # pre-promotion check: median single-row latency through the serving code path (ms)
    max_latency_ms: float = Field(250.0, gt=0)
    # env var holding the key that signs each version's artifact hashes (HMAC-SHA256); when it
    # is set, only versions signed with that key load (serving, batch scoring, register)
    signing_key_env: str = Field("MODEL_SIGNING_KEY", min_length=1)

    @field_validator("alias", "challenger_alias")
    @classmethod
    def _mlflow_alias(cls, value: str, info: ValidationInfo) -> str:
        # MLflow's own rules, so a bad alias fails here and not after training and scoring
        if not MLFLOW_ALIAS.fullmatch(value) or len(value) > 255:
            raise ValueError(f"{value!r} is not an MLflow alias: 1-255 letters, digits, _ and -")
        if value.lower() == "latest" or MLFLOW_VERSION_ALIAS.fullmatch(value):
            raise ValueError(f"{value!r} is reserved by MLflow ('latest' and v<number>)")
        if info.field_name == "challenger_alias" and value == info.data.get("alias"):
            # a rejected version would take the alias that serving follows
            raise ValueError(f"{value!r} must differ from register.alias")
        return value

    @field_validator("compare_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        check_metric_name(value)
        return value

    @field_validator("min_metrics", "max_metrics")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            check_metric_name(name)
        return value


def check_metric_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a metric evaluate computes (model.metrics)."""
    from model.metrics import METRIC_NAMES, RENAMED  # it imports numpy: only when checking

    if name not in METRIC_NAMES:
        renamed = f"; renamed to {RENAMED[name]}" if name in RENAMED else ""
        raise ValueError(f"unknown metric {name!r} (one of {', '.join(METRIC_NAMES)}){renamed}")


class ScheduleParams(StrictModel):
    deployment: str = "daily"  # Prefect deployment name
    cron: str = "0 6 * * *"  # when the pipeline runs (cron syntax)
    timezone: str = "UTC"  # time zone the cron is read in (an IANA name)

    @field_validator("deployment")
    @classmethod
    def _prefect_name(cls, value: str) -> str:
        if not value or any(char in value for char in PREFECT_BANNED):
            raise ValueError(
                f"{value!r} is not a Prefect deployment name: not empty, none of {PREFECT_BANNED}"
            )
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        # what Prefect's CronSchedule accepts: croniter's syntax without random/hashed fields
        if not _croniter().is_valid(value) or any(
            part.casefold() in ("r", "h") for part in value.split()
        ):
            raise ValueError(
                f"{value!r} is not a cron expression: minute hour day-of-month month "
                "day-of-week, e.g. '0 6 * * *' (daily at 06:00)"
            )
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except (KeyError, ValueError, OSError):  # not found (a KeyError), not a key, too long
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name, e.g. UTC or Europe/Berlin"
            ) from None
        # loadable, but not a zone name: zoneinfo.available_timezones() (Prefect's list) leaves
        # these out; testing its rule costs nothing, listing every zone ~25 ms a load
        if value == "posixrules" or value.split("/", 1)[0] in ("posix", "right"):
            raise ValueError(f"{value!r} is a tz database file, not a time zone name: use e.g. UTC")
        return value


@functools.cache
def _croniter() -> Any:
    """The croniter class Prefect checks cron expressions with (croniter is not installed on
    its own: Prefect vendors it). Loaded from its file: ``import prefect._vendor.croniter``
    would import all of Prefect (~1 s) into every process that reads params.yaml."""
    spec = importlib.util.find_spec("prefect")
    origin = spec.submodule_search_locations if spec else None
    path = Path(origin[0]) / "_vendor" / "croniter" / "croniter.py" if origin else None
    if path is None or not path.is_file():  # another Prefect layout: the slow way
        from prefect._vendor.croniter import croniter

        return croniter
    file_spec = importlib.util.spec_from_file_location("_prefect_vendored_croniter", path)
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module.croniter


class ServeParams(StrictModel):
    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 exposes the service to the network
    port: int = Field(8000, ge=1, le=65535)  # where `make serve` listens
    poll_interval_s: float = Field(10.0, gt=0)  # how often the alias is checked for a new version
    token_env: str = "SERVE_TOKEN"  # env var with the bearer token /predict requires; unset = open
    max_body_bytes: int = Field(1_048_576, gt=0)  # bigger request bodies get 413
    max_batch_rows: int = Field(256, gt=0)  # rows of concurrent requests scored in one model call
    # rows waiting for the model; a request that would go over gets 503 + Retry-After (a
    # request that finds the queue empty always gets in, whatever its size)
    max_queue_rows: int = Field(4096, gt=0)
    sample_rate: float = Field(0.1, ge=0, le=1)  # share of requests kept in the prediction log
    log_dir: str = "data/predictions"  # the prediction log: Parquet part files for monitoring
    log_flush_rows: int = Field(1000, gt=0)  # write the log once this many rows are buffered...
    log_flush_interval_s: float = Field(30.0, gt=0)  # ...or at least this often (seconds)
    batch_size: int = Field(10_000, gt=0)  # batch scoring: rows per model call (bounds memory)
    # a row breaking the model's input contract (unseen category, value outside the suite's
    # range, all columns null): reject = 422 naming column and rule; flag = score and mark it
    row_policy: Literal["reject", "flag"] = "reject"
    # follow the alias to a version whose input contract (columns, types, labels) differs
    allow_contract_change: bool = False


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
    export: ExportParams
    register: RegisterParams
    tune: TuneParams
    schedule: ScheduleParams
    serve: ServeParams


# One entry per field of Params: a new section is its model above plus one field there.
SECTIONS: dict[str, type[StrictModel]] = typing.get_type_hints(Params)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and check ``params.yaml``; any bad value raises ConfigError naming the field."""
    raw = read_yaml(path, "params file") or {}
    return parse_params(raw, source=str(path))


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Check an in-memory params mapping (what ``load_params`` reads from the file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    problems = [
        f"{key}: unknown section (known: {', '.join(SECTIONS)}; a new one is a field of "
        "Params in stages/common/config.py)"
        for key in raw
        if key not in SECTIONS
    ]
    sections = {}
    for name, model in SECTIONS.items():
        try:
            sections[name] = model.model_validate(raw.get(name) or {})
        except ValidationError as exc:
            problems += describe_errors(exc, prefix=name)
    if not problems:
        problems = check_across_sections(Params(**sections))
    if problems:
        raise ConfigError(f"{source}: invalid value: " + "; ".join(problems))
    return Params(**sections)


def check_across_sections(params: Params) -> list[str]:
    """``section.field: message`` for each value that does not fit another section's."""
    problems = []
    space = params.tune.space.get(params.train.model, {})
    if params.tune.sampler == "grid":
        problems += [
            f"tune.space.{params.train.model}.{key}: the grid sampler needs choices, a step or "
            "an integer range"
            for key, search in space.items()
            if not search.discrete
        ]
    if params.train.precision == "fp16" and params.base.device == "cpu":
        problems.append(
            "train.precision: fp16 needs CUDA (its grad scaler), and base.device is cpu; "
            "use bf16 or fp32 on CPU"
        )
    return problems
