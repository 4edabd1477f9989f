"""A tuning trial's values: drawn from ``tune.space.<family>``, set on ``train``.

Optuna stores None/bool/int/float/str only, so a list choice (``hidden_sizes: [64, 32]``) is
stored as its JSON text and decoded when suggested. Floats are rounded to ``SIGNIFICANT``
digits: what a trial trains with is what the write-back puts in ``params.yaml``. The grid's
points are listed here too (``grid_points``), in one seeded order every process agrees on, and
the trials the flow enqueues before a round: the missing grid points, the baseline.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from stages.common.config import SearchRange, TrainParams, describe_errors
from stages.common.errors import ConfigError

SIGNIFICANT = 4  # float values are rounded to this many digits: params.yaml stays readable


def encode(choice: Any) -> Any:
    """``choice`` as Optuna stores it: a list ([64, 32]) becomes its JSON text."""
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return json.dumps(choice)


def grid_space(space: Mapping[str, SearchRange]) -> dict[str, list[Any]]:
    """Every value of each (discrete) range, choices encoded as Optuna stores them.

    Raises:
        ConfigError: a continuous range (no choices, step or ``integer``), naming the key.
    """
    grid: dict[str, list[Any]] = {}
    for key, search in space.items():
        if search.choices is not None:
            grid[key] = [encode(choice) for choice in search.choices]
        elif search.integer:
            grid[key] = list(range(int(search.low), int(search.high) + 1, int(search.step or 1)))
        elif search.step is not None:
            count = int((search.high - search.low) / search.step + 1e-9) + 1
            grid[key] = [round(search.low + i * search.step, 12) for i in range(count)]
        else:
            raise ConfigError(
                f"{key} is a continuous range; the grid needs choices, a step or integer: true"
            )
    return grid


def grid_size(space: Mapping[str, SearchRange]) -> int:
    """How many points the grid sampler visits."""
    size = 1
    for values in grid_space(space).values():
        size *= len(values)
    return size


def grid_points(space: Mapping[str, SearchRange], seed: int) -> list[dict[str, Any]]:
    """Every grid point (values as Optuna stores them), shuffled by ``seed``: with fewer
    trials than points, the first ones spread over the grid."""
    grid = grid_space(space)
    keys = sorted(grid)
    points = [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]
    random.Random(seed).shuffle(points)
    return points


def point_key(values: Mapping[str, Any]) -> tuple:
    """``values`` comparable across storage round trips (floats to 9 significant digits)."""
    return tuple(
        sorted((k, float(f"{v:.9g}") if isinstance(v, float) else v) for k, v in values.items())
    )


def current_values(train: TrainParams, space: Mapping[str, SearchRange]) -> dict[str, Any] | None:
    """The values ``train`` has for the keys of ``space``, as Optuna stores them; None when
    one of them lies outside its range (it cannot be a trial of this space)."""
    data, values = train.model_dump(mode="json"), {}
    for key, search in space.items():
        value = data
        for part in key.split("."):
            value = value[part]
        if search.choices is not None:
            if value not in search.choices:
                return None
            values[key] = encode(value)
        elif not search.low <= value <= search.high:
            return None
        else:
            values[key] = value
    return values


def suggest(trial: optuna.Trial, space: Mapping[str, SearchRange]) -> dict[str, Any]:
    """Ask ``trial`` for a value of each range; choices come back decoded (lists as lists)."""
    values: dict[str, Any] = {}
    for key, search in space.items():
        if search.choices is not None:
            decoded = {encode(choice): choice for choice in search.choices}
            values[key] = decoded[trial.suggest_categorical(key, list(decoded))]
        elif search.integer:
            step = int(search.step or 1)
            values[key] = trial.suggest_int(
                key, int(search.low), int(search.high), step=step, log=search.log
            )
        else:
            values[key] = trial.suggest_float(
                key, search.low, search.high, step=search.step, log=search.log
            )
    return values


def _rounded(value: Any) -> Any:
    return float(f"{value:.{SIGNIFICANT}g}") if isinstance(value, float) else value


def apply_values(
    train: TrainParams, values: Mapping[str, Any], max_epochs: int | None = None
) -> tuple[TrainParams, dict[str, Any]]:
    """``train`` with ``values`` set (dotted keys reach sub-sections) and ``max_epochs`` capped.

    Returns the checked params and the values as applied (floats rounded to ``SIGNIFICANT``
    digits: what the trial trains with and what the write-back writes).

    Raises:
        ConfigError: the combination is not valid (e.g. n_heads not dividing d_token).
    """
    data = train.model_dump(mode="json")
    applied = {key: _rounded(value) for key, value in values.items()}
    for key, value in applied.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    if max_epochs is not None:
        data["max_epochs"] = min(data["max_epochs"], max_epochs)
    try:
        return TrainParams.model_validate(data), applied
    except ValidationError as exc:
        raise ConfigError(
            "these values do not make valid train params: "
            + "; ".join(describe_errors(exc, prefix="train"))
        ) from exc


# --- the trials a round starts with ----------------------------------------------------------


def queue_grid_points(
    study: optuna.Study, space: Mapping[str, SearchRange], seed: int, count: int
) -> int:
    """Enqueue up to ``count`` trials (less those already WAITING) on the grid points that no
    COMPLETE, PRUNED, RUNNING or WAITING trial holds, in ``grid_points`` order: a point whose
    trial failed or was killed runs again, and no point runs twice (Optuna's GridSampler
    counts a failed point as visited). Returns how many were enqueued. The flow calls it
    before each round, holding the run lock (the only process that plans)."""
    held, waiting = set(), 0
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.FAIL:
            continue
        waiting += trial.state == TrialState.WAITING
        held.add(point_key(trial.system_attrs.get("fixed_params") or trial.params))
    missing = [p for p in grid_points(space, seed) if point_key(p) not in held]
    todo = missing[: max(0, count - waiting)]
    for point in todo:
        study.enqueue_trial(point)
    return len(todo)


def enqueue_current(
    study: optuna.Study, train: TrainParams, space: Mapping[str, SearchRange]
) -> bool:
    """Make the params as they are the first trial of a new study: the best trial then beats
    them or is them, and the write-back never trades them for worse (on val). Not for the grid
    (it visits its own points) nor a study that has trials."""
    values = current_values(train, space)
    if values is None or study.get_trials(deepcopy=False):
        return False
    study.enqueue_trial(values, user_attrs={"baseline": True})
    return True
