"""Register stage: log the servable model, register a version, and run the model gate.

The gate, in order (both models scored through their own pyfunc on the same raw test split):

1. Identical model: when a version of ``register.model_name`` already holds the same content
   (network weights and architecture, fitted preprocessor, input contract, model code; tag
   ``model.content_hash``), nothing is registered and no alias moves; the record says
   "identical to vN". A version that failed the gate is judged again instead (the gate's
   params may have changed), still without a new version.
2. Input schema: a candidate whose input contract (columns, kinds, date formats, target,
   labels) differs from the champion's is not compared with it: GateError naming both versions
   and the differences, champion untouched, unless ``register.allow_schema_change``.
3. Baselines (the default gate): the candidate must beat the majority-class baseline on
   ``register.compare_metric`` and trail the best simple baseline (evaluate scores them on the
   same test split) by at most ``register.max_gap_to_baseline``. Optional absolute thresholds
   ``register.min_metrics`` / ``max_metrics`` on top. Missing any is a gate failure.
4. Champion: only a candidate strictly better on ``register.compare_metric`` becomes
   ``champion`` (``register.alias``); a tie or a worse one becomes ``challenger``. Except:
   the champion's own network (same weights, preprocessor and model code: tag
   ``model.network_hash``) with other row rules in its contract (an edited suite) promotes on
   the tie, so the service gets the reviewed rules. A champion is never compared with itself.

A gate failure is recorded on the version (aliased ``challenger``), then raises GateError;
losing to (or tying with) the champion is not a failure. Aliases only: the deprecated registry
stages are never used. Before the alias moves, the version must load through the service's own
code path and answer its input example within ``register.max_latency_ms``
(``serving.check``); if not, that is a gate failure too.

Idempotent: a version is created with its content hash and ``promotion.gate: pending`` in one
call, and found again by that hash (or, untagged, by its MLflow run) before anything is logged,
so a retry, a re-run or a later identical run resumes it instead of adding one. The whole
decision is recorded on the version first; then the alias moves, once, through
``stages.common.registry`` (which logs the move in the alias history); then the gate tag
becomes ``passed`` (or ``failed``). A run stopped anywhere before that leaves the version
``pending`` (or ``failed``) and, unless the alias had already moved, not champion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.artifacts import ArtifactIntegrityError
from model.files import NETWORK_FILE, PREPROCESSOR_FILE
from model.metrics import (
    BASELINES,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    RENAMED,
    compute_metrics,
    read_baselines,
)
from stages.common import integrity, registry, tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, RegisterParams
from stages.common.errors import ConfigError, DataError, GateError
from stages.common.io import read_json, read_parquet, write_json

if TYPE_CHECKING:
    import argparse

    import pandas as pd
    from mlflow import MlflowClient

    from model.preprocess import FittedPreprocessor

logger = logging.getLogger(__name__)

LINEAGE_PREFIXES = ("git.", "dvc.", "prefect.")  # run tags copied onto the model version
TIE_TOLERANCE = 1e-9  # float noise below this counts as "equal", i.e. not worse
SKEW_TOLERANCE = 1e-4  # pyfunc vs evaluate metrics: a larger gap means serving skew
CONTENT_TAG = "model.content_hash"  # on each version: what the model is (see content_hash)
NETWORK_TAG = "model.network_hash"  # the same without the input contract
GATE_TAG = registry.GATE_TAG  # passed | failed | pending: an identical model not yet passed
#   (failed, or the run died between registering and moving the alias) is judged again
MAX_REASON = 600  # characters: a reason is one bounded line, never a dumped object
# a file named in an ArtifactIntegrityError ("model/<path> expected sha256 ...", "... missing")
_FAILED_FILE = re.compile(
    r"\b((?:model|variants)/[^\s;]+) (?:expected sha256|missing|not recorded)"
)


# --- pure core ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The model gate's verdict. ``gate_failed``: the candidate failed the gate (GateError)."""

    promote: bool
    reason: str
    gate_failed: bool


