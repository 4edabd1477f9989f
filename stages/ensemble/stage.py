"""Ensemble stage: train's model and more members, fused into one model file on val.

    python -m stages.ensemble --features data/features --model models --out ensemble

Disabled (``ensemble.enabled: false``, the default) it writes ``ensemble/report.json``
``{"status": "disabled", "reason"}`` and nothing else, fast (no torch): train's model stays the
one evaluate, compress and register judge (``stages.common.judged``).

Enabled, member 0 is train's model file; the others (``ensemble.members``: more seeds, other
families, the ``tune_top_k`` best trials of the current ``make tune`` study) are trained by
train's own code on the train split in one ``python -m stages.train.members`` process. Every
member predicts the val split; the fusion (``ensemble.method``, ``fusion_fit``) is fitted on
those probabilities and labels; ``model.ensemble.write_ensemble`` writes
``ensemble/model.ensemble.zip``, which is loaded back on the same device and must reproduce
the fused val probabilities (``reload``). ``ensemble/report.json`` (status ``built``) holds the
method, the weights and per member its name, source, family, sha256 and val metrics, and the
ensemble's val metrics. The test split is never read here (evaluate scores it).

The val metrics are optimistic, and the report's ``note`` says so: every member was
early-stopped on these same val rows, and weighted (by loss), caruana and stacking are fitted
on the members' predictions for them (not out-of-fold predictions, which would mean training
every member k times). Compare members and methods by evaluate's test metrics: those are the
honest ones.

The report and the zip are logged to train's MLflow run, with metrics
``ensemble_val_<metric>`` and ``ensemble_member_<name>_val_f1_macro``. MLflow keeps a metric
once logged, so a re-run with other members leaves the old members' metrics in that run:
``report.json`` is authoritative, and the run's tag ``ensemble.members`` (the names, set on
every run of the stage) tells which member metrics are current. The folder is replaced as a
whole, after the logging: a failure leaves the old one.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.files import ENSEMBLE_FILE, PREPROCESSOR_FILE
from stages.common.cli import build_parser, run_main
from stages.common.config import Params
from stages.common.errors import ConfigError, DataError
from stages.common.io import atomic_path, read_parquet, write_json
from stages.common.judged import REPORT_FILE
from stages.ensemble.members_process import member_count, member_specs, train_members
from stages.ensemble.report import build_report, disabled_report, log_summary

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

TRAIN_MEMBER = "train"  # member 0's name and source
VAL_FILE = "val.parquet"  # the one split the fusion sees


# --- pure core ----------------------------------------------------------------------------


def check_members(params: Params) -> list[dict[str, Any]]:
    """The extra members' spec, once the settings are known to make an ensemble.

    Raises:
        ConfigError: no member besides train's, weights not one per member, a bad member.
    """
    spec = member_specs(params)
    n = member_count(params)
    if n == 1:
        raise ConfigError(
            "ensemble.enabled is true but ensemble.members adds no member to train's model: "
            "set ensemble.members.seeds, families or tune_top_k (or ensemble.enabled: false)"
        )
    weights = params.ensemble.weights
    if weights is not None and len(weights) != n:
        raise ConfigError(
            f"ensemble.weights has {len(weights)} value(s) for {n} members (train's model, "
            f"{len(spec)} from seeds/families, {params.ensemble.members.tune_top_k} tuning "
            "trials): give one per member, train's model first"
        )
    return spec


# --- I/O ----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _train_member(model_dir: Path, params: Params) -> dict[str, Any]:
    from model.files import model_file

    return {
        "name": TRAIN_MEMBER,
        "source": TRAIN_MEMBER,
        "file": str(model_file(model_dir)),
        "seed": params.base.seed,
        "overrides": {},
    }


def val_probas(
    features_dir: Path, members: list[dict[str, Any]], device: Any
) -> tuple[np.ndarray, list[np.ndarray], Any, Any]:
    """Each member's probabilities on the val split, networks on ``device`` (the
    preprocessor and val.parquet are all this reads); also the labels, the preprocessor and
    the val rows. Fills in each member's family, sha256 and best epoch."""
    from model.predictors import load_predictor
    from model.preprocess import load_preprocessor

    preprocessor = load_preprocessor(features_dir / PREPROCESSOR_FILE)
    val = read_parquet(features_dir / VAL_FILE)
    y = preprocessor.encode_labels(val[preprocessor.target])
    probas = []
    for member in members:
        predictor = load_predictor(member["file"])
        if predictor.n_classes != len(preprocessor.classes):
            raise DataError(
                f"member {member['name']} predicts {predictor.n_classes} classes, the "
                f"preprocessor has {len(preprocessor.classes)}: retrain after the features change",
                file=member["file"],
                rule="model_matches_features",
            )
        if predictor.is_network:
            predictor.to(device)
        probas.append(predictor.predict_proba(predictor.features(preprocessor, val)))
        member.update(
            family=predictor.family,
            sha256=_sha256(Path(member["file"])),
            best_epoch=predictor.meta.get("epoch"),
        )
    return y, probas, preprocessor, val


