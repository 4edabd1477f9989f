"""A model whose code ships a ``stages`` package of its own, as every version registered before
the ``model`` package existed did (``code/stages/common/servable.py``): its modules live under a
package name that this checkout's ``stages`` also uses, without the same modules.

Shared by ``tests/model/test_loading.py`` (a local folder) and the serving tests (a registered
version loaded the way the service and batch scoring load it).
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature

MODEL_CODE = """
from mlflow.models import set_model

from stages.legacy.thing import LegacyModel

set_model(LegacyModel())
"""

THING = """
import mlflow.pyfunc
import pandas as pd


class LegacyModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from stages.legacy import helpers  # loaded with the model

        self.factor = helpers.FACTOR

    def predict(self, context, model_input, params=None):
        from stages.legacy.helpers import double  # a lazy import at predict time

        return pd.DataFrame({"y": double(model_input["x"]) * self.factor})
"""

HELPERS = "FACTOR = 10\n\ndef double(x):\n    return x * 2\n"

# x -> 20 * x: what the legacy model answers (double, times FACTOR)
SIGNATURE = infer_signature(pd.DataFrame({"x": [1.0]}), pd.DataFrame({"y": [20.0]}))


def _write_code(root: Path) -> tuple[Path, Path]:
    """(the models-from-code file, the ``stages`` folder it ships) under ``root/src``."""
    code = root / "src" / "stages"
    (code / "legacy").mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "legacy" / "__init__.py").write_text("")
    (code / "legacy" / "thing.py").write_text(textwrap.dedent(THING))
    (code / "legacy" / "helpers.py").write_text(HELPERS)
    model_file = root / "src" / "legacy_model.py"
    model_file.write_text(textwrap.dedent(MODEL_CODE))
    return model_file, code


@contextmanager
def _as_its_logger_saw_it(src: Path) -> Iterator[None]:
    """MLflow runs the model file once while logging it: let it see the model's own
    ``stages`` (as the old code did), then put this process's modules and path back."""
    sys.path.insert(0, str(src))
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.partition(".")[0] == "stages"}
    try:
        yield
    finally:
        for key in [k for k in sys.modules if k.partition(".")[0] == "stages"]:
            del sys.modules[key]
        sys.modules.update(hidden)
        sys.path.remove(str(src))


def forget_legacy_modules() -> None:
    """Drop the legacy model's modules that a load left in ``sys.modules`` (they stay there
    for its lazy imports), so the next test sees a process that never loaded it."""
    for key in [k for k in sys.modules if k == "stages.legacy" or k.startswith("stages.legacy.")]:
        del sys.modules[key]


def save_old_layout_model(tmp_path: Path) -> Path:
    """A local model folder logged with a ``stages`` package of its own."""
    model_file, code = _write_code(tmp_path)
    out = tmp_path / "model"
    with _as_its_logger_saw_it(model_file.parent):
        mlflow.pyfunc.save_model(
            out, python_model=str(model_file), code_paths=[str(code)], signature=SIGNATURE
        )
    return out


def log_old_layout_model(tmp_path: Path, registered_model_name: str) -> Any:
    """Log + register an old-layout model in the current tracking store (its ModelInfo)."""
    model_file, code = _write_code(tmp_path)
    with _as_its_logger_saw_it(model_file.parent), mlflow.start_run():
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(model_file),
            code_paths=[str(code)],
            signature=SIGNATURE,
            registered_model_name=registered_model_name,
        )