def check_register_params(params: RegisterParams) -> None:
    """Every metric named in the thresholds and the comparison must be one the pipeline computes.

    Raises:
        ConfigError: naming the field and the unknown metric.
    """
    named = [
        ("compare_metric", params.compare_metric),
        *(("min_metrics", k) for k in params.min_metrics),
        *(("max_metrics", k) for k in params.max_metrics),
    ]
    for field, metric in named:
        if metric not in METRIC_NAMES:
            renamed = f"; renamed to {RENAMED[metric]}" if metric in RENAMED else ""
            raise ConfigError(
                f"register.{field}: unknown metric {metric!r} "
                f"(one of {', '.join(METRIC_NAMES)}){renamed}"
            )


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
    met = [f"{k} {metrics[k]:.4f} >= {v}" for k, v in sorted(params.min_metrics.items())] + [
        f"{k} {metrics[k]:.4f} <= {v}" for k, v in sorted(params.max_metrics.items())
    ]
    return f"clears the absolute thresholds ({', '.join(met)})" if met else ""


def _gain(ours: float, theirs: float, metric: str) -> float:
    # How much better ``ours`` is (negative: worse); NaN when either is NaN.
    return (theirs - ours) if metric in LOWER_IS_BETTER else (ours - theirs)


def check_baselines(
    metrics: dict[str, float], baselines: dict[str, dict[str, float]], params: RegisterParams
) -> tuple[list[str], str]:
    """The relative gate: beat the majority class, trail the best baseline by at most
    ``params.max_gap_to_baseline`` (both on ``params.compare_metric``).

    Returns:
        (failures, one description each; what was cleared, for the reason).
    """
    metric, max_gap = params.compare_metric, params.max_gap_to_baseline
    if max_gap is None:
        return [], ""
    ours = metrics.get(metric, math.nan)
    majority = baselines["majority"].get(metric, math.nan)
    scored = {name: scores.get(metric, math.nan) for name, scores in baselines.items()}
    best = max(scored, key=lambda name: _gain(scored[name], ours, metric))
    failures = []
    if not _gain(ours, majority, metric) > TIE_TOLERANCE:  # also catches NaN
        failures.append(
            f"{metric} {ours:.4f} does not beat the majority-class baseline's {majority:.4f}"
        )
    gap = -_gain(ours, scored[best], metric)
    if not gap <= max_gap + TIE_TOLERANCE:
        failures.append(
            f"{metric} {ours:.4f} trails the {best} baseline's "
            f"{scored[best]:.4f} by {gap:.4f} > register.max_gap_to_baseline "
            f"{max_gap}"
        )
    cleared = (
        f"beats the majority-class baseline ({metric} {majority:.4f}) and is within "
        f"{max_gap} of the best baseline ({best} {scored[best]:.4f})"
    )
    return failures, cleared


