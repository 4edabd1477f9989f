"""The servable model: the fitted preprocessor and the trained model (a network, or a gbdt
through :mod:`model.predictors`) as one MLflow pyfunc.

Input: a DataFrame of source rows (the contract's columns; columns the model does not use, and
any others, are ignored). Output: a DataFrame with ``prediction`` (the label value) and one
``proba_<label>`` column per class, in class order. A model logged with an input contract
(:mod:`model.contract`) ships it as the ``contract`` artifact (``contract.json``) and
its MLflow signature is derived from it, not from whichever rows the example holds.
The ``model`` package travels with the model (``code_paths``), so ``mlflow.pyfunc.load_model``
and ``mlflow models serve`` work in any process that has the pinned requirements installed
(versions registered before ``model/`` existed ship ``stages``: see :mod:`model.loading`).
The pyfunc is logged as code (MLflow models-from-code, ``model/servable_model.py``):
no ``python_model.pkl``. The sha256 of the preprocessor and the network is recorded in the
model's config (``MLmodel``) and checked before either file is loaded; the registry holds the
hashes of every file (:mod:`model.artifacts`), which the loaders check first.
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
    from mlflow.models import ModelSignature
    from mlflow.models.model import ModelInfo

    from model.predictors import Predictor
    from model.preprocess import FittedPreprocessor


PREPROCESSOR = "preprocessor"  # artifact keys inside the logged model
NETWORK = "network"
HASHES_CONFIG = "artifact_sha256"  # model_config key: {artifact key: sha256 of its file}
MODEL_CODE = "servable_model.py"  # the models-from-code file, in model/
PREDICTION = "prediction"
PROBA_PREFIX = "proba_"
# What the model needs at load time; pinned to the versions installed here.
# Contract kind -> MLflow signature type (nullable int columns: see contract_signature).
SIGNATURE_TYPES = {
    "float": "double",
    "int": "long",
    "category": "string",
    "bool": "boolean",
    "datetime": "string",
}
REQUIREMENTS = (
    "mlflow",
    "torch",
    "scikit-learn",
    "pandas",
    "numpy",
    "pyarrow",
    "cloudpickle",
    "pydantic",
    "pyyaml",
    "skops",  # loads a gbdt model file (model/gbdt.py)
    "onnxruntime",  # runs an int8 compact model (model/onnx_model.py)
)


def proba_column(label: Any) -> str:
    """The output column holding the probability of ``label``."""
    return f"{PROBA_PREFIX}{label}"


def format_predictions(proba: np.ndarray, classes: list[Any]) -> pd.DataFrame:
    """Class probabilities ``(n, n_classes)`` -> ``prediction`` + ``proba_<label>`` columns."""
    frame = pd.DataFrame(
        {PREDICTION: [classes[i] for i in proba.argmax(axis=1)]}
        if len(proba)
        else {PREDICTION: pd.Series([], dtype=object)}
    )
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
    """The loaded preprocessor and model (a network or a gbdt), ready to score raw rows."""

    preprocessor: FittedPreprocessor
    predictor: Predictor
    batch_size: int = 1024

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw feature rows -> ``prediction`` + ``proba_<label>`` columns."""
        X = self.predictor.features(self.preprocessor, frame)
        proba = self.predictor.predict_proba(X, self.batch_size)
        return format_predictions(proba, self.preprocessor.classes)


def load_scorer(
    preprocessor_path: str | Path,
    network_path: str | Path,
    device: str = "auto",
    sha256: dict[str, str] | None = None,
) -> Scorer:
    """Load the preprocessor and the trained model from their files.

    Args:
        network_path: the model file train wrote: ``model.pt`` (a network) or ``model.skops``
            (gbdt); :func:`model.predictors.load_predictor` loads either.
        sha256: ``{PREPROCESSOR: hash, NETWORK: hash}``: each file is checked before it is
            loaded (ArtifactIntegrityError on a difference).
    """
    from model.nets import select_device
    from model.predictors import load_predictor
    from model.preprocess import load_preprocessor

    expected = sha256 or {}
    _check_hash(network_path, expected.get(NETWORK))
    predictor = load_predictor(network_path)
    if predictor.is_network:
        predictor.to(select_device(device))
    return Scorer(
        load_preprocessor(preprocessor_path, sha256=expected.get(PREPROCESSOR)), predictor
    )


