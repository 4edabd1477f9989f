"""Export stage: ONNX (float32) and int8 copies of the network, compared with it and logged to
the train run; a small report (``reports/export.json``) that register depends on.

1. Build (``onnx.py``; the export and quantization code is ``stages.common.onnx_export``,
   which compress shares): the network (``models/model.pt``) exported to ONNX, softmax inside
   and batch axis dynamic, and quantized to int8, with a copy of the fitted preprocessor
   (``data/features``): a variant serves without torch.
2. Compare (``compare.py``): the float network and each variant scored on the test split:
   accuracy, its drop against the float network, the largest probability gap, file size, median
   latency of one row and of 64 rows; logged to the run as ``variant.<name>.<metric>``.
3. Log: the files go to the train run's ``variants/`` folder, where register's artifact manifest
   records their hashes (before anything of the version loads) and ``--variant onnx|int8``
   finds them.

Recorded files are never rewritten: once a version registered from this run has recorded its
artifact hashes (``model.artifacts``), the run's ``variants/`` (or their absence) is part of
what it recorded, and a new copy would fail its checks. A re-run for the same train run (export's
code or params changed) then keeps them, says so and reports ``kept``; a new train run exports
afresh. ``export.enabled: false`` builds nothing (``disabled``); a model family export cannot
convert (gbdt: no ONNX converter for scikit-learn's trees is installed) builds nothing either
and says why (``skipped``): the pyfunc serves alone, as with ``disabled``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.artifacts import DIGEST_TAG, MANIFEST_TAG, VARIANTS_PREFIX, hash_folder
from model.files import PREPROCESSOR_FILE
from model.gbdt import GBDT_FILE
from model.predictors import model_file
from model.variants import ARTIFACT_DIR
from stages.common import tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import ExportParams, Params
from stages.common.errors import DataError
from stages.common.io import read_json, read_parquet, write_json

if TYPE_CHECKING:
    import argparse

    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

EXPORTED, KEPT, DISABLED, SKIPPED = "exported", "kept", "disabled", "skipped"  # report status
# Model files export cannot convert, and why (the network checkpoint, model.pt, it can).
UNEXPORTABLE = {
    GBDT_FILE: (
        "model family gbdt (HistGradientBoosting trees) has no ONNX export here (no "
        "scikit-learn-to-ONNX converter is installed): no variants built, the pyfunc serves alone"
    )
}
METRIC_PREFIX = "variant."  # the run's metrics this stage logs


# --- pure core ----------------------------------------------------------------------------


def recorded_by(versions: list[ModelVersion]) -> list[str]:
    """The versions (``name vN``) that recorded the hashes of their run's files, sorted: the
    run's ``variants/`` are part of what they recorded, so they must not change."""
    return sorted(f"{v.name} v{v.version}" for v in versions if DIGEST_TAG in (v.tags or {}))


def recorded_variants(versions: list[ModelVersion]) -> dict[str, str]:
    """``variants/<file> -> sha256`` as the first version that recorded hashes holds them
    (every version of one run records the same ``variants/``); {} when none did."""
    import json

    for version in sorted(versions, key=lambda v: (v.name, int(v.version))):
        manifest = (version.tags or {}).get(MANIFEST_TAG)
        if DIGEST_TAG in (version.tags or {}) and manifest:
            return {k: v for k, v in json.loads(manifest).items() if k.startswith(VARIANTS_PREFIX)}
    return {}


def report(
    run_id: str, status: str, reason: str, files: dict[str, str], metrics: dict[str, float]
) -> dict[str, Any]:
    """What ``reports/export.json`` holds: the run, what happened and why, the files and the
    comparison with the float network."""
    return {
        "run_id": run_id,
        "status": status,
        "reason": reason,
        "files": dict(sorted(files.items())),
        "metrics": dict(sorted(metrics.items())),
    }


def describe(metrics: dict[str, float]) -> str:
    """One line: what the variants cost in accuracy and what int8 saves in size."""
    return (
        f"onnx accuracy drop {metrics['variant.onnx.accuracy_drop']:.4f}, int8 accuracy drop "
        f"{metrics['variant.int8.accuracy_drop']:.4f}, int8 "
        f"{100 * metrics['variant.int8.size_bytes'] / metrics['variant.onnx.size_bytes']:.0f}% "
        "of the onnx size"
    )


