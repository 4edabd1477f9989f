"""Loading a registered model for serving, and swapping it atomically when the registry moves.

The seam the service, batch scoring and the register stage all use::

    from serving.model import load_model
    model = load_model("models:/classifier@champion", variant="pyfunc")
    model.predict(frame)   # DataFrame of the raw feature columns -> DataFrame with
                           # ``prediction`` + ``proba_<label>`` (the pyfunc's output columns)
    model.version, model.run_id, model.name, model.alias, model.tags, model.spec

``load_model(uri, variant="pyfunc") -> LoadedModel`` resolves ``models:/<name>@<alias>`` to one
version first, so everything in the returned object (predictions, version, lineage tags) is
that version's. ``variant`` picks how the version is executed; the input contract
(``contract.json``, or one derived from the signature of a model logged before contracts),
input example and registry facts always come from the logged pyfunc. Variants are looked up in
:data:`VARIANT_LOADERS` (``name -> "module:function"``, imported on first use); a loader is
``loader(model_uri: str, variant: str) -> obj`` where ``obj.predict(frame) -> DataFrame`` and
``model_uri`` is a local copy of the model version. Add one with :func:`register_variant`, or
pass ``"module:function"`` as the variant. The built-in ``pyfunc`` variant runs the pyfunc's
own ``predict`` (our ClassifierModel directly, skipping MLflow's per-call schema enforcement:
requests are checked against the contract by :mod:`serving.payloads` and
:mod:`serving.rowcheck` before they get here).

:class:`ModelHolder` keeps the one reference the service scores with; :class:`RegistryFollower`
polls the alias and, on a change, loads the new version completely (and warms it up on its
input example) before swapping that reference, so a request that already picked the old model
finishes on it. It never swaps to a version whose input contract differs from the served one's
(``contract_differences``) unless ``allow_contract_change``. No per-request MLflow calls.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from model.artifacts import (
    DEFAULT_KEY_ENV,
    MANIFEST_TAG,
    ArtifactIntegrityError,
    ensure_verified,
    signing_key,
)
from serving.payloads import ColumnSpec, InputSpec, spec_from_contract

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.types import Schema

logger = logging.getLogger(__name__)

Predict = Callable[["pd.DataFrame"], "pd.DataFrame"]
# variant name -> "module:function" of its loader; see the module docstring for the contract.
VARIANT_LOADERS: dict[str, str] = {
    "pyfunc": "serving.model:load_pyfunc_predictor",
    "onnx": "model.variants:load_variant",  # float32
    "int8": "model.variants:load_variant",
}  # quantized
_KINDS = {
    "double": "float",
    "float": "float",
    "long": "int",
    "integer": "int",
    "boolean": "bool",
    "string": "str",
}  # MLflow DataType name -> payload kind
# pyfunc loaders of a PythonModel: models-from-code (now), cloudpickled (versions before it)
_PYTHON_MODEL_LOADERS = ("mlflow.pyfunc.loaders.code_model", "mlflow.pyfunc.model")
# Version tags the register stage sets (stages.register.content / .compact; serving imports no
# stage, so the names are repeated here): an ensemble's members, a compact model's parent.
MEMBERS_TAG = "ensemble.members"
COMPACT_PARENT_TAG = "compact.parent_version"
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class ModelLoadError(RuntimeError):
    """A model version could not be loaded for serving; the message says which and why."""


class ModelIntegrityError(ModelLoadError):
    """A version's files are not what was registered (or it is unsigned while a key is set):
    refused before anything of it was loaded (:mod:`model.artifacts`)."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One model version, ready to score. Immutable: a new version is a new object."""

    uri: str  # what was loaded: models:/<name>/<version> for registry models
    variant: str
    spec: InputSpec  # the input signature
    output_columns: tuple[str, ...]  # the output signature's columns
    predictor: Predict = field(repr=False)
    name: str | None = None
    version: str | None = None
    alias: str | None = None  # the alias it was resolved through, if any
    run_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)  # the version's tags (lineage)
    input_example: pd.DataFrame | None = field(default=None, repr=False)
    loaded_at: float = field(default_factory=time.time)
    # the input contract (model.contract): shipped, or derived from the signature
    contract: Mapping[str, Any] | None = field(default=None, repr=False)
    # the artifact check (model.artifacts.Verification.describe): "sha256 ... verified"
    integrity: str = "unverified"

    @property
    def checks_rows(self) -> bool:
        """Rows are checked against the contract (a shipped one; not one derived from an old
        model's signature, which knows no ranges or value sets)."""
        return self.contract is not None and "derived_from" not in self.contract

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw feature rows (signature columns) -> ``prediction`` + ``proba_<label>``."""
        return self.predictor(frame)

    @property
    def label(self) -> str:
        """The version as responses and metrics show it (``local`` outside the registry)."""
        return self.version or "local"

    @property
    def members(self) -> list[dict[str, Any]] | None:
        """An ensemble's members (name, source, family, sha256), from its version tag
        ``ensemble.members``; None for another model (or an unreadable tag)."""
        raw = self.tags.get(MEMBERS_TAG)
        if raw is None:
            return None
        try:
            members = json.loads(raw)
        except ValueError:
            logger.warning("%s: tag %s is not JSON: %.200s", self.uri, MEMBERS_TAG, raw)
            return None
        return members if isinstance(members, list) else None

    def describe(self) -> dict[str, Any]:
        """What ``/version`` shows: name, version, alias, run, variant, lineage tags; for an
        ensemble its ``members``, for a compact model the version it is a copy of
        (``compact_of``), each None otherwise."""
        return {
            "model_name": self.name,
            "model_version": self.version,
            "alias": self.alias,
            "members": self.members,
            "compact_of": self.tags.get(COMPACT_PARENT_TAG),
            "run_id": self.run_id,
            "variant": self.variant,
            "model_uri": self.uri,
            "loaded_at": self.loaded_at,
            "input_columns": list(self.spec.names),
            "checks_rows": self.checks_rows,
            "integrity": self.integrity,
            "output_columns": list(self.output_columns),
            "tags": dict(self.tags),
        }


def spec_from_schema(schema: Schema | None) -> InputSpec:
    """The MLflow input schema as the payload checker's :class:`InputSpec`.

    Raises:
        ModelLoadError: the model has no signature, or one without column names.
    """
    if schema is None or not schema.has_input_names():
        raise ModelLoadError(
            "the model has no column-based input signature to check "
            "requests against; log it with a signature"
        )
    return InputSpec(
        tuple(
            ColumnSpec(
                str(col.name),
                _KINDS.get(getattr(col.type, "name", ""), "any"),
                bool(getattr(col, "required", True)),
            )
            for col in schema.inputs
        )
    )


def register_variant(name: str, loader: str) -> None:
    """Make ``variant=name`` use ``loader`` (``"module:function"``, see the module docstring)."""
    VARIANT_LOADERS[name] = loader


def _variant_loader(
    variant: str, key_env: str | None = DEFAULT_KEY_ENV
) -> Callable[[str, str], Any]:
    target = VARIANT_LOADERS.get(variant, variant)
    if ":" not in target:
        raise ModelLoadError(
            f"unknown model variant {variant!r} (known: "
            f"{', '.join(VARIANT_LOADERS)}, or module:function)"
        )
    module, _, func = target.partition(":")
    try:
        loader = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"variant {variant!r}: cannot import {target}: {exc}") from exc
    # A loader that reads more files (the ONNX variants) checks them with the same key.
    if "key_env" in inspect.signature(loader).parameters:
        return functools.partial(loader, key_env=key_env)
    return loader


def load_pyfunc_predictor(
    model_uri: str, variant: str = "pyfunc", key_env: str | None = DEFAULT_KEY_ENV
) -> Any:
    """The built-in ``pyfunc`` variant: the logged pyfunc, scored without MLflow's wrapper.

    A ``models:/`` URI is downloaded and checked against its recorded hashes first; a local
    folder is taken as checked (:func:`load_model` passes its verified copy).
    """
    from model.loading import SERVING_KEEP, load_pyfunc
    from model.servable import ClassifierModel

    with tempfile.TemporaryDirectory(prefix="serving-model-") as tmp:
        # With the code it shipped: a version from before model/ ships its own `stages`.
        pyfunc = load_pyfunc(ensure_verified(model_uri, tmp, key_env), keep=SERVING_KEEP)
    inner = pyfunc.unwrap_python_model() if pyfunc.loader_module in _PYTHON_MODEL_LOADERS else None
    if isinstance(inner, ClassifierModel):
        return _DirectPredictor(inner)
    return pyfunc  # another kind of pyfunc: MLflow's predict (with its schema enforcement)


@dataclass(frozen=True)
class _DirectPredictor:
    model: Any

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.model.predict(None, frame)


def resolve_version(uri: str) -> tuple[str, ModelVersion | None, str | None]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<n>`` -> (versioned URI, version, alias).

    Any other URI (``runs:/...``, a local path) is returned as is, with no registry facts.
    """
    from mlflow import MlflowClient

    if match := _ALIAS_URI.match(uri):
        mv = MlflowClient().get_model_version_by_alias(match["name"], match["alias"])
        return f"models:/{mv.name}/{mv.version}", mv, match["alias"]
    if match := _VERSION_URI.match(uri):
        mv = MlflowClient().get_model_version(match["name"], match["version"])
        return uri, mv, None
    return uri, None, None