def _check_hash(path: str | Path, expected: str | None) -> None:
    from model.artifacts import ArtifactIntegrityError, file_sha256

    if expected is not None and (actual := file_sha256(path)) != expected:
        raise ArtifactIntegrityError(
            f"{path}: sha256 {actual} is not the {expected} the model was logged with (the "
            "file was damaged or replaced); not loaded. Fix: re-register the model"
        )


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around :class:`Scorer`; artifacts are loaded in ``load_context``."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the preprocessor, the network and (when shipped) the input contract."""
        from model.contract import CONTRACT_ARTIFACT, load_contract

        hashes = (context.model_config or {}).get(HASHES_CONFIG)  # None: logged before them
        self._scorer = load_scorer(
            context.artifacts[PREPROCESSOR], context.artifacts[NETWORK], sha256=hashes
        )
        contract_path = context.artifacts.get(CONTRACT_ARTIFACT)
        if contract_path:
            _check_hash(contract_path, (hashes or {}).get(CONTRACT_ARTIFACT))
        contract = load_contract(contract_path) if contract_path else {"columns": []}
        self._optional = [
            col["name"] for col in contract["columns"] if col.get("used", True) and col["nullable"]
        ]

    # The input schema is the logged signature; MLflow infers none from a DataFrame hint.
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Source rows -> ``prediction`` + ``proba_<label>`` DataFrame (unused columns are
        ignored, absent nullable ones are missing values; the preprocessor parses text dates
        with the format it was fitted with)."""
        frame = pd.DataFrame(model_input)
        absent = [name for name in getattr(self, "_optional", []) if name not in frame.columns]
        if absent:  # optional in the signature: a nullable column may be left out
            frame = frame.assign(**{name: np.nan for name in absent})
        return self._scorer.predict(frame)


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
    """Copy the ``model`` package (all the registered model imports) under ``dest``.

    Returns:
        ``dest/model``, the package folder to pass as a code path.
    """
    import model

    target = dest / "model"
    shutil.copytree(
        Path(model.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__")
    )
    return target


def contract_signature(contract: dict[str, Any], output: pd.DataFrame) -> ModelSignature:
    """The model signature from the input contract (not from whichever rows a split drew).

    Every contract column is an input. Unused and nullable columns are optional. A nullable
    int column is typed ``any``: MLflow's ``long`` cannot hold a missing value and its
    ``double`` refuses an int64 column, so ``any`` is what takes both a row with the value
    and a row without it (the service checks its type against the contract). A datetime
    column is ``any`` too: a request sends the source's text form, batch scoring and the gate
    send the validated timestamps, and the preprocessor parses both.
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    specs = []
    for col in contract["columns"]:
        required = bool(col.get("used", True)) and not col["nullable"]
        if col["kind"] == "int" and col["nullable"]:
            specs.append(ColSpec(AnyType(), col["name"], required=False))
        elif col["kind"] == "datetime":
            specs.append(ColSpec(AnyType(), col["name"], required=required))
        else:
            specs.append(ColSpec(SIGNATURE_TYPES[col["kind"]], col["name"], required=required))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*schema contains integer column")
        outputs = infer_signature(output).inputs
    return ModelSignature(inputs=Schema(specs), outputs=outputs)


def contract_example(rows: pd.DataFrame, contract: dict[str, Any]) -> pd.DataFrame:
    """Source rows as a request would send them: the contract's columns that ``rows`` holds,
    datetimes as text in the column's format."""
    names = [col["name"] for col in contract["columns"] if col["name"] in rows.columns]
    example = rows[names].reset_index(drop=True)
    for col in contract["columns"]:
        name = col["name"]
        if (
            col["kind"] == "datetime"
            and name in example.columns
            and pd.api.types.is_datetime64_any_dtype(example[name].dtype)
        ):
            fmt = col.get("format")
            example[name] = (
                example[name].dt.strftime(fmt)
                if fmt
                else example[name].map(lambda t: t.isoformat(), na_action="ignore")
            )
    return example


