"""A registered model runs the code it shipped, even where this checkout's packages of the same
names are imported (the register stage loading a champion registered by older code)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest

import stages.common.config  # noqa: F401 - this process has imported the checkout's `stages`
from model.loading import load_pyfunc, shipped_packages

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


def _old_layout_model(tmp_path: Path) -> Path:
    """A model logged with a `stages` package of its own, as versions before model/ were."""
    code = tmp_path / "src" / "stages"
    (code / "legacy").mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "legacy" / "__init__.py").write_text("")
    (code / "legacy" / "thing.py").write_text(textwrap.dedent(THING))
    (code / "legacy" / "helpers.py").write_text("FACTOR = 10\n\ndef double(x):\n    return x * 2\n")
    model_file = tmp_path / "src" / "legacy_model.py"
    model_file.write_text(textwrap.dedent(MODEL_CODE))
    out = tmp_path / "model"
    sys.path.insert(0, str(tmp_path / "src"))  # log_model runs the file once to check it
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.partition(".")[0] == "stages"}
    try:
        mlflow.pyfunc.save_model(out, python_model=str(model_file), code_paths=[str(code)])
    finally:
        for key in [k for k in sys.modules if k.partition(".")[0] == "stages"]:
            del sys.modules[key]
        sys.modules.update(hidden)
        sys.path.remove(str(tmp_path / "src"))
    return out


def test_a_model_with_its_own_stages_package_loads_and_predicts_with_its_code(
    tmp_path: Path,
) -> None:
    model_dir = _old_layout_model(tmp_path)
    assert shipped_packages(model_dir) == {"stages"}
    checkout = sys.modules["stages"]

    path_before = list(sys.path)
    with pytest.raises(Exception, match="No module named 'stages.legacy'"):
        mlflow.pyfunc.load_model(str(model_dir))  # what register did before
    sys.path[:] = path_before  # (MLflow leaves the model's code/ on sys.path)

    model = load_pyfunc(model_dir)
    out = model.predict(pd.DataFrame({"x": [1.0, 2.0]}))

    assert out["y"].tolist() == [20.0, 40.0]
    assert sys.modules["stages"] is checkout  # this process's package is back
    assert str(model_dir / "code") not in sys.path
    assert "stages.legacy.helpers" in sys.modules  # shadows nothing: kept for lazy imports
