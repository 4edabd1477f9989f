"""Register stage: log the servable model, register a version, and run the model gate.

The new version becomes ``champion`` (params ``register.alias``) only if it clears the absolute
thresholds in params AND is not worse than the current champion on ``register.compare_metric``,
both scored through their own pyfunc on the same raw test split. Otherwise it becomes
``challenger``, with the reason recorded on the version. Failing the thresholds is a gate
failure (GateError after recording); losing to the champion is not. Aliases only: the
deprecated registry stages are never used. Before the alias moves, the version must load
through the service's own code path and answer its input example within
``register.max_latency_ms`` (``serving.check``); if not, that is a gate failure too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.common import tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, RegisterParams
from stages.common.errors import ConfigError, DataError, GateError
from stages.common.io import read_json, read_parquet, write_json
from stages.evaluate import LOWER_IS_BETTER, METRIC_NAMES, compute_metrics

if TYPE_CHECKING:
    import argparse

    import pandas as pd
    from mlflow import MlflowClient

    from stages.common.preprocess import FittedPreprocessor

logger = logging.getLogger(__name__)

LINEAGE_PREFIXES = ("git.", "dvc.", "prefect.")  # run tags copied onto the model version
TIE_TOLERANCE = 1e-9  # float noise below this counts as "equal", i.e. not worse
SKEW_TOLERANCE = 1e-4  # pyfunc vs evaluate metrics: a larger gap means serving skew


# --- pure core ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The model gate's verdict. ``gate_failed``: the absolute thresholds were not met."""

    promote: bool
    reason: str
    gate_failed: bool


def check_register_params(params: RegisterParams) -> None:
    """Every metric named in the thresholds and the comparison must be one the pipeline computes.

    Raises:
        ConfigError: naming the field and the unknown metric.
    """
    named = [("compare_metric", params.compare_metric),
             *(("min_metrics", k) for k in params.min_metrics),
             *(("max_metrics", k) for k in params.max_metrics)]
    for field, metric in named:
        if metric not in METRIC_NAMES:
            raise ConfigError(f"register.{field}: unknown metric {metric!r} "
                              f"(one of {', '.join(METRIC_NAMES)})")


def check_thresholds(metrics: dict[str, float], params: RegisterParams) -> list[str]:
    """The absolute thresholds that ``metrics`` miss, one description each (empty: all met)."""
    failures = []
    for name, floor in sorted(params.min_metrics.items()):
        value = metrics.get(name, math.nan)
        if not value >= floor:  # also catches NaN
            failures.append(f"{name} {value:.4f} < min {floor}")
    for name, ceiling in sorted(params.max_metrics.items()):
        value = metrics.get(name, math.nan)
        if not value <= ceiling:
            failures.append(f"{name} {value:.4f} > max {ceiling}")
    return failures


def _describe_cleared(metrics: dict[str, float], params: RegisterParams) -> str:
    met = ([f"{k} {metrics[k]:.4f} >= {v}" for k, v in sorted(params.min_metrics.items())]
           + [f"{k} {metrics[k]:.4f} <= {v}" for k, v in sorted(params.max_metrics.items())])
    return f"clears the absolute thresholds ({', '.join(met)})" if met else "no thresholds set"


def decide_promotion(candidate_metrics: dict[str, float],
                     champion_metrics: dict[str, float] | None,
                     params: RegisterParams) -> Decision:
    """Promote when the thresholds are met and the candidate is not worse than the champion.

    Args:
        candidate_metrics: the new model's test metrics.
        champion_metrics: the champion's metrics on the same test data; None when there is no
            champion (or it could not score the data): then the thresholds alone decide.
        params: thresholds, the metric to compare on.

    Raises:
        ConfigError: a threshold or the compare metric names an unknown metric.
    """
    check_register_params(params)
    metric = params.compare_metric
    failures = check_thresholds(candidate_metrics, params)
    if failures:
        return Decision(False, "below the absolute thresholds: " + "; ".join(failures), True)
    cleared = _describe_cleared(candidate_metrics, params)
    if champion_metrics is None:
        return Decision(True, f"no champion to compare with; {cleared}", False)
    ours, theirs = candidate_metrics[metric], champion_metrics.get(metric, math.nan)
    lower = metric in LOWER_IS_BETTER
    direction = "lower" if lower else "higher"
    gap = (theirs - ours) if lower else (ours - theirs)
    if not gap >= -TIE_TOLERANCE:  # also catches a NaN champion value
        return Decision(False, f"{metric} {ours:.4f} is worse than the champion's {theirs:.4f} "
                               f"on the same test data ({direction} is better); {cleared}",
                        False)
    verdict = "equal to" if abs(gap) <= TIE_TOLERANCE else "better than"
    return Decision(True, f"{metric} {ours:.4f} is {verdict} the champion's {theirs:.4f} on "
                          f"the same test data ({direction} is better); {cleared}", False)


