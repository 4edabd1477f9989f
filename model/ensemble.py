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

:func:`fuse` is the one fusion code: the ensemble stage fits weights or the stacking model on
validation probabilities through it, and :class:`EnsemblePredictor` predicts through it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.errors import DataError
from model.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from model.predictors import Predictor
    from model.preprocess import FittedPreprocessor

FORMAT = 1  # bump when what ensemble.json holds changes
SPEC_FILE = "ensemble.json"
FAMILY = "ensemble"
METHODS = ("mean", "vote", "weighted", "caruana", "stacking")
MEMBER_FILES = ("model.pt", "model.skops")  # what train (and stages.train.members) writes
NATIVE, ENCODED = "native", "encoded"  # the preprocessor's view a member scores
# vote: (1 - share) x vote share + share x mean probability. The mean term breaks ties and
# keeps every probability inside (0, 1) (log loss stays finite); it is capped below
# 1 / (members + 1) so it can never outweigh one vote: the argmax is always the majority class.
VOTE_MEAN_SHARE = 0.1
_WEIGHT_TOLERANCE = 1e-6
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# --- fusion (pure) ------------------------------------------------------------------------------


def stacking_features(probas: list[np.ndarray]) -> np.ndarray:
    """The stacking model's input: members' probabilities side by side, member-major
    (``[m0 class 0..k-1, m1 class 0..k-1, ...]``, shape ``(n, members * k)``). Fit the
    LogisticRegression on exactly this (class ids 0..k-1 as targets)."""
    _check_probas(probas)
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in probas], axis=1)


def stacking_from_sklearn(lr: Any) -> dict[str, Any]:
    """A fitted sklearn LogisticRegression -> the stored ``{coef, intercept, classes}`` (lists;
    a binary model keeps its one coefficient row). No sklearn object is kept.

    Raises:
        ValueError: it was fitted on labels rather than class ids (0..k-1).
    """
    classes = np.asarray(lr.classes_)
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"fit the stacking model on class ids 0..k-1, not labels {classes[:5]}")
    return {
        "coef": np.asarray(lr.coef_, dtype=np.float64).tolist(),
        "intercept": np.asarray(lr.intercept_, dtype=np.float64).tolist(),
        "classes": [int(c) for c in classes],
    }


def fuse(
    probas: list[np.ndarray],
    method: str,
    weights: list[float] | None = None,
    stacking: dict[str, Any] | None = None,
) -> np.ndarray:
    """Fuse the members' ``(n, k)`` probabilities (one array per member, member order) into one
    ``(n, k)`` float64 array.

    mean: the average. weighted, caruana: ``sum w_i p_i`` (weights >= 0, one per member, sum 1).
    vote: each member's argmax is one vote; :data:`VOTE_MEAN_SHARE` of the mean mixed in.
    stacking: softmax (sigmoid for a binary model) of ``stacking_features(probas) @ coef.T +
    intercept``; a class the stacking model never saw gets 0.

    Raises:
        ValueError: no members, unequal or non-2-D shapes, an unknown method, weights or
            stacking coefficients that do not fit the method, the members or the classes.
    """
    _check_probas(probas)
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in probas])  # (m, n, k)
    m, n, k = stack.shape
    check_fusion(method, m, k, weights, stacking)
    if method == "mean":
        return stack.mean(axis=0)
    if method in ("weighted", "caruana"):
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), stack, axes=1)
    if method == "vote":
        share = min(VOTE_MEAN_SHARE, 0.5 / (m + 1))
        votes = np.zeros((n, k))
        for member in stack:
            votes[np.arange(n), member.argmax(axis=1)] += 1.0
        return (1.0 - share) * votes / m + share * stack.mean(axis=0)
    assert stacking is not None  # check_fusion
    coef, intercept = np.asarray(stacking["coef"]), np.asarray(stacking["intercept"])
    classes = stacking.get("classes") or list(range(k))
    z = stacking_features(probas) @ coef.T + intercept
    if coef.shape[0] == 1:  # binary: sklearn's sigmoid of one logit, for classes[1]
        one = 1.0 / (1.0 + np.exp(-z[:, 0]))
        fitted = np.stack([1.0 - one, one], axis=1)
    else:
        z -= z.max(axis=1, keepdims=True)
        fitted = np.exp(z)
        fitted /= fitted.sum(axis=1, keepdims=True)
    out = np.zeros((n, k))
    out[:, classes] = fitted
    return out


def check_fusion(
    method: str,
    n_members: int,
    n_classes: int,
    weights: list[float] | None = None,
    stacking: dict[str, Any] | None = None,
) -> None:
    """Check that ``weights``/``stacking`` fit ``method``, the members and the classes.

    Raises:
        ValueError: what is wrong, and what was expected.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r} (expected one of {', '.join(METHODS)})")
    if (weights is not None) != (method in ("weighted", "caruana")):
        raise ValueError(f"method {method!r}: weights are for weighted/caruana (got {weights})")
    if (stacking is not None) != (method == "stacking"):
        raise ValueError(f"method {method!r}: stacking coefficients are for stacking only")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (n_members,) or not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights {list(weights)}: need {n_members} finite values >= 0")
        if abs(w.sum() - 1.0) > _WEIGHT_TOLERANCE:
            raise ValueError(f"weights {list(weights)} sum to {w.sum():.6g}; normalise them to 1")
    if stacking is not None:
        _check_stacking(stacking, n_members, n_classes)


def _check_stacking(stacking: dict[str, Any], n_members: int, n_classes: int) -> None:
    try:
        coef = np.asarray(stacking["coef"], dtype=np.float64)
        intercept = np.asarray(stacking["intercept"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"stacking needs numeric 'coef' and 'intercept' lists ({exc})") from exc
    classes = stacking.get("classes") or list(range(n_classes))
    if sorted(set(classes)) != list(classes) or not all(0 <= c < n_classes for c in classes):
        raise ValueError(f"stacking classes {classes}: sorted distinct class ids < {n_classes}")
    if len(classes) < 2:
        raise ValueError(f"stacking classes {classes}: a model of at least 2 classes")
    # one row per class (softmax); a binary model may keep sklearn's one row (sigmoid)
    rows = 1 if len(classes) == 2 and len(coef) == 1 else len(classes)
    width = n_members * n_classes
    if coef.shape != (rows, width) or intercept.shape != (rows,):
        raise ValueError(
            f"stacking coef {coef.shape} / intercept {intercept.shape}: expected ({rows}, "
            f"{width}) / ({rows},) for {len(classes)} classes and {n_members} members x "
            f"{n_classes} probabilities (stacking_features' layout)"
        )
    if not (np.isfinite(coef).all() and np.isfinite(intercept).all()):
        raise ValueError("stacking coefficients must be finite")


def _check_probas(probas: list[np.ndarray]) -> None:
    if not len(probas):
        raise ValueError("fusion needs at least one member's probabilities")
    shapes = {np.shape(p) for p in probas}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"members' probabilities must all be (n, k) of one shape; got {shapes}")


# --- the predictor ------------------------------------------------------------------------------


def member_view(meta: dict[str, Any]) -> str:
    """The view of the rows a member scores: :data:`NATIVE` (a gbdt on the tree view) or
    :data:`ENCODED` (``FittedPreprocessor.transform``)."""
    from model.gbdt import uses_native_inputs

    return NATIVE if uses_native_inputs(meta) else ENCODED


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
        if not _NAME.match(name) or name in blobs:
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
        not _NAME.match(name)
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
