"""Data quality of live rows against the model's input contract (``model.contract``: the
reviewed suite's ranges, value sets and nullability, shipped with the model).

A bad row breaks one of the contract's rules (``not_null``, ``between``, ``positive``,
``in_set``: an unseen category, ``date_format``, ``all_null``), found again here, or was marked by
the service (the log's ``row_violations``). Null shares are reported per column beside the
reference's, since a null the suite allows is no violation but a rise is worth seeing.

Shares (bad rows, nulls) count the log's sampled rows only (``sampled`` true: a uniform sample
of the traffic); rows logged only because they broke the contract (``sampled`` false) would
over-represent bad rows there, so they feed the violation listing alone. A log written before
the column existed has every row counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from model.contract import check_rows

RANGE_RULES = ("between", "positive")
SHOWN_VALUES = 5  # unseen categories quoted per column


@dataclass(frozen=True)
class QualityResult:
    """What the live rows break."""

    rows: int
    bad_rows: int
    null_share: dict[str, float]  # per checked column, live
    reference_null_share: dict[str, float]
    violations: dict[str, dict[str, int]]  # column -> rule -> rows
    unseen: dict[str, list[str]] = field(default_factory=dict)  # column -> a few unseen values
    contract_checked: bool = True  # False: the model ships no contract (ranges not known)
    forced_rows: int = 0  # rows logged only for a violation: listed, not in the shares

    @property
    def bad_row_share(self) -> float:
        """Share of live rows with any violation (0 for no rows)."""
        return self.bad_rows / self.rows if self.rows else 0.0

    def describe(self) -> str:
        """``island: in_set x12 (unseen 'Atlantis'); bill_length_mm: between x3``."""
        parts = []
        for column, rules in sorted(self.violations.items(), key=lambda kv: -sum(kv[1].values())):
            text = ", ".join(f"{rule} x{n}" for rule, n in sorted(rules.items()))
            if self.unseen.get(column):
                text += f" (unseen {', '.join(repr(v) for v in self.unseen[column])})"
            parts.append(f"{column}: {text}")
        return "; ".join(parts) or "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "bad_row_share": self.bad_row_share}


def check_quality(
    current: pd.DataFrame,
    reference: pd.DataFrame,
    contract: dict[str, Any] | None,
    columns: list[str],
) -> QualityResult:
    """Live rows (the log's, with its input columns, ``row_violations`` and ``sampled``)
    against ``contract``; null shares of ``columns`` beside the reference's. ``rows``,
    ``bad_rows`` and the null shares count sampled rows; ``violations`` and ``unseen`` all rows.

    A contract derived from an old model's signature (``derived_from``) knows no ranges or
    value sets: only the service's marks count then.
    """
    checks = contract is not None and "derived_from" not in contract
    bad: set[int] = set()
    violations: dict[str, Counter[str]] = {}
    unseen: dict[str, Counter[str]] = {}
    if checks and len(current):
        for v in check_rows(current.reset_index(drop=True), contract or {}):
            bad.add(v.row)
            violations.setdefault(v.column, Counter())[v.rule] += 1
            if v.rule == "in_set":
                unseen.setdefault(v.column, Counter())[str(v.value)] += 1
    if "row_violations" in current.columns:
        marks = current["row_violations"].reset_index(drop=True)
        bad |= set(marks.index[marks.notna()].tolist())
    sampled = sampled_mask(current)
    live = current[sampled.to_numpy()]
    present = [c for c in columns if c in current.columns]
    return QualityResult(
        rows=len(live),
        bad_rows=len(bad & set(sampled.index[sampled].tolist())),
        null_share={c: float(live[c].isna().mean()) if len(live) else 0.0 for c in present},
        reference_null_share={
            c: float(reference[c].isna().mean()) if len(reference) else 0.0
            for c in present
            if c in reference.columns
        },
        violations={c: dict(rules) for c, rules in violations.items()},
        unseen={c: [v for v, _ in n.most_common(SHOWN_VALUES)] for c, n in unseen.items()},
        contract_checked=checks,
        forced_rows=int((~sampled).sum()),
    )


def sampled_mask(rows: pd.DataFrame) -> pd.Series:
    """Per row (positional index 0..n-1): taken by the log's sample draw; all True for a log
    without the ``sampled`` column (written before it existed)."""
    if "sampled" not in rows.columns:
        return pd.Series(True, index=range(len(rows)))
    return rows["sampled"].fillna(True).astype(bool).reset_index(drop=True)
