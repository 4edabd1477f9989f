"""Atomic file writes: a failed write never leaves a half-written file (used by the model
when it saves its preprocessor or contract, and by every pipeline stage via ``stages.common.io``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The file names of what the pipeline hands from stage to stage and the model ships, defined once.
PREPROCESSOR_FILE = "preprocessor.joblib"  # the fitted preprocessor: features -> data/features/
NETWORK_FILE = "model.pt"  # the best checkpoint: train -> models/
ENSEMBLE_FILE = "model.ensemble.zip"  # the fused members and their weights: ensemble -> ensemble/
ONNX_MODEL_FILE = "model.int8.onnx"  # int8, its meta inside: compress -> compact/quantize/
GBDT_FILE = "model.skops"  # the best gbdt: train -> models/ (a network goes to model.pt)
# What a model folder holds (one of them): train writes model.pt or model.skops into models/,
# the ensemble stage model.ensemble.zip into ensemble/, compress model.pt or model.int8.onnx.
MODEL_FILES = (NETWORK_FILE, GBDT_FILE, ENSEMBLE_FILE, ONNX_MODEL_FILE)


def model_file(model_dir: str | Path) -> Path:
    """The model file in ``model_dir`` (a model folder holds exactly one of :data:`MODEL_FILES`).

    Raises:
        DataError: none of them there, or more than one (a folder not written by the pipeline).
    """
    from model.errors import DataError

    model_dir = Path(model_dir)
    found = [model_dir / name for name in MODEL_FILES if (model_dir / name).is_file()]
    if len(found) != 1:
        what = "no trained model" if not found else "more than one trained model"
        raise DataError(
            f"{what} in the folder (expected one of {', '.join(MODEL_FILES)}); run the train stage",
            file=str(model_dir),
            rule="one_model_file",
        )
    return found[0]


@contextmanager
def atomic_path(target: str | Path, keep_if_identical: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` on success.

    Works for files and directories. On an exception the temporary path is removed and
    ``target`` is left exactly as it was. With ``keep_if_identical``, a result byte-identical
    to ``target`` is dropped instead, so ``target`` keeps its modification times (DVC and
    ``make`` then see nothing new).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if keep_if_identical and same_content(tmp, target):
            return
        if target.is_dir() and not target.is_symlink():
            # A directory cannot be renamed over a non-empty one: swap via a backup name.
            backup = tmp.parent / f"{target.name}.old"
            os.replace(target, backup)
            os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def same_content(a: Path, b: Path) -> bool:
    """Whether two files, or two folders (names and bytes of every file), are identical."""
    import filecmp

    if a.is_file() and b.is_file():
        return filecmp.cmp(a, b, shallow=False)
    if not (a.is_dir() and b.is_dir()):
        return False
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(
        filecmp.cmp(a / rel, b / rel, shallow=False) for rel in files_a
    )
