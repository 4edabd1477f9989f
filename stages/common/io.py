"""Atomic writes and careful reads: a failed stage never leaves a half-written file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from stages.common.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` on success.

    Works for files and directories. On an exception the temporary path is removed and
    ``target`` is left exactly as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            # A directory cannot be renamed over a non-empty one: swap via a backup name.
            backup = tmp.parent / f"{target.name}.old"
            os.replace(target, backup)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file when it is missing or malformed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError("file not found; run the upstream stage first",
                        file=str(path), rule="exists") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", file=str(path), rule="json") from exc


def write_parquet(path: str | Path, df: pd.DataFrame) -> None:
    """Write a DataFrame to Parquet atomically (no index)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False, engine="pyarrow")


def read_parquet(path: str | Path) -> pd.DataFrame:
    """Read a Parquet file or folder; a missing, empty or corrupt file gets a clear error."""
    import pandas as pd
    import pyarrow as pa

    path = Path(path)
    if not path.exists():
        raise DataError("file not found", file=str(path), rule="exists")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", file=str(path), rule="not_empty")
    try:
        return pd.read_parquet(path, engine="pyarrow")
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"not a readable Parquet file (truncated or corrupt?): {exc}",
                        file=str(path), rule="parquet") from exc