def encode_with_classes(labels: pd.Series, classes: list[Any]) -> np.ndarray:
    """Label values -> class ids in ``classes``; a label outside them raises ValueError."""
    index = {label: i for i, label in enumerate(classes)}
    unknown = sorted({str(v) for v in labels if v not in index})
    if unknown:
        raise ValueError(f"label(s) {unknown[:5]} not among the model's classes {classes}")
    return labels.map(index).to_numpy(dtype=np.int64)


def lineage_from_run(run_tags: dict[str, str], run_id: str) -> dict[str, str]:
    """The run's lineage tags (git, dvc, prefect) plus its id, to copy onto the version."""
    tags = {k: v for k, v in run_tags.items() if k.startswith(LINEAGE_PREFIXES)}
    return {**tags, "run_id": run_id}


# --- I/O ----------------------------------------------------------------------------------


def score_model(model_uri: str, test: pd.DataFrame, target: str,
                classes: list[Any]) -> dict[str, float]:
    """Score a registered pyfunc on raw test rows: its output columns -> the test metrics.

    Raises:
        DataError, ValueError, MlflowException: the model cannot score this data
        (other columns, other classes) or cannot be loaded.
    """
    import mlflow

    from stages.common.servable import proba_matrix

    model = mlflow.pyfunc.load_model(model_uri)
    predictions = model.predict(test.drop(columns=[target]))
    proba = proba_matrix(predictions, classes)
    return compute_metrics(encode_with_classes(test[target], classes), proba)


def _score_champion(client: MlflowClient, params: RegisterParams, version: str | None,
                    test: pd.DataFrame,
                    preprocessor: FittedPreprocessor) -> tuple[dict[str, float] | None, str]:
    if version is None:
        return None, "first model"
    uri = f"models:/{params.model_name}@{params.alias}"
    try:
        metrics = score_model(uri, test, preprocessor.target, preprocessor.classes)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot score", decided below
        logger.warning("champion v%s cannot score the current test data: %s", version, exc)
        return None, (f"champion v{version} could not score the current test data "
                      f"({type(exc).__name__}: {str(exc)[:300]}), so the thresholds alone decide")
    return metrics, f"champion v{version}"


def _champion_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return model.aliases.get(alias)


def _warn_if_skewed(served: dict[str, float], evaluated: dict[str, float]) -> None:
    gaps = {k: abs(served[k] - evaluated[k]) for k in METRIC_NAMES}
    if max(gaps.values()) > SKEW_TOLERANCE:
        logger.warning("served model and evaluate stage disagree on the test metrics "
                       "(serving skew?): served %s, evaluated %s", served, evaluated)


def _read_inputs(features_dir: Path,
                 metrics_path: Path) -> tuple[pd.DataFrame, FittedPreprocessor, dict[str, float]]:
    from stages.common.preprocess import load_preprocessor

    evaluated = read_json(metrics_path)
    for name in METRIC_NAMES:
        if not isinstance(evaluated.get(name), (int, float)):
            raise DataError("metric missing or not a number; re-run evaluate",
                            file=str(metrics_path), column=name, rule="metric_present")
    preprocessor = load_preprocessor(features_dir / "preprocessor.joblib")
    test_path = features_dir / "test.parquet"
    test = read_parquet(test_path)
    if preprocessor.target not in test.columns:
        raise DataError("target column not found", file=str(test_path),
                        column=preprocessor.target, rule="column_present")
    return test, preprocessor, evaluated


def _record_on_version(client: MlflowClient, record: dict[str, Any],
                       run_tags: dict[str, str]) -> None:
    name, version = record["model_name"], str(record["version"])
    tags = {
        "promotion.decision": record["decision"],
        "promotion.reason": record["reason"],
        **{f"metric.{k}": f"{v:.6f}" for k, v in record["metrics"].items()},
        **lineage_from_run(run_tags, record["run_id"]),
    }
    if record["previous_champion_version"] is not None:
        tags["promotion.previous_champion_version"] = str(record["previous_champion_version"])
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=(
        f"{record['decision']}: {record['reason']}. Trained in MLflow run {record['run_id']}."))


