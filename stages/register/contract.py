"""Build a model's input contract from the reviewed suite and params ``validate.rules``.

The contract itself (what it holds, how rows are checked against it) is ``model.contract``:
it ships with the model. Building it needs the pipeline's suite and rules, so it lives here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from model.contract import CONTRACT_VERSION
from stages.common.errors import ConfigError

if TYPE_CHECKING:
    from stages.common.config import ColumnRuleParams
    from stages.common.suite import Suite


def build_contract(
    suite: Suite, rules: dict[str, ColumnRuleParams], feature_columns: Iterable[str]
) -> dict[str, Any]:
    """The contract for a model trained on data that passed ``suite`` and ``rules``.

    Args:
        suite: the reviewed suite (``load_suite(params.validate.suite_path)``).
        rules: params ``validate.rules`` (row rules on top of the suite).
        feature_columns: the columns fed to the model (``preprocessor.feature_columns``).

    Raises:
        ConfigError: a feature column the suite does not know.
    """
    used = list(feature_columns)
    unknown = [name for name in used if name not in suite.columns or name == suite.target]
    if unknown:
        raise ConfigError(
            f"feature column(s) {unknown} are not columns of suite "
            f"{suite.name!r} (or are its target): the model and the suite "
            "disagree; re-run features with params validate.suite_path's suite"
        )
    columns = [
        _column(name, spec, rules.get(name), name in used)
        for name, spec in suite.columns.items()
        if name != suite.target
    ]
    return {
        "version": CONTRACT_VERSION,
        "target": suite.target,
        "labels": list(suite.labels),
        "columns": columns,
    }


def _column(name: str, spec: Any, rule: ColumnRuleParams | None, used: bool) -> dict[str, Any]:
    low, high, values = spec.min, spec.max, spec.values
    not_null, positive = spec.not_null, False
    if rule is not None:
        low = _tighter(low, rule.min, max)
        high = _tighter(high, rule.max, min)
        values = _intersect(values, rule.values)
        not_null, positive = not_null or rule.not_null, rule.positive
    return {
        "name": name,
        "kind": spec.kind,
        "nullable": not not_null,
        "min": low,
        "max": high,
        "positive": positive,
        "values": values,
        "format": getattr(spec, "format", None),
        "used": used,
    }


def _tighter(current: float | None, extra: float | None, pick: Any) -> float | None:
    return extra if current is None else current if extra is None else pick(current, extra)


def _intersect(current: list[Any] | None, extra: list[Any] | None) -> list[Any] | None:
    if current is None or extra is None:
        return current if extra is None else list(extra)
    return [value for value in current if value in extra]
