"""What register takes from the export stage: its report (the variants it logged to the
model's MLflow run, with their hashes), checked against the run's stored ``variants/`` before
register records them with a new version."""

from __future__ import annotations

from pathlib import Path

from stages.common import tracking
from stages.common.errors import DataError
from stages.common.io import read_json


def read_export_report(path: str | Path | None, model_dir: Path) -> dict[str, str]:
    """``variants/<file> -> sha256`` the export stage logged for this model's run ({} when it
    logged none, or no report is given): the store's copies must match them when recorded.

    Raises:
        DataError: the report is about another MLflow run than the model's (export is stale).
    """
    if path is None:
        return {}
    exported = read_json(path)
    run_id = read_json(model_dir / tracking.RUN_FILE)["run_id"]
    if exported.get("run_id") != run_id:
        raise DataError(
            f"the export report is about run {exported.get('run_id')}, the model about run "
            f"{run_id}; re-run export",
            file=str(path),
            rule="same_run",
        )
    return dict(exported.get("files") or {}) if exported.get("status") == "exported" else {}


def check_exported(name: str, version: str, run_id: str, exported: dict[str, str]) -> None:
    """The run's stored ``variants/`` are the files the export stage logged (its report's
    hashes), checked before their hashes are recorded with the version.

    Raises:
        ArtifactIntegrityError: naming each file that differs; nothing is recorded.
    """
    import tempfile

    import mlflow

    from model import artifacts

    if not exported:
        return
    with tempfile.TemporaryDirectory(prefix="register-variants-") as tmp:
        stored = {}
        if artifacts.has_variants(run_id):
            folder = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifacts.VARIANTS_DIR, dst_path=tmp
            )
            stored = artifacts.hash_folder(folder, artifacts.VARIANTS_PREFIX)
    if problems := artifacts.compare(exported, stored):
        raise artifacts.ArtifactIntegrityError(
            f"{name} v{version}: the run's variants are not the ones the export stage logged "
            f"(changed in the artifact store since): {'; '.join(problems[:3])}; nothing "
            "recorded or signed. Fix: find who writes to the artifact store, then re-run "
            "export and register (the version stays pending, not champion)"
        )