def _check_serving(uri: str, rp: RegisterParams, decision: Decision) -> Decision:
    from serving.check import check_servable

    check = check_servable(uri, rp.max_latency_ms)
    if not check.passed:  # a gate failure: recorded on the version, then GateError
        return Decision(False, f"{check.describe()} (on its metrics alone: {decision.reason})",
                        True)
    return Decision(True, f"{decision.reason}; {check.describe()}", False)


def _judge_version(client: MlflowClient, rp: RegisterParams, version: str,
                   previous: str | None, test: pd.DataFrame, preprocessor: FittedPreprocessor,
                   evaluated: dict[str, float]) -> tuple[Decision, dict[str, Any]]:
    # Both models are scored the same way: loaded from the registry, raw test rows in.
    candidate = score_model(f"models:/{rp.model_name}/{version}", test, preprocessor.target,
                            preprocessor.classes)
    _warn_if_skewed(candidate, evaluated)
    champion, context = _score_champion(client, rp, previous, test, preprocessor)
    decision = decide_promotion(candidate, champion, rp)
    if decision.promote:  # the alias only moves to a version the service can load and answer
        decision = _check_serving(f"models:/{rp.model_name}/{version}", rp, decision)
    client.set_registered_model_alias(
        rp.model_name, rp.alias if decision.promote else rp.challenger_alias, version)
    return decision, {
        "model_name": rp.model_name, "version": int(version),
        "decision": "promoted" if decision.promote else "challenger",
        "reason": f"{context}: {decision.reason}", "metrics": candidate,
        "champion_metrics": champion,
        "previous_champion_version": int(previous) if previous is not None else None,
    }


def run(features_dir: str | Path, model_dir: str | Path, metrics_path: str | Path,
        out_path: str | Path, params: Params) -> dict[str, Any]:
    """Log + register the servable model, run the model gate, move the alias, record why.

    Returns:
        The registration record (also written to ``out_path``).

    Raises:
        GateError: the absolute thresholds were not met; the version is registered, tagged
            and aliased ``challenger`` and ``out_path`` written first; the champion is untouched.
    """
    import mlflow
    from mlflow import MlflowClient

    from stages.common.servable import log_servable
    from stages.common.variants import log_variants

    features_dir, model_dir, rp = Path(features_dir), Path(model_dir), params.register
    check_register_params(rp)
    test, preprocessor, evaluated = _read_inputs(features_dir, Path(metrics_path))
    with tracking.resume_run(model_dir, params.mlflow) as active:
        client = MlflowClient()
        previous = _champion_version(client, rp.model_name, rp.alias)
        info = log_servable(features_dir / "preprocessor.joblib", model_dir / "model.pt",
                            test.head(5), registered_model_name=rp.model_name)
        # ONNX + int8 copies beside it, scored on the same test rows (variants/ in the run).
        log_variants(features_dir / "preprocessor.joblib", model_dir / "model.pt", test)
        version = str(info.registered_model_version)
        decision, record = _judge_version(client, rp, version, previous, test, preprocessor,
                                          evaluated)
        record["run_id"] = active.info.run_id
        _record_on_version(client, record, client.get_run(active.info.run_id).data.tags)
        mlflow.set_tags({"registered.model": rp.model_name, "registered.version": version,
                         "promotion.decision": record["decision"]})
    write_json(out_path, record)
    logger.info("%s v%s %s: %s", rp.model_name, version, record["decision"], record["reason"])
    if decision.gate_failed:
        raise GateError(f"model gate: {rp.model_name} v{version} {decision.reason} "
                        f"(marked {rp.challenger_alias}; champion unchanged)")
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stages.register --features DIR --model DIR --metrics FILE --out FILE``."""
    parser = build_parser("register", "Register the model; promote it if it passes the gate.")
    parser.add_argument("--features", required=True, help="features dir (test split)")
    parser.add_argument("--model", required=True, help="model dir (model.pt, run.json)")
    parser.add_argument("--metrics", required=True, help="metrics JSON from evaluate")
    parser.add_argument("--out", required=True, help="registration record JSON")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.features, args.model, args.metrics, args.out, params)

    return run_main("register", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
