"""What register takes from the compress stage: its report (``compact/report.json``) and the
chosen compact model file, when the report chose one and was made from the judged model (its
parent sha256); :mod:`stages.register.compact` registers it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.errors import DataError
from stages.common.io import read_json
from stages.common.judged import REPORT_FILE
from stages.register.gate import one_line

FIGURES = (  # what stages.compress's gate records for each candidate, beside its metrics
    "relative_drop",
    "speedup",
    "speedup_batch64",
    "size_ratio",
    "size_bytes",
    "latency_ms_row",
    "latency_ms_batch64",
)


@dataclass(frozen=True)
class Compact:
    """The compress stage's chosen candidate: method, file, the gate's reason and figures."""

    method: str
    path: Path
    gate: str
    metrics: dict[str, Any]


def read_compact(compact_dir: Path, parent_file: Path) -> tuple[Compact | None, str]:
    """The chosen compact model of ``parent_file``, or (None, why there is none).

    Raises:
        DataError: the report is missing, or names a chosen file that is not there (re-run
            compress).
    """
    from model.artifacts import file_sha256

    path = compact_dir / REPORT_FILE
    if not path.is_file():
        raise DataError(
            "the compress stage's report is missing; run the compress stage (dvc repro compress)",
            file=str(path),
            rule="compact_report",
        )
    report = read_json(path)
    chosen, status = report.get("chosen"), report.get("status")
    if not chosen:
        return None, f"the compress stage chose none (status {status})"
    parent = (report.get("parent") or {}).get("sha256")
    if parent != (actual := file_sha256(parent_file)):
        return None, (
            f"compact/{REPORT_FILE} is about another parent (sha256 {str(parent)[:12]}, the "
            f"judged {parent_file.name} is {actual[:12]}): stale; re-run compress"
        )
    candidate = (report.get("candidates") or {}).get(chosen) or {}
    file = compact_dir / chosen / Path(str(report.get("chosen_file") or "")).name
    if not file.is_file():
        raise DataError(
            f"the compress report chose {chosen!r} but its model file is missing; re-run "
            "compress (dvc repro -f compress)",
            file=str(file),
            rule="compact_model",
        )
    if (expected := candidate.get("sha256")) and expected != file_sha256(file):
        raise DataError(
            f"the {chosen!r} model file is not the one the compress report measured (sha256 "
            f"{str(expected)[:12]}); re-run compress (dvc repro -f compress)",
            file=str(file),
            rule="compact_model",
        )
    gate = str(candidate.get("reason") or candidate.get("status"))
    return Compact(chosen, file, one_line(gate), gate_figures(candidate)), ""


def gate_figures(candidate: dict[str, Any]) -> dict[str, float]:
    """The compression gate's numbers of a candidate (tag ``compact.metrics``): its test
    metrics, relative drop, speedups, size ratio, size and latencies."""
    metrics = candidate.get("metrics") or {}
    figures = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return figures | {
        key: value
        for key in FIGURES
        if isinstance(value := candidate.get(key), (int, float)) and not isinstance(value, bool)
    }
