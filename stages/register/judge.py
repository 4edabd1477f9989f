"""Judge a registered version: score it and the champion on the same raw test rows through
their own pyfuncs, refuse a champion with another input schema (or damaged files), apply the
gate (:mod:`stages.register.gate`), and check that the service can answer with it before the
alias moves."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from model.artifacts import ArtifactIntegrityError
from model.metrics import METRIC_NAMES
from stages.common.config import RegisterParams
from stages.register.candidate import Candidate, score_model
from stages.register.gate import MAX_REASON, Decision, decide_promotion, one_line
from stages.register.versions import NETWORK_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

SKEW_TOLERANCE = 1e-4  # pyfunc vs evaluate metrics: a larger gap means serving skew
# a file named in an ArtifactIntegrityError ("model/<path> expected sha256 ...", "... missing")
_FAILED_FILE = re.compile(
    r"\b((?:model|variants)/[^\s;]+) (?:expected sha256|missing|not recorded)"
)

Comparison = tuple[dict[str, float] | None, str, str | None]  # (champion metrics, context, refusal)


def _schema_refusal(rp: RegisterParams, previous: str, cand: Candidate) -> Comparison | None:
    """None when the candidate's input contract matches the champion's, else the comparison
    that is not made (refused, or allowed by ``register.allow_schema_change``)."""
    from model.contract import contract_differences, model_contract

    uri = f"models:/{rp.model_name}@{rp.alias}"
    try:
        differences = contract_differences(model_contract(uri), cand.contract)
    except Exception as exc:  # noqa: BLE001 - an unreadable champion cannot be compared
        logger.warning("champion v%s: cannot read its input contract: %s", previous, exc)
        differences = [f"its input contract could not be read ({type(exc).__name__}: {exc})"]
    if not differences:
        return None
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


def _score_champion(rp: RegisterParams, previous: str, cand: Candidate) -> Comparison:
    uri = f"models:/{rp.model_name}@{rp.alias}"
    try:
        metrics = score_model(
            uri, cand.test, cand.preprocessor.target, cand.preprocessor.classes, rp.signing_key_env
        )
    except ArtifactIntegrityError as exc:  # not a schema question: the registry needs repair
        logger.error("champion v%s fails its artifact verification: %s", previous, exc)
        return (
            None,
            f"champion v{previous}",
            champion_fails_verification(rp.model_name, previous, exc),
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


def compare_with_champion(rp: RegisterParams, previous: str | None, cand: Candidate) -> Comparison:
    """(champion metrics or None, context for the reason, why the gate refuses or None)."""
    if previous is None:
        return None, "first model", None
    return _schema_refusal(rp, previous, cand) or _score_champion(rp, previous, cand)


def champion_fails_verification(name: str, previous: str, exc: Exception) -> str:
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


def warn_if_skewed(served: dict[str, float], evaluated: dict[str, float]) -> None:
    gaps = {k: abs(served[k] - evaluated[k]) for k in METRIC_NAMES}
    if max(gaps.values()) > SKEW_TOLERANCE:
        logger.warning(
            "served model and evaluate stage disagree on the test metrics "
            "(serving skew?): served %s, evaluated %s",
            served,
            evaluated,
        )


def check_serving(uri: str, rp: RegisterParams, decision: Decision) -> Decision:
    from serving.check import check_servable

    check = check_servable(uri, rp.max_latency_ms, key_env=rp.signing_key_env)
    if not check.passed:  # a gate failure: recorded on the version, then GateError
        return Decision(
            False, f"{check.describe()} (on its metrics alone: {decision.reason})", True
        )
    return Decision(True, f"{decision.reason}; {check.describe()}", False)


def new_rules_on_a_tie(
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


def _decide(
    client: MlflowClient,
    rp: RegisterParams,
    version: str,
    previous: str | None,
    cand: Candidate,
    candidate: dict[str, float],
) -> tuple[Decision, dict[str, float] | None, str]:
    """(decision, champion metrics or None, context for the reason)."""
    recorded = client.get_model_version(rp.model_name, version).tags.get("promotion.decision")
    if previous == version and recorded == "promoted":  # a run stopped after moving the alias
        return (  # here: nothing to compare
            Decision(
                True,
                "already the champion (a run that stopped had moved the "
                "alias to it); not compared with itself",
                False,
            ),
            None,
            f"champion v{previous}",
        )
    # (champion by a rollback or by hand, never passed: the gate alone judges it)
    rival = None if previous == version else previous
    champion, context, refused = compare_with_champion(rp, rival, cand)
    if previous == version:
        context = f"champion v{version}, moved there outside register, not compared"
    if refused is not None:
        return Decision(False, refused, True), champion, context
    decision = new_rules_on_a_tie(
        client, rp, rival, cand, decide_promotion(candidate, champion, rp, cand.baselines)
    )
    if decision.promote:  # the alias only moves to a version the service can answer with
        decision = check_serving(f"models:/{rp.model_name}/{version}", rp, decision)
    return decision, champion, context


def judge_version(
    client: MlflowClient, rp: RegisterParams, version: str, previous: str | None, cand: Candidate
) -> tuple[Decision, dict[str, Any]]:
    """Score ``version`` and decide on it; the decision and the registration record."""
    # Both models are scored the same way: loaded from the registry, raw test rows in.
    candidate = score_model(
        f"models:/{rp.model_name}/{version}",
        cand.test,
        cand.preprocessor.target,
        cand.preprocessor.classes,
        rp.signing_key_env,
    )
    warn_if_skewed(candidate, cand.evaluated)
    decision, champion, context = _decide(client, rp, version, previous, cand, candidate)
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