def decide_promotion(
    candidate_metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    params: RegisterParams,
    baselines: dict[str, dict[str, float]] | None = None,
) -> Decision:
    """Promote when the gate is cleared and the candidate beats the champion (a tie: no).

    Args:
        candidate_metrics: the new model's test metrics.
        champion_metrics: the champion's metrics on the same test data; None when there is no
            champion to compare with: then the gate alone decides.
        params: the gate (baseline gap, absolute thresholds), the metric to compare on.
        baselines: ``{baseline: metrics}`` on the same test data (evaluate's); None: the
            baseline gate is not applied.

    Raises:
        ConfigError: a threshold or the compare metric names an unknown metric.
    """
    check_register_params(params)
    metric = params.compare_metric
    failures = []
    if below := check_thresholds(candidate_metrics, params):
        failures.append("below the absolute thresholds: " + "; ".join(below))
    cleared = [_describe_cleared(candidate_metrics, params)]
    if baselines is not None:
        below, relative = check_baselines(candidate_metrics, baselines, params)
        if below:
            failures.append("below the baselines: " + "; ".join(below))
        cleared.append(relative)
    if failures:
        return Decision(False, "; ".join(failures), True)
    cleared_text = "; ".join(c for c in cleared if c) or "no gate set"
    if champion_metrics is None:
        return Decision(True, f"no champion to compare with; {cleared_text}", False)
    ours, theirs = candidate_metrics[metric], champion_metrics.get(metric, math.nan)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    gain = _gain(ours, theirs, metric)
    versus = f"the champion's {theirs:.4f} on the same test data ({direction} is better)"
    if abs(gain) <= TIE_TOLERANCE:  # bit-identical or equally good: the champion stays
        return Decision(
            False,
            f"tie: {metric} {ours:.4f} is equal to {versus}; a tie never "
            f"moves the alias; {cleared_text}",
            False,
        )
    if not gain > 0:  # also catches a NaN champion value
        return Decision(False, f"{metric} {ours:.4f} is worse than {versus}; {cleared_text}", False)
    return Decision(True, f"{metric} {ours:.4f} is better than {versus}; {cleared_text}", False)


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """``text`` on one line of at most ``limit`` characters (for reasons, tags, errors)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def content_hash(
    checkpoint: dict[str, Any],
    preprocessor_bytes: bytes,
    contract: dict[str, Any] | None,
    code: dict[str, bytes],
) -> str:
    """What the model is, as a sha256: two models with the same hash answer alike.

    Hashed: the network's architecture and weights (not the checkpoint file: ``torch.save``
    embeds the file name, and the epoch/val-loss records do not change the model), the
    fitted preprocessor's bytes (joblib output, stable for the same fit), the input contract
    (None: left out, the network hash) and the model code that ships with it (``code``:
    relative path -> bytes).
    """
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    train = checkpoint["train_params"]
    architecture = {
        key: train.get(key)
        for key in ("model", "hidden_sizes", "channels", "image_shape", "dropout")
    }
    add(
        "architecture",
        json.dumps(
            {
                **architecture,
                "n_features": checkpoint["n_features"],
                "n_classes": checkpoint["n_classes"],
            },
            sort_keys=True,
        ).encode(),
    )
    for name, tensor in sorted(checkpoint["state_dict"].items()):
        values = tensor.detach().cpu().contiguous()
        add(
            f"tensor {name} {values.dtype} {tuple(values.shape)}",
            values.view(-1).view(_byte_dtype()).numpy().tobytes(),
        )
    add("preprocessor", preprocessor_bytes)
    if contract is not None:
        add("contract", json.dumps(contract, sort_keys=True, default=str).encode())
    for path, data in sorted(code.items()):
        add(f"code {path}", data)
    return digest.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


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


def score_model(
    model_uri: str, test: pd.DataFrame, target: str, classes: list[Any], key_env: str | None = None
) -> dict[str, float]:
    """Score a registered pyfunc on raw test rows: its output columns -> the test metrics.

    The version's files are downloaded and checked against the hashes recorded at
    registration (and their signature, when the key in ``key_env``, default
    ``MODEL_SIGNING_KEY``, is set) before it loads.

    Raises:
        ArtifactIntegrityError: the files differ, or the signature is missing or wrong.
        DataError, ValueError, MlflowException: the model cannot score this data
        (other columns, other classes) or cannot be loaded.
    """
    import tempfile

    import mlflow

    from model.artifacts import ensure_verified
    from model.servable import proba_matrix

    with tempfile.TemporaryDirectory(prefix="register-score-") as tmp:
        model = mlflow.pyfunc.load_model(ensure_verified(model_uri, tmp, key_env))
    predictions = model.predict(test.drop(columns=[target]))
    proba = proba_matrix(predictions, classes)
    return compute_metrics(encode_with_classes(test[target], classes), proba)


@dataclass(frozen=True)
class Candidate:
    """What register judges: the files, what they are (hash, contract) and the test data."""

    features_dir: Path
    model_dir: Path
    test: pd.DataFrame
    preprocessor: FittedPreprocessor
    evaluated: dict[str, float]
    baselines: dict[str, dict[str, float]]
    contract: dict[str, Any]
    content_hash: str
    network_hash: str  # content_hash without the contract


def _compare_with_champion(
    rp: RegisterParams, previous: str | None, cand: Candidate
) -> tuple[dict[str, float] | None, str, str | None]:
    """(champion metrics or None, context for the reason, why the gate refuses or None)."""
    from model.contract import contract_differences, model_contract

    if previous is None:
        return None, "first model", None
    uri = f"models:/{rp.model_name}@{rp.alias}"
    try:
        differences = contract_differences(model_contract(uri), cand.contract)
    except Exception as exc:  # noqa: BLE001 - an unreadable champion cannot be compared
        logger.warning("champion v%s: cannot read its input contract: %s", previous, exc)
        differences = [f"its input contract could not be read ({type(exc).__name__}: {exc})"]
    if differences:
        what = one_line("; ".join(differences), MAX_REASON // 2)
        if not rp.allow_schema_change:
            return (
                None,
                f"champion v{previous}",
                (
                    f"has another input schema or label set than champion v{previous} ({what}): "
                    "not compared; set register.allow_schema_change: true to promote across "
                    "schemas, or use another register.model_name"
                ),
            )
        return (
            None,
            (
                f"input schema changed from champion v{previous} ({what}), allowed by "
                "register.allow_schema_change, so it is not compared"
            ),
            None,
        )
    try:
        metrics = score_model(
            uri, cand.test, cand.preprocessor.target, cand.preprocessor.classes, rp.signing_key_env
        )
    except ArtifactIntegrityError as exc:  # not a schema question: the registry needs repair
        logger.error("champion v%s fails its artifact verification: %s", previous, exc)
        return (
            None,
            f"champion v{previous}",
            _champion_fails_verification(rp.model_name, previous, exc),
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot compare"
        logger.warning("champion v%s cannot score the current test data: %s", previous, exc)
        why = one_line(
            f"champion v{previous} could not score the current test data "
            f"({type(exc).__name__}: {exc})",
            MAX_REASON // 2,
        )
        if rp.allow_schema_change:
            return None, f"{why}; allowed by register.allow_schema_change, not compared", None
        return (
            None,
            f"champion v{previous}",
            (
                f"{why}: not compared; set register.allow_schema_change: true to promote without "
                "the comparison"
            ),
        )
    return metrics, f"champion v{previous}", None


def _champion_fails_verification(name: str, previous: str, exc: Exception) -> str:
    """Why a candidate is not compared with a champion whose stored files (or signature)
    fail the hashes recorded at its registration: the files, and the repair (not a schema
    question, so register.allow_schema_change does not let it through)."""
    files = list(dict.fromkeys(_FAILED_FILE.findall(str(exc))))
    what = (
        f"file(s) {', '.join(files)} differ from the sha256 recorded at its registration"
        if files
        else one_line(str(exc).split(" Fix:")[0], MAX_REASON // 3)
    )
    return (
        f"is not compared with champion v{previous}, whose stored files fail their "
        f"recorded hashes ({what}); nothing of v{previous} was loaded. Fix the registry "
        f"first: `make rollback "
        f"REASON=...` moves champion back to a good version (or VERSION=n), or restore "
        f"v{previous}'s files in the artifact store (check: python -m "
        f"flows.artifacts verify models:/{name}/{previous}) or re-register it; "
        f"then run register again"
    )


def _champion_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)  # an int from some stores
    return None if version is None else str(version)


def _warn_if_skewed(served: dict[str, float], evaluated: dict[str, float]) -> None:
    gaps = {k: abs(served[k] - evaluated[k]) for k in METRIC_NAMES}
    if max(gaps.values()) > SKEW_TOLERANCE:
        logger.warning(
            "served model and evaluate stage disagree on the test metrics "
            "(serving skew?): served %s, evaluated %s",
            served,
            evaluated,
        )


def _read_inputs(
    features_dir: Path, model_dir: Path, metrics_path: Path, params: Params
) -> Candidate:
    from model.nets import load_network
    from model.preprocess import load_preprocessor
    from stages.common.suite import load_suite
    from stages.register.contract import build_contract

    evaluated = read_json(metrics_path)
    for name in METRIC_NAMES:
        if not isinstance(evaluated.get(name), (int, float)):
            raise DataError(
                "metric missing or not a number; re-run evaluate",
                file=str(metrics_path),
                column=name,
                rule="metric_present",
            )
    baselines = read_baselines(evaluated)
    if params.register.max_gap_to_baseline is not None:
        for name in BASELINES:
            if params.register.compare_metric not in baselines[name]:
                raise DataError(
                    f"baseline {name!r} missing; re-run evaluate (or set "
                    "register.max_gap_to_baseline: null)",
                    file=str(metrics_path),
                    column=f"baseline_{name}_{params.register.compare_metric}",
                    rule="metric_present",
                )
    preprocessor_path = features_dir / PREPROCESSOR_FILE
    preprocessor = load_preprocessor(preprocessor_path)
    test_path = features_dir / "test.parquet"
    test = read_parquet(test_path)
    if preprocessor.target not in test.columns:
        raise DataError(
            "target column not found",
            file=str(test_path),
            column=preprocessor.target,
            rule="column_present",
        )
    contract = build_contract(
        load_suite(params.validate.suite_path), params.validate.rules, preprocessor.feature_columns
    )
    _, checkpoint = load_network(model_dir / NETWORK_FILE)
    fitted, code = preprocessor_path.read_bytes(), _model_code()
    return Candidate(
        features_dir,
        model_dir,
        test,
        preprocessor,
        evaluated,
        baselines,
        contract,
        content_hash(checkpoint, fitted, contract, code),
        content_hash(checkpoint, fitted, None, code),
    )


def _model_code() -> dict[str, bytes]:
    # The code that ships with the model (servable.copy_model_code): the model/ package,
    # sources only (bytecode differs between Python builds, not the model).
    import model

    package = Path(model.__file__).parent
    return {
        str(f.relative_to(package.parent)): f.read_bytes() for f in sorted(package.rglob("*.py"))
    }


def _find_identical(client: MlflowClient, name: str, digest: str, run_id: str) -> Any:
    """The version of ``name`` this model already is, or None: the earliest one tagged with
    content ``digest``, else one registered from run ``run_id`` with no content tag (a run
    that stopped between registering and tagging, before registration set the tags itself).

    One MLflow run registers at most one version of one content.
    """
    from mlflow.exceptions import MlflowException

    escaped = name.replace("'", "\\'")
    try:
        versions = client.search_model_versions(f"name = '{escaped}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    same = [v for v in versions if v.tags.get(CONTENT_TAG) == digest] or [
        v for v in versions if v.run_id == run_id and CONTENT_TAG not in v.tags
    ]
    return min(same, key=lambda v: int(v.version)) if same else None


def _identical_record(
    rp: RegisterParams, existing: Any, previous: str | None, cand: Candidate, run_id: str
) -> dict[str, Any]:
    return {
        "model_name": rp.model_name,
        "version": int(existing.version),
        "decision": "identical",
        "reason": (
            f"identical to v{existing.version} (same network weights, preprocessor, "
            f"input contract and model code; content {cand.content_hash[:12]}): "
            "nothing registered, no alias moved"
        ),
        "identical_to": int(existing.version),
        "content_hash": cand.content_hash,
        "metrics": {k: cand.evaluated[k] for k in METRIC_NAMES},
        "baselines": cand.baselines,
        "champion_metrics": None,
        "previous_champion_version": int(previous) if previous is not None else None,
        "run_id": run_id,
    }


def _record_on_version(client: MlflowClient, record: dict[str, Any]) -> None:
    # The whole decision, before any alias moves. A passed gate stays "pending" until the
    # alias has moved (_close_gate): a run stopped in between is resumed, not taken as done.
    # Lineage (run_id, git/dvc/prefect tags) is that of the run that logged the version's
    # files (MLflow's version.run_id), also when a later identical run judges it again: that
    # run is promotion.judged_by_run.
    name, version = record["model_name"], str(record["version"])
    trained_in = client.get_model_version(name, version).run_id or record["run_id"]
    tags = {
        "promotion.decision": record["decision"],
        "promotion.reason": record["reason"],
        "promotion.judged_by_run": record["run_id"],
        **({GATE_TAG: "failed"} if record["gate_failed"] else {}),
        CONTENT_TAG: record["content_hash"],
        NETWORK_TAG: record["network_hash"],
        **{f"metric.{k}": f"{v:.6f}" for k, v in record["metrics"].items()},
        **lineage_from_run(client.get_run(trained_in).data.tags, trained_in),
    }
    if record["previous_champion_version"] is not None:
        tags["promotion.previous_champion_version"] = str(record["previous_champion_version"])
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    judged = "" if trained_in == record["run_id"] else f" Judged by run {record['run_id']}."
    client.update_model_version(
        name,
        version,
        description=(
            f"{record['decision']}: {record['reason']}. Trained in MLflow run {trained_in}.{judged}"
        ),
    )


def _check_serving(uri: str, rp: RegisterParams, decision: Decision) -> Decision:
    from serving.check import check_servable

    check = check_servable(uri, rp.max_latency_ms, key_env=rp.signing_key_env)
    if not check.passed:  # a gate failure: recorded on the version, then GateError
        return Decision(
            False, f"{check.describe()} (on its metrics alone: {decision.reason})", True
        )
    return Decision(True, f"{decision.reason}; {check.describe()}", False)


def _new_rules_on_a_tie(
    client: MlflowClient,
    rp: RegisterParams,
    previous: str | None,
    cand: Candidate,
    decision: Decision,
) -> Decision:
    # A tie with the champion's own network (weights, preprocessor, code) whose contract has
    # other row rules (an edited suite: a widened range...) promotes: else they never serve.
    from model.contract import model_contract, rule_differences

    if (
        previous is None
        or not decision.reason.startswith("tie:")
        or cand.network_hash
        != client.get_model_version(rp.model_name, previous).tags.get(NETWORK_TAG)
    ):
        return decision
    rules = rule_differences(model_contract(f"models:/{rp.model_name}/{previous}"), cand.contract)
    if not rules:
        return decision
    return Decision(
        True,
        f"same network as v{previous}, new input contract rules "
        f"({one_line('; '.join(rules), MAX_REASON // 2)}): a tie on "
        f"{rp.compare_metric}, promoted so that the service takes the "
        "reviewed rules",
        False,
    )


def _judge_version(
    client: MlflowClient, rp: RegisterParams, version: str, previous: str | None, cand: Candidate
) -> tuple[Decision, dict[str, Any]]:
    # Both models are scored the same way: loaded from the registry, raw test rows in.
    candidate = score_model(
        f"models:/{rp.model_name}/{version}",
        cand.test,
        cand.preprocessor.target,
        cand.preprocessor.classes,
        rp.signing_key_env,
    )
    _warn_if_skewed(candidate, cand.evaluated)
    recorded = client.get_model_version(rp.model_name, version).tags.get("promotion.decision")
    if previous == version and recorded == "promoted":  # a run stopped after moving the alias
        champion, context = None, f"champion v{previous}"  # here: nothing to compare
        decision = Decision(
            True,
            "already the champion (a run that stopped had moved the "
            "alias to it); not compared with itself",
            False,
        )
    else:  # (champion by a rollback or by hand, never passed: the gate alone judges it)
        rival = None if previous == version else previous
        champion, context, refused = _compare_with_champion(rp, rival, cand)
        if previous == version:
            context = f"champion v{version}, moved there outside register, not compared"
        decision = (
            Decision(False, refused, True)
            if refused is not None
            else _new_rules_on_a_tie(
                client, rp, rival, cand, decide_promotion(candidate, champion, rp, cand.baselines)
            )
        )
        if decision.promote:  # the alias only moves to a version the service can answer with
            decision = _check_serving(f"models:/{rp.model_name}/{version}", rp, decision)
    return decision, {
        "model_name": rp.model_name,
        "version": int(version),
        "decision": "promoted" if decision.promote else "challenger",
        "reason": one_line(f"{context}: {decision.reason}"),
        "metrics": candidate,
        "baselines": cand.baselines,
        "champion_metrics": champion,
        "previous_champion_version": int(previous) if previous is not None else None,
        "gate_failed": decision.gate_failed,
        "content_hash": cand.content_hash,
        "network_hash": cand.network_hash,
    }


def _register_version(rp: RegisterParams, model_uri: str, cand: Candidate) -> str:
    # The version and the tags that make it findable in one call (one transaction): a retry
    # after a stop from here on finds it (_find_identical) and resumes it, never duplicates.
    import mlflow

    version = mlflow.register_model(
        model_uri,
        rp.model_name,
        tags={CONTENT_TAG: cand.content_hash, NETWORK_TAG: cand.network_hash, GATE_TAG: "pending"},
    )
    return str(version.version)


def _move_alias(
    client: MlflowClient, rp: RegisterParams, decision: Decision, record: dict[str, Any]
) -> None:
    # Once per decision, after it is recorded on the version; logged in the alias history.
    # The decision was made against the champion read at the start (previous): if a rollback
    # (or a hand move) changed it meanwhile, nothing moves (registry.AliasMovedError) and the
    # version stays pending; a re-run decides against the current champion.
    previous = record["previous_champion_version"]
    previous = None if previous is None else str(previous)
    if decision.promote:
        registry.move_alias(
            client,
            rp.model_name,
            rp.alias,
            record["version"],
            record["reason"],
            caused_by_run=record["run_id"],
            kind="register",
            expect_from=previous,
        )
        return
    registry.check_holder(client, rp.model_name, rp.alias, previous)
    registry.move_alias(
        client,
        rp.model_name,
        rp.challenger_alias,
        record["version"],
        record["reason"],
        caused_by_run=record["run_id"],
        kind="register",
    )


def _mark_stale(
    client: MlflowClient, rp: RegisterParams, version: str, exc: registry.AliasMovedError
) -> None:
    # The decision recorded on the version was made against a champion that no longer is:
    # it is not one any more (the gate stays open, so the next run judges it again).
    client.set_model_version_tag(rp.model_name, version, "promotion.decision", "undecided")
    client.set_model_version_tag(
        rp.model_name, version, "promotion.reason", one_line(f"not decided: {exc}")
    )
    gate = client.get_model_version(rp.model_name, version).tags.get(GATE_TAG, "pending")
    exc.args = (f"{exc} ({rp.model_name} v{version} left {GATE_TAG}={gate}, not {rp.alias})",)


def _close_gate(client: MlflowClient, rp: RegisterParams, version: str, decision: Decision) -> None:
    # The last write: the version is decided (an identical model later is "identical").
    client.set_model_version_tag(
        rp.model_name, version, GATE_TAG, "failed" if decision.gate_failed else "passed"
    )


def run(
    features_dir: str | Path,
    model_dir: str | Path,
    metrics_path: str | Path,
    out_path: str | Path,
    params: Params,
    params_file: str | Path | None = None,
) -> dict[str, Any]:
    """Log + register the servable model, run the model gate, move the alias, record why.

    ``params_file``: the file ``params`` came from; if it changed (in the params register
    depends on) since the stage read it, the stage refuses before the alias moves.

    Returns:
        The registration record (also written to ``out_path``); ``decision`` is
        ``promoted``, ``challenger`` or ``identical`` (nothing registered).

    Raises:
        GateError: the gate failed (baselines, thresholds, another input schema, serving
            check); the version is registered, tagged and aliased ``challenger`` and
            ``out_path`` written first; the champion is untouched.
    """
    import mlflow
    from mlflow import MlflowClient

    from model import artifacts
    from model.servable import log_servable, produced_files
    from model.variants import log_variants

    rp = params.register
    check_register_params(rp)
    cand = _read_inputs(Path(features_dir), Path(model_dir), Path(metrics_path), params)
    # The outputs this run produced, hashed from disk now that DVC has locked train and
    # evaluate (train's start-time tags name only its inputs): on the run, and through
    # lineage_from_run on the version. A mismatch with dvc.lock stops here, before any write.
    produced = tracking.produced_output_tags(cand.model_dir)
    with tracking.resume_run(cand.model_dir, params.mlflow) as active:
        client, run_id = MlflowClient(), active.info.run_id
        mlflow.set_tags(produced)
        previous = _champion_version(client, rp.model_name, rp.alias)
        existing = _find_identical(client, rp.model_name, cand.content_hash, run_id)
        if existing is not None and existing.tags.get(GATE_TAG) == "passed":
            return _finish_identical(rp, existing, previous, cand, run_id, out_path)
        uploaded = None  # the files this run uploads, hashed locally first
        if existing is not None:  # the same model failed the gate (or a stopped run left it
            version = str(existing.version)  # undecided): judge it again; no new version
        else:
            preprocessor_path = cand.features_dir / PREPROCESSOR_FILE
            # What is uploaded, hashed here first: the store's copy must match it (below).
            uploaded = produced_files(
                preprocessor_path, cand.model_dir / NETWORK_FILE, cand.contract
            )
            info = log_servable(
                preprocessor_path,
                cand.model_dir / NETWORK_FILE,
                cand.test.head(5),
                contract=cand.contract,
            )
            # ONNX + int8 copies beside it, scored on the same test rows (variants/ in the run).
            log_variants(preprocessor_path, cand.model_dir / NETWORK_FILE, cand.test)
            version = _register_version(rp, info.model_uri, cand)
        # Every stored file's sha256 (signed when a key is set) on the version, before anything
        # of it is loaded; a version this run registered before it stopped is recorded now,
        # one that recorded hashes is checked against them (model.artifacts).
        artifacts.record_version(
            client, rp.model_name, version, rp.signing_key_env, only_run=run_id, produced=uploaded
        )
        decision, record = _judge_version(client, rp, version, previous, cand)
        if existing is not None:
            record["identical_to"] = int(version)
            before = {
                "failed": "failed the gate before",
                "pending": "was left undecided by a run that stopped before",
            }.get(existing.tags.get(GATE_TAG), "was not decided before")
            if CONTENT_TAG not in existing.tags:
                before = "this run had registered when it stopped"
            record["reason"] = one_line(
                f"identical to v{version}, which {before}; judged again: {record['reason']}"
            )
        record["run_id"] = run_id
        # In this order: the whole decision on the version, the alias (once), the gate closed.
        _record_on_version(client, record)
        if params_file is not None:  # params.yaml edited during register: refuse, alias unmoved
            integrity.snapshot_for(params_file).check_unchanged("register")
        try:
            _move_alias(client, rp, decision, record)
        except registry.AliasMovedError as exc:  # decided against a champion rolled back
            _mark_stale(client, rp, version, exc)  # meanwhile: pending, not champion
            raise
        _close_gate(client, rp, version, decision)
        mlflow.set_tags(
            {
                "registered.model": rp.model_name,
                "registered.version": version,
                "promotion.decision": record["decision"],
            }
        )
    write_json(out_path, record)
    logger.info("%s v%s %s: %s", rp.model_name, version, record["decision"], record["reason"])
    if decision.gate_failed:
        raise GateError(
            f"model gate: {rp.model_name} v{version} {one_line(decision.reason)} "
            f"(marked {rp.challenger_alias}; champion unchanged)"
        )
    return record


def _finish_identical(
    rp: RegisterParams,
    existing: Any,
    previous: str | None,
    cand: Candidate,
    run_id: str,
    out_path: str | Path,
) -> dict[str, Any]:
    import mlflow

    record = _identical_record(rp, existing, previous, cand, run_id)
    mlflow.set_tags(
        {
            "registered.model": rp.model_name,
            "registered.identical_to": str(existing.version),
            "promotion.decision": "identical",
        }
    )
    write_json(out_path, record)
    logger.info("%s: %s", rp.model_name, record["reason"])
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stages.register --features DIR --model DIR --metrics FILE --out FILE``."""
    parser = build_parser("register", "Register the model; promote it if it passes the gate.")
    parser.add_argument("--features", required=True, help="features dir (test split)")
    parser.add_argument("--model", required=True, help="model dir (model.pt, run.json)")
    parser.add_argument("--metrics", required=True, help="metrics JSON from evaluate")
    parser.add_argument("--out", required=True, help="registration record JSON")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.features, args.model, args.metrics, args.out, params, args.params)

    return run_main("register", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
