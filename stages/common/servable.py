"""The servable model: the fitted preprocessor and the network as one MLflow pyfunc.

Input: a DataFrame of the raw feature columns (extra columns are ignored). Output: a DataFrame
with ``prediction`` (the label value) and one ``proba_<label>`` column per class, in class order.
The ``stages`` package travels with the model (``code_paths``), so ``mlflow.pyfunc.load_model``
and ``mlflow models serve`` work in any process that has the pinned requirements installed.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import torch
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo

    from stages.common.preprocess import FittedPreprocessor


PREPROCESSOR = "preprocessor"  # artifact keys inside the logged model
NETWORK = "network"
PREDICTION = "prediction"
PROBA_PREFIX = "proba_"
# What the model needs at load time; pinned to the versions installed here.
REQUIREMENTS = ("mlflow", "torch", "scikit-learn", "pandas", "numpy", "pyarrow", "cloudpickle",
                "pydantic", "pyyaml")


def proba_column(label: Any) -> str:
    """The output column holding the probability of ``label``."""
    return f"{PROBA_PREFIX}{label}"


def format_predictions(proba: np.ndarray, classes: list[Any]) -> pd.DataFrame:
    """Class probabilities ``(n, n_classes)`` -> ``prediction`` + ``proba_<label>`` columns."""
    frame = pd.DataFrame({PREDICTION: [classes[i] for i in proba.argmax(axis=1)]}
                         if len(proba) else {PREDICTION: pd.Series([], dtype=object)})
    for i, label in enumerate(classes):
        frame[proba_column(label)] = proba[:, i]
    return frame


def proba_matrix(predictions: pd.DataFrame, classes: list[Any]) -> np.ndarray:
    """Pick the ``proba_<label>`` columns back out, in the order of ``classes``.

    Raises:
        ValueError: the predictions are for another set of classes.
    """
    wanted = [proba_column(c) for c in classes]
    have = [col for col in predictions.columns if str(col).startswith(PROBA_PREFIX)]
    if sorted(have) != sorted(wanted):
        raise ValueError(f"the model predicts columns {have}, the data's classes need {wanted}")
    return predictions[wanted].to_numpy(dtype=np.float64)


@dataclass
class Scorer:
    """The loaded preprocessor and network, ready to score raw rows."""

    preprocessor: FittedPreprocessor
    module: torch.nn.Module
    device: torch.device
    batch_size: int = 1024

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw feature rows -> ``prediction`` + ``proba_<label>`` columns."""
        from stages.common.nets import predict_proba

        X = self.preprocessor.transform(frame)
        proba = predict_proba(self.module, X, self.device, self.batch_size)
        return format_predictions(proba, self.preprocessor.classes)


def load_scorer(preprocessor_path: str | Path, network_path: str | Path,
                device: str = "auto") -> Scorer:
    """Load the preprocessor and the checkpoint from their files."""
    from stages.common.nets import load_network, select_device
    from stages.common.preprocess import load_preprocessor

    module, _ = load_network(network_path)
    return Scorer(load_preprocessor(preprocessor_path), module, select_device(device))


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around :class:`Scorer`; artifacts are loaded in ``load_context``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the preprocessor and the network from the model's artifacts."""
        self._scorer = load_scorer(context.artifacts[PREPROCESSOR], context.artifacts[NETWORK])

    # The input schema is the logged signature; MLflow infers none from a DataFrame hint.
    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Raw feature rows -> ``prediction`` + ``proba_<label>`` DataFrame."""
        return self._scorer.predict(pd.DataFrame(model_input))


def pip_requirements() -> list[str]:
    """``name==version`` of each runtime requirement, as installed here (no local suffix)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def infer_io_signature(example: pd.DataFrame, output: pd.DataFrame) -> ModelSignature:
    """The model signature: input columns from ``example``, output columns from ``output``."""
    from mlflow.models import ModelSignature, infer_signature

    inputs = infer_signature(example).inputs  # warns if an input column is integer: useful
    with warnings.catch_warnings():
        # ...but integer labels in `prediction` are an output and are never missing.
        warnings.filterwarnings("ignore", message=r".*schema contains integer column")
        outputs = infer_signature(output).inputs
    return ModelSignature(inputs=inputs, outputs=outputs)


def copy_model_code(dest: Path) -> Path:
    """Copy ``stages/__init__.py`` + ``stages/common/`` (what the model imports) under ``dest``.

    Returns:
        ``dest/stages``, the package folder to pass as a code path.
    """
    import stages

    package = Path(stages.__file__).parent
    target = dest / "stages"
    shutil.copytree(package / "common", target / "common",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(package / "__init__.py", target / "__init__.py")
    return target


def log_servable(preprocessor_path: str | Path, network_path: str | Path,
                 input_example: pd.DataFrame, registered_model_name: str | None = None,
                 name: str = "model") -> ModelInfo:
    """Log the pyfunc to the active MLflow run (and register it when a name is given).

    Args:
        preprocessor_path: the fitted ``preprocessor.joblib``.
        network_path: the best checkpoint ``model.pt``.
        input_example: a few raw rows of the feature columns; with the model's output on
            them it gives the signature.
        registered_model_name: register a new version of this model.
        name: the logged model's name within the run.
    """
    scorer = load_scorer(preprocessor_path, network_path, device="cpu")
    example = input_example[scorer.preprocessor.feature_columns].reset_index(drop=True)
    signature = infer_io_signature(example, scorer.predict(example))
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=ClassifierModel(),
            artifacts={PREPROCESSOR: str(preprocessor_path), NETWORK: str(network_path)},
            # Unpickling the model imports stages.common.servable: ship that package with it.
            code_paths=[str(copy_model_code(Path(tmp)))],
            # Explicit pins: skips MLflow's requirement inference (it loads the model, ~8 s).
            pip_requirements=pip_requirements(),
            signature=signature,
            input_example=example,
            registered_model_name=registered_model_name,
        )
