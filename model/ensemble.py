"""An ensemble as one model file (``model.ensemble.zip``): its members' model files and how
their class probabilities are fused, loaded like any model by
:func:`model.predictors.load_predictor`.

The zip holds ``ensemble.json`` (method, weights, stacking coefficients as plain lists, and per
member its name, source, family, the view of the rows it scores, its file inside the zip and
that file's sha256) and ``members/<name>/model.pt|model.skops``. No pickle: a member loads as
train's own file does (a network's weights, a gbdt through skops' trusted types), and only
after its bytes match the recorded sha256, so a member is pinned by content. The file is
byte-identical for identical inputs (fixed entry dates and modes, sorted entries, one
compression), so DVC and register see a rebuilt identical ensemble as unchanged.

:func:`model.fusion.fuse` is the one fusion code (importable from here too): the ensemble stage
fits weights or the stacking model on validation probabilities through it, and
:class:`EnsemblePredictor` predicts through it. The file is written by
:func:`model.ensemble_file.write_ensemble` (importable from here too) and loaded here.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.ensemble_file import ENCODED as ENCODED
from model.ensemble_file import FORMAT as FORMAT
from model.ensemble_file import MEMBER_FILES, MEMBER_NAME, NATIVE, SPEC_FILE, member_view
from model.ensemble_file import write_ensemble as write_ensemble  # the file, importable here
from model.errors import DataError
from model.fusion import METHODS as METHODS  # the fusion code, importable from here as before
from model.fusion import VOTE_MEAN_SHARE as VOTE_MEAN_SHARE
from model.fusion import check_fusion, fuse
from model.fusion import stacking_features as stacking_features
from model.fusion import stacking_from_sklearn as stacking_from_sklearn

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from model.predictors import Predictor
    from model.preprocess import FittedPreprocessor

FAMILY = "ensemble"

# --- the predictor ------------------------------------------------------------------------------


@dataclass
class EnsembleInputs:
    """The rows in each view the members need, computed once per view. ``shape`` is the
    primary view's (member 0's); ``inputs[rows]`` slices every view alike."""

    views: dict[str, np.ndarray]
    primary: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.views[self.primary].shape

    def __len__(self) -> int:
        return len(self.views[self.primary])

    def __getitem__(self, rows: Any) -> EnsembleInputs:
        return EnsembleInputs({k: v[rows] for k, v in self.views.items()}, self.primary)


@dataclass
class EnsemblePredictor:
    """A loaded ensemble with Predictor's interface; ``members`` in ``ensemble.json`` order."""

    meta: dict[str, Any]
    members: list[tuple[str, Predictor]]
    family: str = FAMILY
    device: torch.device | None = field(default=None, repr=False)

    @property
    def n_features(self) -> int:
        return int(self.meta["n_features"])

    @property
    def n_classes(self) -> int:
        return int(self.meta["n_classes"])

    @property
    def is_network(self) -> bool:
        return False  # scored as a whole; to() moves the network members

    def to(self, device: torch.device | str) -> EnsemblePredictor:
        """Score the network members on ``device`` (a gbdt always runs on the CPU)."""
        for _, member in self.members:
            member.to(device)
        return self

    def features(self, preprocessor: FittedPreprocessor, frame: pd.DataFrame) -> EnsembleInputs:
        """Raw rows in every view the members score (each view computed once)."""
        views: dict[str, np.ndarray] = {}
        for _, member in self.members:
            view = member_view(member.meta)
            if view not in views:
                views[view] = (
                    preprocessor.transform_native(frame)
                    if view == NATIVE
                    else preprocessor.transform(frame)
                )
        return EnsembleInputs(views, member_view(self.members[0][1].meta))

    def member_probas(
        self, X: EnsembleInputs | np.ndarray, batch_size: int = 1024
    ) -> list[np.ndarray]:
        """Each member's ``(n, n_classes)`` probabilities, member order.

        Raises:
            ValueError: a plain array while the members score different views.
        """
        if not isinstance(X, EnsembleInputs):
            views = {member_view(m.meta) for _, m in self.members}
            if len(views) > 1:
                raise ValueError(
                    "the members score different views of the rows (native and encoded): "
                    "pass EnsemblePredictor.features(preprocessor, frame), not one array"
                )
            X = EnsembleInputs({views.pop(): np.asarray(X)}, "")
        return [m.predict_proba(X.views[member_view(m.meta)], batch_size) for _, m in self.members]

    def predict_proba(self, X: EnsembleInputs | np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """The fused ``(n, n_classes)`` float64 probabilities (:func:`fuse`)."""
        return fuse(
            self.member_probas(X, batch_size),
            self.meta["method"],
            self.meta.get("weights"),
            self.meta.get("stacking"),
        )


# --- the file -----------------------------------------------------------------------------------


def load_ensemble(path: str | Path) -> EnsemblePredictor:
    """Load an ensemble :func:`write_ensemble` wrote; every member's bytes are checked against
    their recorded sha256 before it is loaded (each from a temporary copy, removed after).

    Raises:
        DataError: no such file, not a zip, no readable ``ensemble.json``, a member the spec
            names that is not in the zip, bad fusion settings.
        ArtifactIntegrityError: a member's bytes differ from their recorded sha256.
    """
    from model.artifacts import ArtifactIntegrityError
    from model.predictors import load_predictor

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            spec = json.loads(archive.read(SPEC_FILE))
            entries = spec["members"]
            names = [str(e["name"]) for e in entries]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"{SPEC_FILE} members {names}: at least one, names unique")
            blobs = {e["name"]: _member_bytes(archive, e, path) for e in entries}
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"not a readable ensemble: {exc}", file=str(path), rule="model") from exc
    members = []
    with tempfile.TemporaryDirectory(prefix="ensemble-") as tmp:
        for entry in entries:
            name, blob = entry["name"], blobs[entry["name"]]
            if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                raise ArtifactIntegrityError(
                    f"{path}: member {name!r} ({entry['file']}) has sha256 "
                    f"{hashlib.sha256(blob).hexdigest()}, not the recorded {entry['sha256']} "
                    "(damaged or replaced); not loaded. Fix: rebuild the ensemble stage"
                )
            local = Path(tmp) / name / Path(entry["file"]).name  # names checked: no traversal
            local.parent.mkdir()
            local.write_bytes(blob)
            members.append((name, load_predictor(local)))
    try:
        n_classes = members[0][1].n_classes
        check_fusion(spec["method"], len(members), n_classes, spec["weights"], spec["stacking"])
    except ValueError as exc:
        raise DataError(str(exc), file=str(path), rule="fusion") from exc
    first = members[0][1].meta
    meta = {
        "n_features": first["n_features"],
        "n_classes": first["n_classes"],
        "method": spec["method"],
        "weights": spec.get("weights"),
        "stacking": spec.get("stacking"),
        "members": entries,
        "train_params": first.get("train_params"),
        "epoch": first.get("epoch"),
        "val_loss": first.get("val_loss"),
    }
    return EnsemblePredictor(meta, members)


def _member_bytes(archive: zipfile.ZipFile, entry: dict[str, Any], path: Path) -> bytes:
    name, file = str(entry["name"]), str(entry["file"])
    if (
        not MEMBER_NAME.match(name)
        or file != f"members/{name}/{Path(file).name}"
        or (Path(file).name not in MEMBER_FILES)
    ):
        raise DataError(f"member {name!r}: bad entry {file!r}", file=str(path), rule="member_file")
    if file not in archive.namelist():
        raise DataError(
            f"member {name!r}: {file} is named in {SPEC_FILE} but not in the zip; "
            "rebuild the ensemble stage",
            file=str(path),
            rule="member_present",
        )
    return archive.read(file)