def load_model(
    uri: str, variant: str = "pyfunc", key_env: str | None = DEFAULT_KEY_ENV
) -> LoadedModel:
    """Load a model for serving: resolve the alias, copy the version, check its files against
    the hashes recorded at registration, load the variant.

    Args:
        uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, or any model URI.
        variant: ``pyfunc`` (default), a name in :data:`VARIANT_LOADERS`, or
            ``module:function``.
        key_env: env var holding the signing key (params ``register.signing_key_env``); when
            it is set, only versions signed with it load.

    Raises:
        ModelIntegrityError: the files differ from the recorded hashes, or the signature is
            missing or wrong (nothing of the version was loaded).
        ModelLoadError: naming the URI and what failed (registry lookup, download, signature,
            the variant's loader).
    """
    import mlflow
    from mlflow.models import Model

    from model.artifacts import unrecorded, verify_files
    from model.contract import contract_in_model_dir

    try:
        versioned, mv, alias = resolve_version(uri)
    except Exception as exc:
        raise ModelLoadError(f"{uri}: cannot resolve it in the registry: {exc}") from exc
    local = tempfile.mkdtemp(prefix="serving-model-")
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=versioned, dst_path=local)
        # Before anything of it is read: MLmodel, the model code, the pickled preprocessor.
        check = (
            verify_files(mv, path, key_env=key_env)
            if mv is not None
            else unrecorded(None, None, signing_key(key_env), key_env or DEFAULT_KEY_ENV)
        )
        meta = Model.load(path)
        contract = contract_in_model_dir(path)
        spec = (
            spec_from_contract(contract)
            if contract and "derived_from" not in contract
            else spec_from_schema(meta.get_input_schema())
        )
        outputs = meta.get_output_schema()
        example = meta.load_input_example(path)
        predictor = _variant_loader(variant, key_env)(path, variant)
    except ArtifactIntegrityError as exc:
        raise ModelIntegrityError(f"{uri}: {exc}") from exc
    except ModelLoadError as exc:
        raise ModelLoadError(f"{uri}: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(
            f"{uri}: cannot load variant {variant!r}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(local, ignore_errors=True)  # everything is in memory now
    return LoadedModel(
        uri=versioned,
        variant=variant,
        spec=spec,
        predictor=predictor.predict,
        output_columns=tuple(outputs.input_names()) if outputs is not None else (),
        name=mv.name if mv else None,
        version=str(mv.version) if mv else None,
        alias=alias,
        run_id=(mv.run_id if mv else None) or meta.run_id,
        tags={k: v for k, v in mv.tags.items() if k != MANIFEST_TAG} if mv else {},
        input_example=example if hasattr(example, "columns") else None,
        contract=contract,
        integrity=check.describe(),
    )


def warm_up(model: LoadedModel) -> None:
    """Score the input example once, so the first request is not the one paying for lazy
    initialisation (and a model that cannot score its own example is never swapped in)."""
    if model.input_example is not None:
        example = model.input_example
        model.predict(example[[name for name in model.spec.names if name in example.columns]])


# --- the atomic swap --------------------------------------------------------------------------


class ModelHolder:
    """The single reference the service scores with.

    Readers take ``holder.current`` once per request and use that object to the end; a swap
    replaces the reference in one assignment (atomic under the GIL), so nobody ever sees a
    half-loaded model and in-flight requests finish on the version they started with.
    """

    def __init__(self, model: LoadedModel | None = None) -> None:
        self._current = model

    @property
    def current(self) -> LoadedModel | None:
        """The model new requests get (None until the first load)."""
        return self._current

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` the current one; returns the previous."""
        previous, self._current = self._current, model
        return previous


class RegistryFollower:
    """Polls ``models:/<name>@<alias>`` and swaps the holder's model when the alias moves.

    Args:
        holder: where the loaded model goes.
        name, alias: the registered model and the alias to follow.
        variant: how each version is loaded (see :func:`load_model`).
        interval_s: seconds between registry checks.
        on_swap: called with (new, previous) after a swap; on_error with the failure message.
        allow_contract_change: swap to a version whose input contract differs from the served
            one's (params ``serve.allow_contract_change``); otherwise such a version is
            refused once, remembered in ``refused`` and ``last_error``, and not loaded again.
        key_env: env var holding the signing key (see :func:`load_model`). A version whose
            files differ from its recorded hashes (or unsigned while a key is set) is refused
            the same way: remembered in ``refused``, the current model keeps serving. A refusal
            holds while the version's recorded hashes (digest and signature tags) stay as they
            were: a version fixed with ``python -m flows.artifacts record`` is tried
            again.

    ``unready`` says why the version the alias names is not served (refused, or it failed to
    load; retried at each poll); None while it is. A registry that cannot be read is not that:
    the service keeps serving the alias's last known version, ready, and reports
    ``registry_error`` ("registry unreachable since ...") in ``/version`` and the logs.
    """

    def __init__(
        self,
        holder: ModelHolder,
        name: str,
        alias: str,
        variant: str = "pyfunc",
        interval_s: float = 10.0,
        on_swap: Callable[[LoadedModel, LoadedModel | None], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        allow_contract_change: bool = False,
        key_env: str | None = DEFAULT_KEY_ENV,
    ) -> None:
        self.holder, self.name, self.alias, self.variant = holder, name, alias, variant
        self.key_env = key_env
        self.interval_s, self.on_swap, self.on_error = interval_s, on_swap, on_error
        self.allow_contract_change = allow_contract_change
        self.last_error: str | None = None
        self.unready: str | None = None  # why the alias's version is not served (or None)
        self.registry_error: str | None = None  # "registry unreachable since ...", or None
        self.refused: dict[str, str] = {}  # version -> why it is not served
        self._refused_as: dict[str, tuple[str | None, str | None]] = {}  # its hash tags then
        self._unreachable_since: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool:
        """Look at the alias once; load and swap if it points at another version.

        Returns:
            True when a new version was swapped in. A failure is logged and remembered in
            ``last_error``; the current model keeps serving.
        """
        from mlflow import MlflowClient

        current = self.holder.current
        from mlflow.exceptions import MlflowException

        try:
            mv = MlflowClient().get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                self._registry_up()  # it answered: the alias (or the model) is gone
                self._report(self._gone(current, exc))
            else:
                self._registry_down(current, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - the registry is down: keep serving
            self._registry_down(current, exc)
            return False
        self._registry_up()
        version, state = str(mv.version), _hash_tags(mv)
        if current is not None and current.version == version:
            self.last_error = self.unready = None  # serving what the alias names (again)
            return False
        if version in self.refused:
            if self._refused_as.get(version) == state:
                self.last_error = self.unready = self.refused[version]  # why not served
                return False
            logger.info(
                "%s v%s: its recorded artifact hashes changed since it was refused: "
                "trying it again",
                self.name,
                version,
            )
            del self.refused[version]
            self._refused_as.pop(version, None)
        try:
            model = load_model(f"models:/{self.name}/{version}", self.variant, self.key_env)
            model = _with_alias(model, self.alias)
            if self._refuse(current, model):
                self._refused_as[version] = state
                return False
            warm_up(model)
        except ModelIntegrityError as exc:  # tampered or damaged: never load it, say why
            serving = f"still serving v{current.version}" if current else "serving nothing"
            self.refused[version] = f"refused: {exc}; {serving}"
            self._refused_as[version] = state
            self._report(self.refused[version])
            return False
        except Exception as exc:  # noqa: BLE001 - keep serving the old model, whatever broke
            self._report(f"{type(exc).__name__}: {exc}")  # (tried again at the next poll)
            return False
        previous = self.holder.swap(model)
        self.last_error = self.unready = None
        logger.info(
            "now serving %s v%s (%s) instead of %s",
            self.name,
            model.version,
            self.variant,
            f"v{previous.version}" if previous else "nothing",
        )
        if self.on_swap:
            self.on_swap(model, previous)
        return True

    def _refuse(self, current: LoadedModel | None, model: LoadedModel) -> bool:
        """True (and reported) when ``model``'s contract differs and that is not allowed."""
        from model.contract import contract_differences

        if current is None or self.allow_contract_change:
            return False
        differences = contract_differences(
            dict(current.contract) if current.contract is not None else None,
            dict(model.contract) if model.contract is not None else {"columns": []},
        )
        if not differences:
            return False
        reason = (
            f"refused {self.name} v{model.version}: its input contract differs from "
            f"v{current.version}'s ({'; '.join(differences)}); still serving "
            f"v{current.version}. To swap anyway set serve.allow_contract_change: true "
            "(or --allow-contract-change)"
        )
        self.refused[str(model.version)] = reason
        self._report(reason)
        return True

    def _gone(self, current: LoadedModel | None, exc: Exception) -> str:
        # E.g. champion-compact deleted because the champion has no compact model: the model
        # loaded keeps answering (unready, so a balancer can drain it), nothing new is loaded.
        serving = f"still serving v{current.version}" if current else "serving nothing"
        return (
            f"models:/{self.name}@{self.alias} names no version now (the alias or the model was "
            f"removed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}); {serving} "
            f"until {self.alias} is set again"
        )

    def _registry_down(self, current: LoadedModel | None, exc: Exception) -> None:
        # Not a reason to go unready: every replica would drop out of the load balancer at
        # once while each could serve. Said once in the log, kept in /version until it is back.
        from datetime import UTC, datetime

        first = self._unreachable_since is None
        if first:
            self._unreachable_since = datetime.now(UTC).isoformat(timespec="seconds")
        serving = f"still serving v{current.version}" if current else "serving nothing yet"
        self.registry_error = self.last_error = (
            f"registry unreachable since {self._unreachable_since} ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]}); {serving}"
        )
        if first:
            logger.warning(
                "cannot read models:/%s@%s: %s", self.name, self.alias, self.registry_error
            )
        if current is None and self.on_error:  # nothing served: /ready says why
            self.on_error(self.registry_error)

    def _registry_up(self) -> None:
        if self._unreachable_since is not None:
            logger.info("registry reachable again (unreachable since %s)", self._unreachable_since)
        self._unreachable_since = self.registry_error = None

    def _report(self, message: str) -> None:
        self.last_error = self.unready = message
        logger.error("cannot follow models:/%s@%s: %s", self.name, self.alias, message)
        if self.on_error:
            self.on_error(message)

    def start(self) -> None:
        """Check now and then every ``interval_s`` seconds, in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="registry-follower", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling (a load in progress is allowed to finish)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(self.interval_s)


def _hash_tags(mv: ModelVersion) -> tuple[str | None, str | None]:
    # What a refusal for the version's files depends on: recording (or signing) its hashes
    # again changes these tags, and then it is tried again.
    from model.artifacts import DIGEST_TAG, SIGNATURE_TAG

    tags = dict(mv.tags or {})
    return tags.get(DIGEST_TAG), tags.get(SIGNATURE_TAG)


def _with_alias(model: LoadedModel, alias: str) -> LoadedModel:
    from dataclasses import replace

    return replace(model, alias=alias)
