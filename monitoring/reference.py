"""The watched model's training reference: the features stage's train split it was trained on.

The version carries the md5 of ``data/features`` it was trained on (tag
``dvc.data/features.md5``, copied from its run). When the workspace's ``dvc.lock`` records the
same output, the workspace's split is the reference; otherwise the split is looked up in the
DVC cache by that md5; when neither has it, the workspace's split is used and the note says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

FEATURES_OUT = "data/features"
FEATURES_TAG = f"dvc.{FEATURES_OUT}.md5"  # on the version (stages.common.tracking)
NUMERIC_KINDS = {"float", "int"}
CATEGORICAL_KINDS = {"category", "bool", "str"}


@dataclass(frozen=True)
class ReferenceSource:
    """Where the train (and test) split comes from, and why."""

    train: Path
    test: Path | None
    note: str  # one sentence: whose data this is
    champion_data: bool  # True when it is the data the version was trained on


def _lock_md5(repo: Path, out: str) -> str | None:
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    for stage in stages.values():
        for item in stage.get("outs") or []:
            if item.get("path") == out:
                return item.get("md5")
    return None


def _from_cache(repo: Path, md5: str) -> dict[str, Path]:
    # A DVC 3 cache: files/md5/<2>/<rest>; a ".dir" object lists the folder's files.
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as dvc:
            root = Path(dvc.cache.local.path)
    except Exception:  # no DVC repo here: nothing to look up
        return {}
    listing = root / md5[:2] / md5[2:]
    if not listing.is_file():
        return {}
    files = {}
    for entry in json.loads(listing.read_text(encoding="utf-8")):
        path = root / entry["md5"][:2] / entry["md5"][2:]
        if path.is_file():
            files[entry["relpath"]] = path
    return files


def locate_reference(repo: str | Path, tags: dict[str, str]) -> ReferenceSource:
    """The train/test split files for a version with lineage ``tags`` (see the module doc)."""
    repo = Path(repo)
    features = repo / FEATURES_OUT
    wanted, here = tags.get(FEATURES_TAG), _lock_md5(repo, FEATURES_OUT)
    test = features / "test.parquet"
    if wanted and wanted == here:
        note = f"{FEATURES_OUT} in the workspace: the version's training data (md5 {wanted})"
        return ReferenceSource(
            features / "train.parquet", test if test.is_file() else None, note, True
        )
    if wanted:
        cached = _from_cache(repo, wanted)
        if "train.parquet" in cached:
            note = f"the version's training data (md5 {wanted}) from the DVC cache"
            return ReferenceSource(cached["train.parquet"], cached.get("test.parquet"), note, True)
    why = (
        f"the version was trained on {FEATURES_OUT} md5 {wanted}, which neither the workspace "
        f"(md5 {here}) nor the DVC cache holds"
        if wanted
        else "the version carries no data lineage tag"
    )
    note = f"{FEATURES_OUT}/train.parquet in the workspace, NOT known to be the version's: {why}"
    return ReferenceSource(
        features / "train.parquet", test if test.is_file() else None, note, False
    )


def feature_kinds(
    contract: dict[str, Any] | None, columns: list[tuple[str, str]]
) -> dict[str, str]:
    """``{column: "num" | "cat"}`` of the model's used inputs: the contract's used columns
    (kinds float/int -> num, category/bool -> cat; dates are left out), else ``columns``
    ((name, kind) of the input signature)."""
    if contract and contract.get("columns"):
        pairs = [(c["name"], c.get("kind", "")) for c in contract["columns"] if c.get("used", True)]
    else:
        pairs = list(columns)
    return {
        name: "num" if kind in NUMERIC_KINDS else "cat"
        for name, kind in pairs
        if kind in NUMERIC_KINDS | CATEGORICAL_KINDS
    }


def read_reference(path: str | Path, columns: list[str], rows: int, seed: int) -> pd.DataFrame:
    """``rows`` rows (a seeded sample; all when fewer) of the split's ``columns``.

    Raises:
        FileNotFoundError: no such file.
        KeyError: a column the model takes is not in the split (naming it).
    """
    frame = pd.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"{path}: no column(s) {missing} the model takes")
    if len(frame) > rows:
        frame = frame.sample(rows, random_state=seed)
    return frame.reset_index(drop=True)


def as_kinds(frame: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """The ``kinds`` columns of ``frame`` with one dtype per kind (float64 / object text), so the
    reference and the log compare like with like whatever types each file holds."""
    out = {}
    for name, kind in kinds.items():
        values = frame[name]
        if kind == "num":
            out[name] = pd.to_numeric(values, errors="coerce").astype("float64")
        else:
            text = values.astype(object).where(values.notna(), None)
            out[name] = text.map(lambda v: None if v is None else str(v)).astype(object)
    return pd.DataFrame(out, index=frame.index)