# --- I/O ----------------------------------------------------------------------------------


def build_and_compare(
    preprocessor_path: Path, network_path: Path, test: Any, ep: ExportParams, folder: Path
) -> dict[str, float]:
    """Write the variants to ``folder`` and score them against the float network."""
    from stages.export.compare import evaluate_variants
    from stages.export.onnx import build_variants

    build_variants(preprocessor_path, network_path, folder, ep.opset, ep.per_channel)
    return evaluate_variants(folder, network_path, test, (ep.row_repeats, ep.batch_repeats))


def _read_test(features_dir: Path) -> Any:
    from model.preprocess import load_preprocessor

    target = load_preprocessor(features_dir / PREPROCESSOR_FILE).target
    test_path = features_dir / "test.parquet"
    test = read_parquet(test_path)
    if target not in test.columns:
        raise DataError(
            "target column not found", file=str(test_path), column=target, rule="column_present"
        )
    return test


def _kept(run_id: str, recorded: list[str], versions: list[ModelVersion]) -> dict[str, Any]:
    import mlflow

    logged = mlflow.MlflowClient().get_run(run_id).data.metrics
    reason = (
        f"run {run_id}'s {ARTIFACT_DIR}/ kept as they are: {', '.join(recorded)} recorded their "
        "hashes at registration, and new files would fail its checks (a new train run "
        "exports afresh)"
    )
    logger.warning("export: %s", reason)
    metrics = {k: v for k, v in logged.items() if k.startswith(METRIC_PREFIX)}
    return report(run_id, KEPT, reason, recorded_variants(versions), metrics)


def _export(features_dir: Path, model_dir: Path, run_id: str, ep: ExportParams) -> dict[str, Any]:
    import mlflow

    test = _read_test(features_dir)
    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        folder = Path(tmp) / ARTIFACT_DIR
        metrics = build_and_compare(
            features_dir / PREPROCESSOR_FILE, model_file(model_dir), test, ep, folder
        )
        files = hash_folder(folder, VARIANTS_PREFIX)  # what register's manifest must find
        mlflow.log_artifacts(str(folder), ARTIFACT_DIR)
    mlflow.log_metrics(metrics)
    logger.info("export: %s", describe(metrics))
    return report(run_id, EXPORTED, describe(metrics), files, metrics)


def run(
    features_dir: str | Path, model_dir: str | Path, out_path: str | Path, params: Params
) -> dict[str, Any]:
    """Build, compare and log the ONNX variants of the model in ``model_dir``.

    Returns:
        The report (also written to ``out_path``): ``status`` is ``exported``, ``kept`` (a
        version registered from this run recorded the files already), ``disabled`` or
        ``skipped`` (a model family export cannot convert; ``reason`` says which).
    """
    import mlflow

    features_dir, model_dir, ep = Path(features_dir), Path(model_dir), params.export
    run_id = read_json(model_dir / tracking.RUN_FILE)["run_id"]
    if not ep.enabled:
        reason = "export.enabled is false: no variants built (the pyfunc serves alone)"
        logger.info("export: %s", reason)
        record = report(run_id, DISABLED, reason, {}, {})
    elif (reason := UNEXPORTABLE.get(model_file(model_dir).name)) is not None:
        logger.info("export: skipped: %s", reason)
        record = report(run_id, SKIPPED, reason, {}, {})
    else:
        with tracking.resume_run(model_dir, params.mlflow):
            versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
            if recorded := recorded_by(versions):
                record = _kept(run_id, recorded, versions)
            else:
                record = _export(features_dir, model_dir, run_id, ep)
    write_json(out_path, record)
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stages.export --features DIR --model DIR --out FILE``."""
    parser = build_parser("export", "Export the model to ONNX and int8; compare; log them.")
    parser.add_argument("--features", required=True, help="features dir (preprocessor, test)")
    parser.add_argument(
        "--model", required=True, help="model dir (model.pt or model.skops, run.json)"
    )
    parser.add_argument("--out", required=True, help="export report JSON")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.features, args.model, args.out, params)

    return run_main("export", parser, body, argv)
