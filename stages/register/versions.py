"""Register's versions in the MLflow registry: found by what the model is, created with the
tags that make them findable, the decision recorded on them, the alias moved, the gate closed.

Idempotent: a version is created with its content hash and ``promotion.gate: pending`` in one
call (:func:`register_version`) and found again by that hash, or, untagged, by its MLflow run
(:func:`find_identical`), so a retry resumes it instead of adding one. The decision is written
on the version first (:func:`record_on_version`), then the alias moves once
(:func:`move_alias`, through ``stages.register.registry``), then the gate closes
(:func:`close_gate`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.metrics import METRIC_NAMES
from stages.common.config import RegisterParams
from stages.common.io import write_json
from stages.register import registry
from stages.register.candidate import Candidate
from stages.register.gate import Decision, one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

LINEAGE_PREFIXES = ("git.", "dvc.", "prefect.")  # run tags copied onto the model version
CONTENT_TAG = "model.content_hash"  # on each version: what the model is (see content_hash)
NETWORK_TAG = "model.network_hash"  # the same without the input contract
GATE_TAG = registry.GATE_TAG  # passed | failed | pending: an identical model not yet passed
#   (failed, or the run died between registering and moving the alias) is judged again


def lineage_from_run(run_tags: dict[str, str], run_id: str) -> dict[str, str]:
    """The run's lineage tags (git, dvc, prefect) plus its id, to copy onto the version."""
    tags = {k: v for k, v in run_tags.items() if k.startswith(LINEAGE_PREFIXES)}
    return {**tags, "run_id": run_id}


# --- I/O ----------------------------------------------------------------------------------


def champion_version(client: MlflowClient, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)  # an int from some stores
    return None if version is None else str(version)


def find_identical(client: MlflowClient, name: str, digest: str, run_id: str) -> Any:
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


def identical_record(
    rp: RegisterParams, existing: Any, previous: str | None, cand: Candidate, run_id: str
) -> dict[str, Any]:
    weights = "ensemble spec and members" if cand.is_ensemble else "network weights"
    return {
        "model_name": rp.model_name,
        "version": int(existing.version),
        "decision": "identical",
        "reason": (
            f"identical to v{existing.version} (same {weights}, preprocessor, "
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


def record_on_version(client: MlflowClient, record: dict[str, Any]) -> None:
    # The whole decision, before any alias moves. A passed gate stays "pending" until the
    # alias has moved (close_gate): a run stopped in between is resumed, not taken as done.
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


def register_version(rp: RegisterParams, model_uri: str, cand: Candidate) -> str:
    # The version and the tags that make it findable in one call (one transaction): a retry
    # after a stop from here on finds it (find_identical) and resumes it, never duplicates.
    import mlflow

    version = mlflow.register_model(
        model_uri,
        rp.model_name,
        tags={
            CONTENT_TAG: cand.content_hash,
            NETWORK_TAG: cand.network_hash,
            GATE_TAG: "pending",
            **cand.tags,  # an ensemble's members and method
        },
    )
    return str(version.version)


def move_alias(
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


def mark_stale(
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


def close_gate(client: MlflowClient, rp: RegisterParams, version: str, decision: Decision) -> None:
    # The last write: the version is decided (an identical model later is "identical").
    client.set_model_version_tag(
        rp.model_name, version, GATE_TAG, "failed" if decision.gate_failed else "passed"
    )


def judged_again(existing: Any, version: str, reason: str) -> str:
    """The reason of an identical model that had not passed the gate, judged again."""
    before = {
        "failed": "failed the gate before",
        "pending": "was left undecided by a run that stopped before",
    }.get(existing.tags.get(GATE_TAG), "was not decided before")
    if CONTENT_TAG not in existing.tags:
        before = "this run had registered when it stopped"
    return one_line(f"identical to v{version}, which {before}; judged again: {reason}")


def finish_identical(
    rp: RegisterParams,
    existing: Any,
    previous: str | None,
    cand: Candidate,
    run_id: str,
    out_path: str | Path,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Record an identical model that passed before (``extra``: the compact, the variants
    note), write the record; nothing registered, no alias moved."""
    import mlflow

    record = identical_record(rp, existing, previous, cand, run_id) | extra
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
