"""Registering the compact model: the compress stage's chosen candidate (``compact/report.json``
``chosen``), a smaller copy of the judged model that passed the compression gate, registered as
a version of the same model beside its parent and aliased ``compress.alias``
(``champion-compact``), so a service started with ``--alias champion-compact`` serves it.

When: only when the report chose a candidate made from this parent (the report's parent
sha256 is the judged file's) and the parent ends this run champion (promoted, or identical to
the champion). A compact of a challenger is not registered: the alias promises the champion's
smaller copy. Registration record: ``"compact": {"status": "not_registered", "reason": ...}``.
Whenever no compact of this run is aliased, the alias follows the champion
(:mod:`stages.register.compact_alias`): to the champion's own compact (an identical re-run's,
tag ``compact.version``), else deleted (audited); the record's ``alias_change`` says which.

How: the compact file is logged as a pyfunc under the name ``compact`` in a child run of the
parent's run, carrying its lineage (:mod:`stages.register.compact_run`: the parent's params
would otherwise become the compact logged model's), registered with its content hash
(``stages.register.content``; an ONNX model: its graph and architecture, not its meta), its
artifact hashes recorded (``manifest.record_version``), and checked the way the service loads
it (``serving.check``) before the alias moves through ``stages.register.registry`` (the
audit log). Tags: on the compact ``compact.parent_version``, ``compact.method``,
``compact.gate`` (the compression gate's reason), ``compact.metrics`` (the gate's figures,
JSON); on the parent ``compact.version``.

Idempotent by content hash: a re-run finds the compact version it registered (tag
``model.content_hash``) and registers nothing; the alias stays (moved back to it only if
something else took it meanwhile). A version whose serving check failed is checked again.

A compact that fails the serving check is recorded (``promotion.gate: failed``, the reason in
``compact.serving``), not aliased, and the stage goes on with a warning (so does one that
cannot be logged at all: ``status: failed``): the compact is an optional, smaller copy of a
parent that did pass, and its alias has moved by then, so failing the stage would leave that
champion looking failed, its record unwritten, and stop ``dvc repro`` over an optimisation.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from model.files import PREPROCESSOR_FILE
from stages.common.config import Params
from stages.register import registry
from stages.register.candidate import Candidate
from stages.register.compact_alias import LINK_TAG, PARENT_TAG, follow_champion
from stages.register.compact_report import Compact
from stages.register.compact_run import compact_run, recorded_run
from stages.register.content import content_hash, model_checkpoint, model_code
from stages.register.gate import one_line
from stages.register.versions import CONTENT_TAG, GATE_TAG, champion_version, lineage_from_run

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

LOGGED_NAME = "compact"  # the logged model's name in its child run (the parent's: "model")
METHOD_TAG = "compact.method"  # prune | quantize | distill
GATE_REASON_TAG = "compact.gate"  # the compression gate's reason
METRICS_TAG = "compact.metrics"  # the gate's figures (metric, drop, speedup, size ratio), JSON
SERVING_TAG = "compact.serving"  # the serving check's result


def register_compact(
    client: MlflowClient,
    params: Params,
    cand: Candidate,
    found: tuple[Compact | None, str],
    parent: str,
    run_id: str,
) -> dict[str, Any]:
    """Register (or find again) the compact model of parent version ``parent`` and move
    ``compress.alias`` to it; else make the alias follow the champion (its compact, or
    deleted). The ``compact`` part of the registration record. Never raises for the compact
    model: the parent's alias has moved already, and its record must be written (a failure is
    ``status: failed``, with a warning)."""
    compact, why = found
    try:
        record = (
            _register(client, params, cand, compact, parent, run_id)
            if compact is not None
            else _not_registered(why)
        )
    except Exception as exc:  # noqa: BLE001 - optional: the parent's decision stands
        reason = one_line(f"{type(exc).__name__}: {exc}")
        logger.warning(
            "compact model of v%s not registered: %s; the parent's decision stands", parent, reason
        )
        record = {"status": "failed", "reason": reason}
    if record["status"] in ("registered", "identical"):
        return record
    return record | _follow(client, params, run_id)


def _follow(client: MlflowClient, params: Params, run_id: str) -> dict[str, Any]:
    # No compact of this run is aliased: the alias names the champion's compact, or nothing.
    rp, alias = params.register, params.compress.alias
    try:
        champion = champion_version(client, rp.model_name, rp.alias)
        followed = follow_champion(
            client, rp.model_name, alias, champion, kind="register", caused_by_run=run_id
        )
    except Exception as exc:  # noqa: BLE001 - said loudly; the parent's decision stands
        note = one_line(f"{alias} could not follow {rp.alias}: {type(exc).__name__}: {exc}")
        logger.warning("%s", note)
        return {"alias_error": note}
    if followed.move is None:  # already right
        return {}
    note = one_line(followed.describe())
    logger.warning("%s", note)  # a service following the alias notices
    return {"alias_change": note}


def _register(
    client: MlflowClient,
    params: Params,
    cand: Candidate,
    compact: Compact,
    parent: str,
    run_id: str,
) -> dict[str, Any]:
    rp, alias = params.register, params.compress.alias
    holder = champion_version(client, rp.model_name, rp.alias)
    if holder != parent:
        return _not_registered(
            f"its parent v{parent} is not {rp.alias} (v{holder} is)"
            if holder
            else f"its parent v{parent} is not {rp.alias}"
        )
    fitted = (cand.features_dir / PREPROCESSOR_FILE).read_bytes()
    digest = content_hash(model_checkpoint(compact.path), fitted, cand.contract, model_code())
    base = {"method": compact.method, "alias": alias, "content_hash": digest, "gate": compact.gate}
    existing = _find(client, rp.model_name, digest)
    if existing is not None and existing.tags.get(GATE_TAG) == "passed":
        version = str(existing.version)
        moved = _move(client, rp.model_name, alias, version, parent, compact, run_id)
        if moved:  # (e.g. the parent was champion again after a rollback)
            _link(client, rp.model_name, version, parent, compact, run_id)
        return {
            **base,
            "status": "identical",
            "version": int(version),
            "reason": f"identical to v{version} (content {digest[:12]}): nothing registered; "
            + (f"{alias} moved back to it" if moved else f"{alias} stays on it"),
        }
    uploaded = None
    if existing is None:
        version, uploaded, child = _log_and_register(client, params, cand, compact, digest, parent)
    else:  # its serving check failed (or a stopped run left it pending): checked again
        version, child = str(existing.version), recorded_run(client, existing, run_id)
    from serving.check import check_servable
    from stages.register.manifest import record_version

    record_version(
        client,
        rp.model_name,
        version,
        rp.signing_key_env,
        only_run=child,
        produced=uploaded,
        variants={},  # the run's variants are export's copies of train's model, not of this
    )
    _link(client, rp.model_name, version, parent, compact, run_id)
    check = check_servable(
        f"models:/{rp.model_name}/{version}", rp.max_latency_ms, key_env=rp.signing_key_env
    )
    client.set_model_version_tag(rp.model_name, version, SERVING_TAG, one_line(check.describe()))
    if not check.passed:
        client.set_model_version_tag(rp.model_name, version, GATE_TAG, "failed")
        logger.warning(
            "compact %s v%s (%s of v%s) not aliased %s: %s; the parent's decision stands",
            rp.model_name,
            version,
            compact.method,
            parent,
            alias,
            check.describe(),
        )
        return {
            **base,
            "status": "failed_serving_check",
            "version": int(version),
            "reason": one_line(f"not aliased {alias}: {check.describe()}"),
        }
    _move(client, rp.model_name, alias, version, parent, compact, run_id)
    client.set_model_version_tag(rp.model_name, version, GATE_TAG, "passed")
    return {
        **base,
        "status": "registered",
        "version": int(version),
        "reason": one_line(f"{compact.method} of v{parent}: {compact.gate}; {check.describe()}"),
    }


def _not_registered(why: str) -> dict[str, Any]:
    reason = one_line(f"compact model not registered: {why}")
    logger.info("%s", reason)
    return {"status": "not_registered", "reason": reason}


def _find(client: MlflowClient, name: str, digest: str) -> Any:
    # The earliest version holding this content (register's own versions are found by the
    # same tag; a compact's content differs from every parent's).
    escaped = name.replace("'", "\\'")
    same = [
        v
        for v in client.search_model_versions(f"name = '{escaped}'")
        if v.tags.get(CONTENT_TAG) == digest
    ]
    return min(same, key=lambda v: int(v.version)) if same else None


def _log_and_register(
    client: MlflowClient,
    params: Params,
    cand: Candidate,
    compact: Compact,
    digest: str,
    parent: str,
) -> tuple[str, dict[str, str], str]:
    # Logged in a child run of the parent's (the active run), registered with its content hash
    # in one call (a retry finds it by that hash and resumes it): (version, uploaded, child).
    import mlflow

    from model.servable import log_servable, produced_files

    preprocessor = cand.features_dir / PREPROCESSOR_FILE
    uploaded = produced_files(preprocessor, compact.path, cand.contract)
    with compact_run(client, LOGGED_NAME, compact.metrics) as child:
        info = log_servable(
            preprocessor, compact.path, cand.test.head(5), contract=cand.contract, name=LOGGED_NAME
        )
        version = mlflow.register_model(
            info.model_uri,
            params.register.model_name,
            tags={
                CONTENT_TAG: digest,
                GATE_TAG: "pending",
                PARENT_TAG: parent,
                METHOD_TAG: compact.method,
                GATE_REASON_TAG: compact.gate,
                METRICS_TAG: json.dumps(compact.metrics, sort_keys=True, separators=(",", ":")),
            },
        )
    logger.info(
        "compact %s v%s: %s of v%s (%s)",
        params.register.model_name,
        version.version,
        compact.method,
        parent,
        compact.path.name,
    )
    return str(version.version), uploaded, child


def _link(
    client: MlflowClient, name: str, version: str, parent: str, compact: Compact, run_id: str
) -> None:
    # Both ways: the compact names its parent, the parent its compact; lineage from its child
    # run (the parent's lineage tags, copied there).
    trained_in = client.get_model_version(name, version).run_id or run_id
    tags = {
        PARENT_TAG: parent,
        METHOD_TAG: compact.method,
        **lineage_from_run(client.get_run(trained_in).data.tags, trained_in),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, parent, LINK_TAG, version)
    client.update_model_version(
        name,
        version,
        description=one_line(f"compact ({compact.method}) of v{parent}: {compact.gate}"),
    )


def _move(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    parent: str,
    compact: Compact,
    run_id: str,
) -> bool:
    # Through the registry (the audit log); False when the alias already held it.
    if registry.current_holder(client, name, alias) == version:
        return False
    registry.move_alias(
        client,
        name,
        alias,
        version,
        f"compact ({compact.method}) of champion v{parent}: {compact.gate}",
        caused_by_run=run_id,
        kind="register",
    )
    return True
