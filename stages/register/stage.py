"""Register stage: log the servable model, register a version, and run the model gate.

Register decides and records, nothing else: the ONNX/int8 variants are built by the export
stage, which runs before it and logs them to the same MLflow run; their hashes join the
version's artifact manifest here when export's report vouches for them. The modules: ``gate``
(the decision, pure), ``judge`` (scoring the candidate and the champion, the serving check),
``versions`` (finding, creating, tagging versions; the alias), ``candidate`` (what is judged),
``content`` (its content hash), ``contract`` (the input contract from the reviewed suite),
``exported`` (export's report), ``manifest`` (recording and signing the version's artifact
hashes), ``registry`` (alias moves and their history, also used by ``flows.rollback``),
``compact`` (the compress stage's model, registered beside a champion); this one wires them.

The candidate is the judged model (``stages.common.judged``): the ensemble stage's
``model.ensemble.zip`` when it built one (ONE version, tagged ``ensemble.members`` and
``ensemble.method``; export's variants, copies of train's single model, are not attached to
it), else train's model file.

The gate, in order (both models scored through their own pyfunc on the same raw test split):

1. Identical model: when a version of ``register.model_name`` already holds the same content
   (network weights and architecture, or an ensemble's spec and each member's; fitted
   preprocessor, input contract, model code; tag
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
``stages.register.registry`` (which logs the move in the alias history); then the gate tag
becomes ``passed`` (or ``failed``). A run stopped anywhere before that leaves the version
``pending`` (or ``failed``) and, unless the alias had already moved, not champion.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.files import PREPROCESSOR_FILE
from stages.common import integrity, tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, RegisterParams
from stages.common.errors import GateError
from stages.common.io import write_json
from stages.register import registry
from stages.register.candidate import Candidate, read_inputs
from stages.register.compact import register_compact
from stages.register.compact_report import Compact, read_compact
from stages.register.content import VARIANTS_NOT_ATTACHED
from stages.register.exported import read_export_report
from stages.register.gate import Decision, one_line
from stages.register.judge import judge_version
from stages.register.manifest import record_version
from stages.register.versions import (
    GATE_TAG,
    champion_version,
    close_gate,
    find_identical,
    finish_identical,
    judged_again,
    mark_stale,
    move_alias,
    record_on_version,
    register_version,
)

if TYPE_CHECKING:
    import argparse

    from mlflow import MlflowClient

logger = logging.getLogger(__name__)


def _log_and_register(rp: RegisterParams, cand: Candidate) -> tuple[str, dict[str, str]]:
    """Log the pyfunc to the active run and register it: (version, the files uploaded,
    hashed locally first: the store's copy must match)."""
    from model.servable import log_servable, produced_files

    preprocessor_path = cand.features_dir / PREPROCESSOR_FILE
    trained = cand.model_file  # model.pt, model.skops (gbdt) or model.ensemble.zip
    uploaded = produced_files(preprocessor_path, trained, cand.contract)
    info = log_servable(preprocessor_path, trained, cand.test.head(5), contract=cand.contract)
    return register_version(rp, info.model_uri, cand), uploaded


def _record_and_move(
    client: MlflowClient,
    rp: RegisterParams,
    decision: Decision,
    record: dict[str, Any],
    params_file: str | Path | None,
) -> None:
    # In this order: the whole decision on the version, the alias (once), the gate closed.
    version = str(record["version"])
    record_on_version(client, record)
    if params_file is not None:  # params.yaml edited during register: refuse, alias unmoved
        integrity.snapshot_for(params_file).check_unchanged("register")
    try:
        move_alias(client, rp, decision, record)
    except registry.AliasMovedError as exc:  # decided against a champion rolled back
        mark_stale(client, rp, version, exc)  # meanwhile: pending, not champion
        raise
    close_gate(client, rp, version, decision)


def run(
    features_dir: str | Path,
    model_dir: str | Path,
    metrics_path: str | Path,
    out_path: str | Path,
    params: Params,
    params_file: str | Path | None = None,
    export_path: str | Path | None = None,
    ensemble_path: str | Path | None = None,
    compact_path: str | Path | None = None,
) -> dict[str, Any]:
    """Log + register the servable model, run the model gate, move the alias, record why.

    ``params_file``: the file ``params`` came from; if it changed (in the params register
    depends on) since the stage read it, the stage refuses before the alias moves.
    ``export_path``: the export stage's report (the variants it logged to the model's run).
    ``ensemble_path``: the ensemble stage's folder: its model is the candidate when it built
    one (export's variants, of train's model, are then not attached). ``compact_path``: the
    compress stage's folder: its chosen model is registered beside a champion
    (:mod:`stages.register.compact`). None: train's model, no compact.

    Returns:
        The registration record (also written to ``out_path``); ``decision`` is
        ``promoted``, ``challenger`` or ``identical`` (nothing registered); ``compact`` (with
        ``compact_path``): what became of the compact model.

    Raises:
        GateError: the gate failed (baselines, thresholds, another input schema, serving
            check); the version is registered, tagged and aliased ``challenger`` and
            ``out_path`` written first; the champion is untouched.
    """
    import mlflow
    from mlflow import MlflowClient

    rp = params.register
    ensemble_dir = None if ensemble_path is None else Path(ensemble_path)
    cand = read_inputs(
        Path(features_dir), Path(model_dir), Path(metrics_path), params, ensemble_dir
    )
    exported = read_export_report(export_path, cand.model_dir)
    if cand.is_ensemble:  # export converts train's single model; the ensemble is another one
        exported = {}
    compact = None if compact_path is None else read_compact(Path(compact_path), cand.model_file)
    # The outputs this run produced, hashed from disk now that DVC has locked train, evaluate
    # and export (train's start-time tags name only its inputs): on the run, and through
    # lineage_from_run on the version. A mismatch with dvc.lock stops here, before any write.
    produced = tracking.produced_output_tags(cand.model_dir)
    with tracking.resume_run(cand.model_dir, params.mlflow) as active:
        client, run_id = MlflowClient(), active.info.run_id
        mlflow.set_tags(produced)
        previous = champion_version(client, rp.model_name, rp.alias)
        existing = find_identical(client, rp.model_name, cand.content_hash, run_id)
        if existing is not None and existing.tags.get(GATE_TAG) == "passed":
            extra = _extras(client, params, cand, compact, str(existing.version), run_id)
            return finish_identical(rp, existing, previous, cand, run_id, out_path, extra)
        uploaded = None  # the files this run uploads, hashed locally first
        if existing is not None:  # the same model failed the gate (or a stopped run left it
            version = str(existing.version)  # undecided): judge it again; no new version
        else:
            version, uploaded = _log_and_register(rp, cand)
        # Every stored file's sha256 (signed when a key is set) on the version, before anything
        # of it is loaded: the model, and the run's variants/ when export's report vouches for
        # them (the same hashes); a version this run registered before it stopped is recorded
        # now, one that recorded hashes is checked against them.
        record_version(
            client,
            rp.model_name,
            version,
            rp.signing_key_env,
            only_run=run_id,
            produced=uploaded,
            variants=exported,
        )
        decision, record = judge_version(client, rp, version, previous, cand)
        if existing is not None:
            record["identical_to"] = int(version)
            record["reason"] = judged_again(existing, version, record["reason"])
        record["run_id"] = run_id
        _record_and_move(client, rp, decision, record, params_file)
        record |= _extras(client, params, cand, compact, version, run_id)
        mlflow.set_tags(
            {
                "registered.model": rp.model_name,
                "registered.version": version,
                "promotion.decision": record["decision"],
            }
        )
    return _finish(rp, decision, record, out_path)


def _extras(
    client: MlflowClient,
    params: Params,
    cand: Candidate,
    compact: tuple[Compact | None, str] | None,
    version: str,
    run_id: str,
) -> dict[str, Any]:
    # What the record says beyond the decision: why an ensemble has no export variants, and
    # the compact model (registered only beside a champion: after the alias moved).
    extra: dict[str, Any] = {}
    if cand.is_ensemble:
        extra["export_variants"] = VARIANTS_NOT_ATTACHED
        logger.info(
            "%s v%s: export's variants %s",
            params.register.model_name,
            version,
            VARIANTS_NOT_ATTACHED,
        )
    if compact is not None:
        extra["compact"] = register_compact(client, params, cand, compact, version, run_id)
    return extra


def _finish(
    rp: RegisterParams, decision: Decision, record: dict[str, Any], out_path: str | Path
) -> dict[str, Any]:
    version = record["version"]
    write_json(out_path, record)
    logger.info("%s v%s %s: %s", rp.model_name, version, record["decision"], record["reason"])
    if decision.gate_failed:
        raise GateError(
            f"model gate: {rp.model_name} v{version} {one_line(decision.reason)} "
            f"(marked {rp.challenger_alias}; champion unchanged)"
        )
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stages.register --features DIR --model DIR [--ensemble DIR] --metrics
    FILE [--export FILE] [--compact DIR] --out FILE``."""
    parser = build_parser("register", "Register the model; promote it if it passes the gate.")
    parser.add_argument("--features", required=True, help="features dir (test split)")
    parser.add_argument("--model", required=True, help="model dir (model.pt, run.json)")
    parser.add_argument(
        "--ensemble", default=None, help="ensemble stage's dir: its model when it built one"
    )
    parser.add_argument("--metrics", required=True, help="metrics JSON from evaluate")
    parser.add_argument("--export", default=None, help="export report JSON (variants logged)")
    parser.add_argument(
        "--compact", default=None, help="compress stage's dir: its chosen model, beside a champion"
    )
    parser.add_argument("--out", required=True, help="registration record JSON")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(
            args.features,
            args.model,
            args.metrics,
            args.out,
            params,
            args.params,
            args.export,
            args.ensemble,
            args.compact,
        )

    return run_main("register", parser, body, argv)
