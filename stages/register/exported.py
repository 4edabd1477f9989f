"""What register takes from the export stage: its report (``reports/export.json``), which
vouches for the variants in the model's MLflow run. Register records the run's ``variants/``
with a new version only as the report names them (``manifest.record_version``): status
``exported`` or ``kept`` with each file's sha256; ``disabled``, ``skipped`` (a model family
export cannot convert, e.g. gbdt) or no report vouches for none, whatever an earlier export
left in the run."""

from __future__ import annotations

from pathlib import Path

from stages.common import tracking
from stages.common.errors import DataError
from stages.common.io import read_json

VOUCHING = ("exported", "kept")  # report statuses whose files register records
STATUSES = (*VOUCHING, "disabled", "skipped")  # what stages.export writes


def read_export_report(path: str | Path | None, model_dir: Path) -> dict[str, str]:
    """``variants/<file> -> sha256`` the export stage vouches for in this model's run: the
    files it logged (``exported``) or kept as an earlier version recorded them (``kept``); {}
    when it vouches for none (``disabled``, ``skipped``, or no report is given).

    Raises:
        DataError: the report is about another MLflow run than the model's (export is stale),
            or its status is unknown.
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
    status = exported.get("status")
    if status not in STATUSES:
        raise DataError(
            f"the export report's status is {status!r}, not one of {', '.join(STATUSES)}; "
            "re-run export",
            file=str(path),
            rule="known_status",
        )
    return dict(exported.get("files") or {}) if status in VOUCHING else {}
