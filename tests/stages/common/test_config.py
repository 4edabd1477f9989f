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
        ({"train": {"model": "xgboost"}}, "train.model"),
        ({"train": {"model": "rnn"}}, "rnn.sequence_length"),
        ({"tune": {"space": {"mlp": {"lrr": {"low": 0.1, "high": 1}}}}}, "mlp.lrr: not a field"),
        ({"tune": {"space": {"rnn": {"rnn.cell": {"choices": ["gru", "bogus"]}}}}}, "'bogus'"),
        ({"tune": {"space": {"mlp": {"dropout": {"low": 0, "high": 1.5}}}}}, "1.5 is not a valid"),
        ({"tune": {"space": {"mlp": {"hidden_sizes": {"low": 1, "high": 4}}}}}, "give choices"),
        ({"tune": {"space": {"mlp": {"batch_size": {"low": 8, "high": 64}}}}}, "integer: true"),
        (
            {"tune": {"space": {"transformer": {"transformer.d_token": {"choices": [30]}}}}},
            "n_heads 4 must divide d_token 30",
        ),
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


METRICS = "(one of accuracy, f1_macro, roc_auc_macro, roc_auc_micro, log_loss)"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"min_metrics": {"roc_auc": 0.9}},
            f"register.min_metrics: unknown metric 'roc_auc' {METRICS}; "
            "renamed to roc_auc_macro or roc_auc_micro",
        ),
        ({"max_metrics": {"loss": 0.5}}, f"register.max_metrics: unknown metric 'loss' {METRICS}"),
        ({"compare_metric": "f1"}, f"register.compare_metric: unknown metric 'f1' {METRICS}"),
        (
            {"alias": "my champion"},
            "register.alias: 'my champion' is not an MLflow alias: 1-255 letters, digits, _ and -",
        ),
        (
            {"challenger_alias": "V2"},
            "register.challenger_alias: 'V2' is reserved by MLflow ('latest' and v<number>)",
        ),
        ({"alias": "Latest"}, "register.alias: 'Latest' is reserved by MLflow"),
        (
            {"alias": "challenger"},  # challenger_alias left at its default
            "register.challenger_alias: 'challenger' must differ from register.alias",
        ),
    ],
)
def test_register_metric_names_and_aliases_are_checked_at_load(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"register": raw})
    assert f"params.yaml: invalid value: {message}" in str(info.value)


def test_register_accepts_every_metric_it_can_gate_on() -> None:
    names = ("accuracy", "f1_macro", "roc_auc_macro", "roc_auc_micro", "log_loss")
    params = parse_params(
        {"register": {"compare_metric": "log_loss", "min_metrics": dict.fromkeys(names, 0.1)}}
    )
    assert set(params.register.min_metrics) == set(names)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"cron": "0 6 * *"},
            "schedule.cron: '0 6 * *' is not a cron expression: minute hour day-of-month "
            "month day-of-week, e.g. '0 6 * * *' (daily at 06:00)",
        ),
        ({"cron": "61 * * * *"}, "schedule.cron: '61 * * * *' is not a cron expression"),
        ({"cron": "H 6 * * *"}, "schedule.cron: 'H 6 * * *' is not a cron expression"),
        (
            {"timezone": "Mars/Base"},
            "schedule.timezone: unknown time zone 'Mars/Base': use an IANA name, "
            "e.g. UTC or Europe/Berlin",
        ),
        ({"timezone": "../etc"}, "schedule.timezone: unknown time zone '../etc'"),
        (
            {"timezone": "posix/UTC"},
            "schedule.timezone: 'posix/UTC' is a tz database file, not a time zone name",
        ),
        (
            {"deployment": "daily/6am"},
            "schedule.deployment: 'daily/6am' is not a Prefect deployment name: not empty, "
            "none of /%&><",
        ),
        ({"deployment": ""}, "schedule.deployment: '' is not a Prefect deployment name"),
    ],
)
def test_schedule_cron_timezone_and_name_are_checked_at_load(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"schedule": raw})
    assert f"params.yaml: invalid value: {message}" in str(info.value)


