"""``params.yaml``'s ``tune`` section (``make tune``): sampler, pruner, storage and the search
space per model family, checked at load: every key names a train field, and every choice and
range end gives valid train settings.
"""

from __future__ import annotations

import copy
import types
import typing
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from stages.common.config_base import StrictModel, describe_errors
from stages.common.train_config import TrainParams


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
        "cnn": {
            "lr": r(low=1e-4, high=1e-2, log=True),
            "dropout": r(low=0.0, high=0.3),
            "channels": r(choices=[[16, 32], [32, 64], [16, 32, 64]]),
        },
        "gbdt": {
            "gbdt.learning_rate": r(low=0.02, high=0.3, log=True),
            "gbdt.max_leaf_nodes": r(low=8, high=64, integer=True),
            "gbdt.min_samples_leaf": r(low=5, high=50, integer=True),
            "gbdt.l2_regularization": r(low=0.0, high=1.0),  # includes the default, 0
        },
    }


class TuneParams(StrictModel):
    """Hyper-parameter search (``make tune``, ``python -m flows.tune``) with Optuna."""

    trials: int = Field(20, gt=0)  # trials per `make tune` (TRIALS=N overrides)
    parallel: int = Field(1, gt=0)  # trials at a time, each in its own process
    # where trials run: threads of the tune process, or the workers of a Dask cluster
    executor: Literal["threads", "dask"] = "threads"
    dask_address: str | None = None  # an existing scheduler, tcp://host:8786 (null: a local one)
    sampler: Literal["tpe", "grid", "random"] = "tpe"  # tpe = Bayesian; grid needs discrete ranges
    pruner: Literal["median", "hyperband", "none"] = "median"  # stop hopeless trials early
    # the study database: sqlite under the project, or postgresql+psycopg://user@host/db so
    # that several machines share one study (env TUNE_STORAGE overrides)
    storage: str = "sqlite:///data/tune/studies.db"
    max_epochs: int | None = Field(None, gt=0)  # cap each trial's train.max_epochs (null: keep)
    # what is searched, per model family: keys are train fields (dotted for sub-sections,
    # e.g. gbdt.learning_rate); the family tuned is train.model
    space: dict[str, dict[str, SearchRange]] = Field(default_factory=_default_spaces)

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, value: str | None) -> str | None:
        # the address only; whether it answers, and the stores every worker needs, make tune
        # checks when it starts (flows/tune_dask.py): not at load, which would block make run
        if value is None:
            return value
        url = urlsplit(value)
        try:
            port = url.port
        except ValueError:
            port = None
        if url.scheme not in ("tcp", "tls") or not url.hostname or port is None:
            raise ValueError(
                f"{value!r} is not a Dask scheduler address: give tcp://host:8786 (the "
                "scheduler's, with its port), or null for a local cluster of tune.parallel workers"
            )
        return value

    @field_validator("space")
    @classmethod
    def _valid_space(
        cls, value: dict[str, dict[str, SearchRange]]
    ) -> dict[str, dict[str, SearchRange]]:
        families = typing.get_args(TrainParams.model_fields["model"].annotation)
        problems = []
        for family, ranges in value.items():
            if family not in families:
                problems.append(f"{family}: not a model family ({', '.join(families)})")
                continue
            for key, search in ranges.items():
                problems += [f"{family}.{key}: {p}" for p in _check_range(family, key, search)]
        if problems:
            raise ValueError("; ".join(problems))
        return value


# What a family needs set before its train section validates at all (checked with each value)
_FAMILY_NEEDS: dict[str, dict[str, Any]] = {
    "cnn": {"image_shape": [1, 1, 1]},
    "rnn": {"rnn": {"sequence_length": 1}},
}


def _train_field(dotted: str) -> Any:
    """The pydantic field of ``train`` that ``dotted`` names, or None."""
    model: type[BaseModel] = TrainParams
    *parents, leaf = dotted.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return None if leaf == "model" else model.model_fields.get(leaf)


def _check_range(family: str, key: str, search: SearchRange) -> list[str]:
    """Why ``search`` cannot be tried for ``key`` of ``family`` ([] when it can).

    Each choice, and both ends of a range, must give a valid train section: a trial never
    fails on a value the space itself offered.
    """
    field = _train_field(key)
    if field is None:
        return ["not a field of train"]
    if search.choices is None:
        kinds = {kind for kind in (int, float) if _accepts(field.annotation, kind)}
        if not kinds:
            return ["a range over a field that is not a number: give choices"]
        if kinds == {int} and not search.integer:
            return ["an int field: set integer: true"]
        if search.integer and search.step is not None and search.step != int(search.step):
            return [f"integer step {search.step} is not a whole number"]
        values: list[Any] = [search.low, search.high]
        if search.integer:
            values = [int(v) for v in values]  # type: ignore[arg-type]
    else:
        values = list(search.choices)
    problems = []
    for value in values:
        raw: dict[str, Any] = {"model": family, **copy.deepcopy(_FAMILY_NEEDS.get(family, {}))}
        _set_dotted(raw, key, value)
        try:
            TrainParams.model_validate(raw)
        except ValidationError as exc:
            reason = "; ".join(describe_errors(exc))
            problems.append(f"{value!r} is not a valid value: {reason}")
    return problems


def _accepts(annotation: Any, kind: type) -> bool:
    # int, or an optional int (int | None); not list[int]
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return annotation is kind or (union and kind in typing.get_args(annotation))


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value