def build(
    features_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    members: list[dict[str, Any]],
) -> dict[str, Any]:
    """Fit the fusion of ``members`` (``{name, source, file, seed, overrides}``, train's
    first) on the val split, write ``out_dir`` (zip + report), log both to train's run.

    Raises:
        PipelineError: the written zip does not reproduce the fused val probabilities.
    """
    from model.ensemble import fuse, write_ensemble
    from model.metrics import compute_metrics
    from model.nets import select_device
    from stages.ensemble.fusion_fit import fit_fusion
    from stages.ensemble.reload import check_reload

    features_dir, model_dir = Path(features_dir), Path(model_dir)
    device = select_device(params.base.device)  # the members and the reload check: one device
    y, probas, preprocessor, val = val_probas(features_dir, members, device)
    names, settings = [m["name"] for m in members], params.ensemble
    fusion = fit_fusion(
        settings.method,
        probas,
        y,
        weights=settings.weights,
        rounds=settings.caruana_rounds,
        stacking_c=settings.stacking_c,
        names=names,
        val_file=str(features_dir / VAL_FILE),
    )
    fused = fuse(probas, fusion.method, fusion.weights, fusion.stacking)
    # A member at weight 0 (caruana never picked it) changes nothing: it stays in the report,
    # not in the file, which would otherwise load and run it on every request.
    kept = [i for i in range(len(members)) if fusion.weights is None or fusion.weights[i] > 0]
    weights = None if fusion.weights is None else [fusion.weights[i] for i in kept]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        zip_path = write_ensemble(
            tmp / ENSEMBLE_FILE, [members[i] for i in kept], fusion.method, weights, fusion.stacking
        )
        loaded = check_reload(
            zip_path,
            (preprocessor, val),
            device,
            [names[i] for i in kept],
            [probas[i] for i in kept],
            fused,
        )
        member_metrics = [compute_metrics(y, p) for p in probas]
        scores = compute_metrics(y, loaded)
        report = build_report(members, member_metrics, fusion, scores, _sha256(zip_path), len(y))
        write_json(tmp / REPORT_FILE, report)
        _log_to_train_run(model_dir, params, tmp, report)
    log_summary(report)
    return report


def _log_to_train_run(model_dir: Path, params: Params, folder: Path, report: dict) -> None:
    import mlflow

    from stages.common import tracking

    metrics = {f"ensemble_val_{k[4:]}": v for k, v in report.items() if k.startswith("val_")}
    metrics.pop("ensemble_val_rows", None)
    for member in report["members"]:
        metrics[f"ensemble_member_{member['name']}_val_f1_macro"] = member["val_f1_macro"]
    with tracking.resume_run(model_dir, params.mlflow):
        mlflow.set_tags(  # which ensemble_member_* metrics are this run's (module doc)
            {
                "ensemble.method": report["method"],
                "ensemble.members": ",".join(m["name"] for m in report["members"]),
            }
        )
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(folder / REPORT_FILE), artifact_path="ensemble")
        mlflow.log_artifact(str(folder / ENSEMBLE_FILE), artifact_path="ensemble")


def run(
    features_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    params_file: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``out_dir``: the disabled report, or the ensemble and its report (module doc).

    ``params_file`` (the file ``params`` came from) is what the members process reads.

    Raises:
        ConfigError: the members asked for cannot be trained (checked before any training).
        PipelineError: a member failed to train, or the ensemble could not be built.
    """
    out_dir = Path(out_dir)
    if not params.ensemble.enabled:
        with atomic_path(out_dir, keep_if_identical=True) as tmp:
            tmp.mkdir()
            write_json(tmp / REPORT_FILE, disabled_report())
        logger.info("ensemble disabled (ensemble.enabled: false): train's model is judged")
        return disabled_report()
    spec = check_members(params)
    started = time.monotonic()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # beside the output, named as atomic_path names its temp folders: a killed run's is
    # removed by the next run (stages.common.runlock.remove_stale_temp_dirs)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", dir=out_dir.parent) as work:
        extra = train_members(Path(features_dir), spec, Path(work), params, params_file)
        trained = time.monotonic()
        members = [_train_member(Path(model_dir), params), *extra]
        report = build(features_dir, model_dir, out_dir, params, members)
    logger.info(
        "ensemble built in %.1f s (members %.1f s, fusion %.1f s): %s",
        time.monotonic() - started,
        trained - started,
        time.monotonic() - trained,
        out_dir / ENSEMBLE_FILE,
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stages.ensemble --features DIR --model DIR --out DIR``."""
    parser = build_parser("ensemble", "Fuse train's model and more members on the val split.")
    parser.add_argument("--features", required=True, help="features dir (train and val splits)")
    parser.add_argument("--model", required=True, help="train's model dir (member 0, run.json)")
    parser.add_argument("--out", required=True, help="ensemble dir (report.json, the zip)")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.features, args.model, args.out, params, params_file=args.params)

    return run_main("ensemble", parser, body, argv)
