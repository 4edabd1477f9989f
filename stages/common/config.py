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

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from stages.common.config_base import StrictModel, describe_errors, read_yaml
from stages.common.errors import ConfigError
from stages.common.fuse_config import CompressParams, EnsembleMembers, EnsembleParams
from stages.common.monitor_config import MonitorParams
from stages.common.redact import redact_url
from stages.common.train_config import GbdtParams, RnnParams, TrainParams, TransformerParams
from stages.common.tune_config import SearchRange, TuneParams

# the section models live beside this module; these names stay importable from here
__all__ = [
    "CompressParams",
    "ConfigError",
    "EnsembleMembers",
    "EnsembleParams",
    "GbdtParams",
    "MonitorParams",
    "Params",
    "RnnParams",
    "SearchRange",
    "StrictModel",
    "TrainParams",
    "TransformerParams",
    "TuneParams",
    "describe_errors",
    "load_params",
    "parse_params",
    "read_yaml",
]

SKLEARN_SOURCES = ("breast_cancer", "digits")
URL_SCHEMES = ("http", "https", "s3", "gs", "gcs", "az", "abfs")  # read through fsspec
SQL_DIALECTS = ("postgresql", "mysql", "mariadb", "sqlite", "mssql", "oracle")  # SQLAlchemy
MLFLOW_ALIAS = re.compile(r"[\w-]+")  # MLflow's alias rules (mlflow.utils.validation)
PREFECT_BANNED = "/%&><"  # characters a Prefect name may not hold (prefect.types.names)
MLFLOW_VERSION_ALIAS = re.compile(r"[vV]\d+")  # reserved: it would read as a version


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
    # ordered: rows dropped before val and before test, so that no day is in a window on
    # both sides (windows of T steps with the next step as label: T)
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
    ensemble: EnsembleParams
    evaluate: EvaluateParams
    export: ExportParams
    compress: CompressParams
    register: RegisterParams
    tune: TuneParams
    schedule: ScheduleParams
    serve: ServeParams
    monitor: MonitorParams


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
    if params.train.precision == "fp16" and params.base.device == "cpu":
        problems.append(
            "train.precision: fp16 needs CUDA (its grad scaler), and base.device is cpu; "
            "use bf16 or fp32 on CPU"
        )
    compress = params.compress
    try:
        check_metric_name(compress.metric)
    except ValueError as exc:
        problems.append(f"compress.metric: {exc}")
    if not MLFLOW_ALIAS.fullmatch(compress.alias) or MLFLOW_VERSION_ALIAS.fullmatch(compress.alias):
        problems.append(f"compress.alias: {compress.alias!r} is not a valid MLflow alias")
    if compress.alias in (params.register.alias, params.register.challenger_alias):
        problems.append(
            f"compress.alias: {compress.alias!r} is register's own alias; the compact model "
            "needs one of its own (e.g. champion-compact)"
        )
    return problems
