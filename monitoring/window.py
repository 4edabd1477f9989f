"""The prediction log's window since the last check (``serving/predlog.py`` writes it).

Part files are ``part-<UTC flush time>-v<version>-<id>.parquet``; every row of a file was
logged before its flush time, so the watermark is a flush time: a check reads the files flushed
after the previous check's newest one. A file flushed just before a check but renamed into place
just after it would be missed by a plain ``>``; so files within ``GRACE`` of the watermark are
read again, minus those the previous check already read (``seen``).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

GRACE = dt.timedelta(seconds=60)  # far above a flush's write time (milliseconds)
_PART = re.compile(r"^part-(?P<stamp>\d{8}T\d{12})-v.+\.parquet$")


@dataclass(frozen=True)
class LogWindow:
    """The rows read and where the next check starts."""

    rows: pd.DataFrame  # every logged row of the files read (all versions)
    files: list[str]  # names of the part files read
    watermark: dt.datetime | None  # the newest flush time read (else the previous one)
    seen: list[str] = field(default_factory=list)  # files within GRACE of the watermark


def part_stamp(name: str) -> dt.datetime | None:
    """The flush time in a part file's name (UTC), None for another file."""
    match = _PART.match(name)
    if not match:
        return None
    return dt.datetime.strptime(match["stamp"], "%Y%m%dT%H%M%S%f").replace(tzinfo=dt.UTC)


def read_log(
    log_dir: str | Path, since: dt.datetime | None = None, seen: list[str] | None = None
) -> LogWindow:
    """The log's part files flushed after ``since`` (within ``GRACE``, less ``seen``).

    Raises:
        FileNotFoundError: ``log_dir`` is no folder.
    """
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"{log_dir}: no prediction log folder")
    skip = set(seen or [])
    chosen: list[tuple[dt.datetime, Path]] = []
    for path in sorted(log_dir.glob("part-*.parquet")):
        stamp = part_stamp(path.name)
        if stamp is None or path.name in skip:
            continue
        if since is None or stamp > since - GRACE:
            chosen.append((stamp, path))
    frames = [pd.read_parquet(path) for _, path in chosen]
    frames = [frame for frame in frames if len(frame)]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    watermark = max([stamp for stamp, _ in chosen], default=since)
    # The files read now and those read before (``seen``) that are still within GRACE of the
    # new watermark: dropping the latter would let the next check read them a second time.
    named = [(s, p.name) for s, p in chosen] + [(part_stamp(n), n) for n in skip]
    recent = sorted(
        {n for s, n in named if s is not None and watermark is not None and s > watermark - GRACE}
    )
    return LogWindow(rows, [p.name for _, p in chosen], watermark, recent)


def read_recent(
    log_dir: str | Path, now: dt.datetime, days: float, columns: list[str] | None = None
) -> pd.DataFrame:
    """The rows of the part files flushed within ``days`` before ``now``, whatever the
    watermark: the rows late labels are joined with (params ``monitor.labels_days``).

    Args:
        columns: read only these (a file lacking one has it null); None: all.
    """
    import pyarrow.parquet as pq

    since = now - dt.timedelta(days=days)
    frames = []
    for path in sorted(Path(log_dir).glob("part-*.parquet")):
        stamp = part_stamp(path.name)
        if stamp is None or stamp <= since:
            continue
        names = pq.read_schema(path).names  # an older file may lack a newer column
        frames.append(
            pd.read_parquet(path, columns=[c for c in columns if c in names] if columns else None)
        )
    frames = [frame for frame in frames if len(frame)]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return rows.reindex(columns=columns) if columns else rows


def watched_rows(rows: pd.DataFrame, model_name: str, version: str | None) -> pd.DataFrame:
    """The rows the watched version scored (``model_name``, ``version``), oldest first."""
    if rows.empty or "model_version" not in rows.columns:
        return rows.iloc[0:0]
    keep = (rows["model_name"].astype(str) == model_name) & (
        rows["model_version"].astype(str) == str(version)
    )
    return rows[keep].sort_values("logged_at", kind="stable").reset_index(drop=True)


def window_bounds(rows: pd.DataFrame) -> tuple[str | None, str | None]:
    """ISO UTC of the first and last ``logged_at`` of ``rows`` (None, None when empty)."""
    if rows.empty:
        return None, None
    stamps = pd.to_datetime(rows["logged_at"], utc=True)
    return stamps.min().isoformat(), stamps.max().isoformat()
