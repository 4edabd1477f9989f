"""Which model the pipeline judges: the ensemble stage's, when it built one, else train's.

Evaluate scores it, compress shrinks it (it is the compact models' parent), register registers
it. The ensemble stage always writes ``<ensemble_dir>/report.json``; ``status: built`` means
``<ensemble_dir>/model.ensemble.zip`` is the candidate, ``disabled`` that train's model is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.files import ENSEMBLE_FILE, model_file
from stages.common.errors import DataError
from stages.common.io import read_json

REPORT_FILE = "report.json"  # what the ensemble and compress stages write beside their models
BUILT = "built"


def ensemble_report(ensemble_dir: str | Path | None) -> dict[str, Any] | None:
    """The ensemble stage's report, or None (no folder given: a caller outside the graph)."""
    if ensemble_dir is None:
        return None
    path = Path(ensemble_dir) / REPORT_FILE
    if not path.is_file():
        raise DataError(
            "the ensemble stage's report is missing; run the ensemble stage (dvc repro ensemble)",
            file=str(path),
            rule="ensemble_report",
        )
    return read_json(path)


def judged_model_file(model_dir: str | Path, ensemble_dir: str | Path | None = None) -> Path:
    """The model file the pipeline judges: ``model.ensemble.zip`` when the ensemble stage
    built one, else the file train wrote into ``model_dir``.

    Raises:
        DataError: the report says built but the file is not there, or no model in model_dir.
    """
    report = ensemble_report(ensemble_dir)
    if report is not None and report.get("status") == BUILT:
        path = Path(ensemble_dir) / ENSEMBLE_FILE  # type: ignore[arg-type]
        if not path.is_file():
            raise DataError(
                "the ensemble report says built but the model file is missing; re-run the "
                "ensemble stage (dvc repro -f ensemble)",
                file=str(path),
                rule="ensemble_model",
            )
        return path
    return model_file(model_dir)
