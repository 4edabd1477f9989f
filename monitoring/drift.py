"""Per-feature drift with Evidently (``DataDriftPreset``, its default test per column: chosen by
column kind and reference size, e.g. K-S / chi-square / Z-test up to 1000 reference rows,
Wasserstein / Jensen-Shannon above), the share of drifted columns, and the HTML report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import pandas.core.dtypes.common as _pandas_common

# Evidently 0.7.23 imports infer_dtype_from_object from pandas, which pandas 3 removed; only its
# legacy TestColumnsType uses it (we do not), so any callable lets the import succeed.
if not hasattr(_pandas_common, "infer_dtype_from_object"):
    _pandas_common.infer_dtype_from_object = lambda dtype: dtype  # type: ignore[attr-defined]

P_VALUE = "p_value"  # Evidently's method names end so for a test whose score is a p-value


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift test."""

    column: str
    test: str  # Evidently's method, e.g. "K-S p_value", "Wasserstein distance (normed)"
    score: float  # the p-value (p-value tests) or the distance
    threshold: float
    drifted: bool

    def describe(self) -> str:
        """``bill_length_mm (K-S p_value 1.2e-08 < 0.05)``."""
        sign = "<" if self.test.endswith(P_VALUE) else ">="
        if not self.drifted:
            sign = ">=" if sign == "<" else "<"
        return f"{self.column} ({self.test} {self.score:.3g} {sign} {self.threshold:g})"


@dataclass(frozen=True)
class DriftResult:
    """Every column's test, the drifted share, and Evidently's report (for ``html``)."""

    columns: list[ColumnDrift]
    share: float
    snapshot: Any  # evidently Snapshot

    @property
    def drifted(self) -> list[str]:
        """The drifted columns, most drifted first by score order of their test."""
        return [c.column for c in self.columns if c.drifted]

    def html(self) -> str:
        """Evidently's report as one self-contained HTML page (its scripts inlined)."""
        return self.snapshot.get_html_str(as_iframe=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: share, drifted and each column's test."""
        return {
            "share": self.share,
            "drifted": self.drifted,
            "columns": [asdict(c) for c in self.columns],
        }


def detect_drift(
    reference: pd.DataFrame, current: pd.DataFrame, kinds: dict[str, str], drift_share: float
) -> DriftResult:
    """Evidently's drift preset on the ``kinds`` columns (``{name: "num" | "cat"}``).

    ``reference`` and ``current`` hold those columns with one dtype per kind
    (``monitoring.reference.as_kinds``).
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    columns = list(kinds)
    definition = DataDefinition(
        numerical_columns=[c for c in columns if kinds[c] == "num"],
        categorical_columns=[c for c in columns if kinds[c] == "cat"],
    )
    report = Report([DataDriftPreset(columns=columns, drift_share=drift_share)], include_tests=True)
    snapshot = report.run(
        Dataset.from_pandas(current[columns], data_definition=definition),
        Dataset.from_pandas(reference[columns], data_definition=definition),
    )
    return DriftResult(_column_results(snapshot.dict()), _share(snapshot.dict()), snapshot)


def _column_results(result: dict[str, Any]) -> list[ColumnDrift]:
    failed = {
        test["metric_config"]["metric_id"]
        for test in result.get("tests", [])
        if test.get("id") == "drift" and test.get("status") == "FAIL"
    }
    found = []
    for metric in result.get("metrics", []):
        config = metric.get("config", {})
        if config.get("type") != "evidently:metric_v2:ValueDrift":
            continue
        found.append(
            ColumnDrift(
                column=config["column"],
                test=str(config.get("method")),
                score=float(metric["value"]),
                threshold=float(config.get("threshold")),
                drifted=metric["id"] in failed,
            )
        )
    return found


def _share(result: dict[str, Any]) -> float:
    for metric in result.get("metrics", []):
        if metric.get("config", {}).get("type") == "evidently:metric_v2:DriftedColumnsCount":
            return float(metric["value"]["share"])
    raise ValueError("Evidently's report has no DriftedColumnsCount")
