"""A preprocessor pickled by older code names a class path that no longer exists (the features
stage wrote ``stages.common.preprocess.FittedPreprocessor`` before ``model/``): loading it says
so and how to rebuild it, not that the file is unreadable (review A6)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import joblib
import pytest

import model.preprocess
from model.errors import DataError
from model.preprocess import load_preprocessor


def _pickle_as(module: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A joblib file of an object pickled as ``<module>.OldPreprocessor`` (a class that stands
    in for the old FittedPreprocessor), after which that class path is gone."""
    old = type("OldPreprocessor", (), {"__module__": module})
    parts = module.split(".")
    for name in (".".join(parts[: i + 1]) for i in range(len(parts))):
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules[module], "OldPreprocessor", old, raising=False)
    path = tmp_path / "preprocessor.joblib"
    joblib.dump(old(), path)
    monkeypatch.undo()  # the class path is gone again, as after the move
    return path


def test_a_preprocessor_whose_module_no_longer_exists_says_rerun_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _pickle_as("stages_gone.common.preprocess", tmp_path, monkeypatch)

    with pytest.raises(DataError, match="older version of the code") as err:
        load_preprocessor(path)

    assert "dvc repro features" in str(err.value)
    assert "stages_gone" in str(err.value)  # which module it looked for
    assert err.value.rule == "code_version"


def test_a_preprocessor_whose_class_no_longer_exists_says_rerun_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _pickle_as(model.preprocess.__name__, tmp_path, monkeypatch)

    with pytest.raises(DataError, match="older version of the code.*dvc repro features"):
        load_preprocessor(path)


def test_a_damaged_file_is_still_not_a_readable_joblib_file(tmp_path: Path) -> None:
    path = tmp_path / "preprocessor.joblib"
    path.write_bytes(b"not a pickle")

    with pytest.raises(DataError, match="not a readable joblib file"):
        load_preprocessor(path)