def produced_files(
    preprocessor_path: str | Path, network_path: str | Path, contract: dict[str, Any] | None = None
) -> dict[str, str]:
    """``model/<stored path> -> sha256`` of the files :func:`log_servable` uploads from local
    copies (the artifacts, the model code, the models-from-code file), hashed here before
    the upload: register refuses to record hashes of stored files that differ from these
    (``stages.register.manifest.record_version(produced=...)``)."""
    from model.artifacts import MODEL_PREFIX, file_sha256, hash_folder
    from model.contract import CONTRACT_FILE, save_contract

    files = {
        f"{MODEL_PREFIX}artifacts/{Path(preprocessor_path).name}": file_sha256(preprocessor_path),
        f"{MODEL_PREFIX}artifacts/{Path(network_path).name}": file_sha256(network_path),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if contract is not None:
            saved = save_contract(contract, Path(tmp) / CONTRACT_FILE)
            files[f"{MODEL_PREFIX}artifacts/{Path(saved).name}"] = file_sha256(saved)
        code = copy_model_code(Path(tmp) / "code")
        files |= hash_folder(code, f"{MODEL_PREFIX}code/model/")
        files[MODEL_PREFIX + MODEL_CODE] = file_sha256(code / MODEL_CODE)
    return files


def log_servable(
    preprocessor_path: str | Path,
    network_path: str | Path,
    input_example: pd.DataFrame,
    registered_model_name: str | None = None,
    name: str = "model",
    *,
    contract: dict[str, Any] | None = None,
) -> ModelInfo:
    """Log the pyfunc to the active MLflow run (and register it when a name is given).

    Args:
        preprocessor_path: the fitted ``preprocessor.joblib``.
        network_path: the trained model file: ``model.pt`` (a network's best checkpoint) or
            ``model.skops`` (gbdt).
        input_example: a few rows of the test split with all their source columns.
        registered_model_name: register a new version of this model.
        name: the logged model's name within the run.
        contract: the input contract (``model.contract.build_contract``): shipped as
            the ``contract`` artifact; the signature comes from it. None (models before
            contracts): the signature is inferred from the example's feature columns.
    """
    from model.artifacts import file_sha256
    from model.contract import CONTRACT_ARTIFACT, CONTRACT_FILE, save_contract

    scorer = load_scorer(preprocessor_path, network_path, device="cpu")
    artifacts = {PREPROCESSOR: str(preprocessor_path), NETWORK: str(network_path)}
    with tempfile.TemporaryDirectory() as tmp:
        if contract is None:
            example = input_example[scorer.preprocessor.feature_columns].reset_index(drop=True)
            signature = infer_io_signature(example, scorer.predict(example))
        else:
            example = contract_example(input_example, contract)
            signature = contract_signature(contract, scorer.predict(example))
            artifacts[CONTRACT_ARTIFACT] = str(save_contract(contract, Path(tmp) / CONTRACT_FILE))
        code = copy_model_code(Path(tmp) / "code")
        return mlflow.pyfunc.log_model(
            name=name,
            # Models-from-code: MLflow stores and runs this file; nothing is pickled.
            python_model=str(code / MODEL_CODE),
            artifacts=artifacts,
            model_config={
                HASHES_CONFIG: {key: file_sha256(path) for key, path in artifacts.items()}
            },
            # The model code imports model.servable: ship that package with it.
            code_paths=[str(code)],
            # Explicit pins: skips MLflow's requirement inference (it loads the model, ~8 s).
            pip_requirements=pip_requirements(),
            signature=signature,
            input_example=example,
            registered_model_name=registered_model_name,
        )
