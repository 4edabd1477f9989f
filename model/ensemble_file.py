"""Writing the ensemble model file, ``model.ensemble.zip`` (:mod:`model.ensemble` loads it).

Apart from the predictor so that each module stays small; the layout both share is defined
here: ``ensemble.json`` (method, weights, stacking coefficients as plain lists, and per member
its name, source, family, view, file inside the zip and that file's sha256) beside
``members/<name>/model.pt|model.skops``. The zip is byte-identical for identical inputs (fixed
entry dates and modes, sorted entries, one compression), so DVC and register see a rebuilt
identical ensemble as unchanged. ``from model.ensemble import write_ensemble`` works as before.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import DataError
from model.files import atomic_path
from model.fusion import check_fusion

FORMAT = 1  # bump when what ensemble.json holds changes
SPEC_FILE = "ensemble.json"
MEMBER_FILES = ("model.pt", "model.skops")  # what train (and stages.train.members) writes
NATIVE, ENCODED = "native", "encoded"  # the preprocessor's view a member scores
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold
MEMBER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a folder in the zip


def member_view(meta: dict[str, Any]) -> str:
    """The view of the rows a member scores: :data:`NATIVE` (a gbdt on the tree view) or
    :data:`ENCODED` (``FittedPreprocessor.transform``)."""
    from model.gbdt import uses_native_inputs

    return NATIVE if uses_native_inputs(meta) else ENCODED


def write_ensemble(
    path: str | Path,
    members: list[dict[str, Any]],
    method: str,
    weights: list[float] | None = None,
    stacking: dict[str, Any] | None = None,
) -> Path:
    """Write the ensemble to ``path`` (named ``model.ensemble.zip`` for load_predictor)
    atomically and byte-deterministically; returns ``path``.

    Args:
        members: ``{"name", "source", "file"}`` each, member 0 first (train's model); ``name``
            is a folder in the zip (letters, digits, ``_.-``), ``file`` a ``model.pt`` or
            ``model.skops``. Each is loaded once here for its family, view and sizes.

    Raises:
        DataError: a bad or repeated name, a missing or unreadable member file, members
            predicting different numbers of classes.
        ValueError: weights or stacking that do not fit the method (:func:`check_fusion`).
    """
    from model.predictors import load_predictor

    path, entries, blobs = Path(path), [], {}
    if not members:
        raise DataError("an ensemble needs at least one member", file=str(path), rule="members")
    for member in members:
        name, file = str(member.get("name", "")), Path(member["file"])
        if not MEMBER_NAME.match(name) or name in blobs:
            raise DataError(
                f"member name {name!r}: unique, letters/digits/_.- (it names a folder)",
                file=str(file),
                rule="member_name",
            )
        if file.name not in MEMBER_FILES or not file.is_file():
            raise DataError(
                f"member {name!r}: expected an existing {' or '.join(MEMBER_FILES)}",
                file=str(file),
                rule="member_file",
            )
        predictor = load_predictor(file)
        blobs[name] = (f"members/{name}/{file.name}", file.read_bytes())
        entries.append(
            {
                "name": name,
                "source": str(member.get("source", "")),
                "family": predictor.family,
                "file": blobs[name][0],
                "sha256": hashlib.sha256(blobs[name][1]).hexdigest(),
                "view": member_view(predictor.meta),
                "n_features": predictor.n_features,
                "n_classes": predictor.n_classes,
            }
        )
    n_classes = {e["n_classes"] for e in entries}
    if len(n_classes) != 1:
        raise DataError(
            f"members predict different numbers of classes: {[e['n_classes'] for e in entries]}",
            file=str(path),
            rule="member_classes",
        )
    check_fusion(method, len(entries), n_classes.pop(), weights, stacking)
    spec = {
        "format": FORMAT,
        "method": method,
        "weights": None if weights is None else [float(w) for w in weights],
        "stacking": None if stacking is None else _plain_stacking(stacking),
        "members": entries,
    }
    files = {SPEC_FILE: (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode()}
    files |= dict(blobs.values())
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type, info.create_system = zipfile.ZIP_DEFLATED, 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name], compresslevel=6)
    return path


def _plain_stacking(stacking: dict[str, Any]) -> dict[str, Any]:
    """Coefficients as float lists, classes as int lists: JSON, the same for equal values."""
    plain = {
        key: np.asarray(stacking[key], dtype=np.float64).tolist() for key in ("coef", "intercept")
    }
    if stacking.get("classes") is not None:
        plain["classes"] = [int(c) for c in stacking["classes"]]
    return plain