@pytest.mark.parametrize(
    "cron",
    [
        "0 6 * * *",
        "*/15 9-17 * * mon-fri",
        "@daily",
        "0 0 L * *",
        "0 0 * * 1#2",
        "0 6 * *",
        "R * * * *",
    ],
)
@pytest.mark.parametrize(
    "timezone", ["UTC", "Europe/Berlin", "Mars/Base", "posixrules", "posix/UTC"]
)
def test_schedule_check_agrees_with_prefect(cron: str, timezone: str) -> None:
    """What loads is what flows.schedule's Prefect CronSchedule accepts, and nothing else."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
        prefect_accepts = True
    except ValidationError:
        prefect_accepts = False
    try:
        parse_params({"schedule": {"cron": cron, "timezone": timezone}})
        we_accept = True
    except ConfigError:
        we_accept = False
    assert we_accept == prefect_accepts


def test_every_listed_time_zone_loads() -> None:
    from zoneinfo import available_timezones

    for name in available_timezones():
        assert parse_params({"schedule": {"timezone": name}}).schedule.timezone == name


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"train": {"model": "cnn"}},
            "train.image_shape: model 'cnn' needs image_shape: [channels, height, width]",
        ),
        (
            {"train": {"model": "cnn", "image_shape": [1, 8]}},
            "train.image_shape: model 'cnn' needs image_shape",
        ),
        (
            {"train": {"image_shape": [1, 0, 8]}},
            "train.image_shape: [1, 0, 8]: every size must be a positive integer",
        ),
        (
            {"train": {"batch_size": 64, "nproc": 3}},
            "train.nproc: train.batch_size 64 does not split over 3 processes: use a multiple of 3",
        ),
        (
            {"features": {"test_size": 0.5, "val_size": 0.45}},
            "features.val_size: test_size 0.5 + val_size 0.45 must leave at least 10% for training",
        ),
        (
            {"compress": {"methods": []}},
            "compress.methods: no method listed: name at least one of prune, quantize, distill, "
            "or set compress.enabled: false to turn compression off",
        ),
        (
            {"base": {"device": "cpu"}, "train": {"precision": "fp16"}},
            "train.precision: fp16 needs CUDA (its grad scaler), and base.device is cpu; "
            "use bf16 or fp32 on CPU",
        ),
    ],
)
def test_values_that_need_another_field_are_checked_at_load(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert f"params.yaml: invalid value: {message}" in str(info.value)


def test_values_that_fit_together_load() -> None:
    params = parse_params(
        {
            "base": {"device": "auto"},  # fp16 on auto: CUDA or not is known at run time
            "train": {"model": "cnn", "image_shape": [1, 8, 8], "batch_size": 64, "nproc": 4},
        }
    )
    assert params.train.nproc == 4
    assert parse_params({"train": {"precision": "fp16"}}).train.precision == "fp16"


def test_the_message_names_the_file_read_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0\nschedule:\n  cron: every day\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value).startswith(f"{path}: invalid value: ")
    assert "train.lr: Input should be greater than 0" in str(info.value)
    assert "schedule.cron: 'every day' is not a cron expression" in str(info.value)


def test_checking_a_bad_choice_leaves_later_checks_alone() -> None:
    # each value is tried on its own copy of what the family needs: a rejected choice must not
    # linger in it and fail every later load (seen in CI: "rnn.lr ... rnn.cell" after 'bogus')
    with pytest.raises(ConfigError, match="'bogus'"):
        parse_params({"tune": {"space": {"rnn": {"rnn.cell": {"choices": ["bogus"]}}}}})

    params = parse_params({"tune": {"space": {"rnn": {"lr": {"low": 0.001, "high": 0.01}}}}})

    assert params.tune.space["rnn"]["lr"].high == 0.01
