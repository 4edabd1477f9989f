"""What a registered model version is made of, by hash: recorded at registration, checked
before anything of it is loaded.

At registration (``stages.register.manifest``, not shipped with the model) every file of the
version is hashed (sha256): the logged model folder (``MLmodel``, the model code,
``artifacts/preprocessor.joblib``, ``artifacts/model.pt``, ``artifacts/contract.json``...) as
``model/<path>``, and, when the export stage's report vouches for them, the ONNX variants in
its run's ``variants/`` folder as ``variants/<path>``. The sorted manifest
(path -> sha256) goes on the version as tag ``model.artifacts_manifest``, one sha256 over it as
``model.artifacts_sha256``, and, when the env var named by ``register.signing_key_env`` holds a
key, an HMAC-SHA256 of that digest as ``model.artifacts_hmac``.

Loading (:func:`verify_files`, :func:`verified_copy`) downloads the files, hashes them and
compares them with the tags (and the signature, when a key is set) before a byte of them is
unpickled or imported; a difference raises :class:`ArtifactIntegrityError`, one line naming
the model, the version, each file that differs with the expected and actual hash, and the fix.

Versions registered before hashes were recorded (no ``model.artifacts_sha256``), and models
outside the registry (``runs:/``, a local folder): with no key set they load with a warning
and show as ``unverified``; with a key set they are refused. ``python -m flows.artifacts
record models:/<name>/<version>`` records (and signs) the hashes of such a version after you
have checked it; ``verify`` checks one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from model.errors import PipelineError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

DIGEST_TAG = "model.artifacts_sha256"  # sha256 over the manifest
MANIFEST_TAG = "model.artifacts_manifest"  # JSON: {"model/<path>" | "variants/<path>": sha256}
SIGNATURE_TAG = "model.artifacts_hmac"  # HMAC-SHA256(key, digest)
DEFAULT_KEY_ENV = "MODEL_SIGNING_KEY"  # params register.signing_key_env
MODEL_PREFIX, VARIANTS_PREFIX = "model/", "variants/"
VARIANTS_DIR = "variants"  # the run's folder of ONNX variants (model.variants)
SHOWN_FILES = 3  # files named in one error message; the rest are counted
# Written by MLflow's client into every download of models:/<name>/<version> (the name and
# version, YAML): not stored with the model, so not hashed.
CLIENT_WRITTEN = ("registered_model_meta",)
HASHES_CONFIG = "artifact_sha256"  # the MLmodel config key (model.servable)
_CHUNK = 1 << 20
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


class ArtifactIntegrityError(PipelineError):
    """A model version's files (or its recorded hashes) are not what was registered."""


# --- hashing (pure) ---------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    """The sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_folder(folder: str | Path, prefix: str = "") -> dict[str, str]:
    """``prefix + relative posix path -> sha256`` of every file under ``folder``, sorted
    (but the files MLflow's client writes into a download: :data:`CLIENT_WRITTEN`)."""
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).as_posix() not in CLIENT_WRITTEN
    )
    return {prefix + p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


def canonical(manifest: dict[str, str]) -> str:
    """The manifest as the one text that is hashed and stored (sorted keys, no spaces)."""
    return json.dumps(dict(sorted(manifest.items())), sort_keys=True, separators=(",", ":"))


def manifest_digest(manifest: dict[str, str]) -> str:
    """One sha256 over the whole manifest."""
    return hashlib.sha256(canonical(manifest).encode()).hexdigest()


def sign(key: bytes, digest: str) -> str:
    """HMAC-SHA256 of the manifest's digest (hex)."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def signing_key(env_name: str | None = DEFAULT_KEY_ENV) -> bytes | None:
    """The key in env var ``env_name`` (None: unset or empty)."""
    value = os.environ.get(env_name or DEFAULT_KEY_ENV, "")
    return value.encode() if value else None


def compare(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """One description per file that differs, is missing or was not recorded (empty: same)."""
    problems = []
    for path in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(path), actual.get(path)
        if want == got:
            continue
        if got is None:
            problems.append(f"{path} missing (expected sha256 {want})")
        elif want is None:
            problems.append(f"{path} not recorded at registration (sha256 {got})")
        else:
            problems.append(f"{path} expected sha256 {want} got {got}")
    return problems


# --- what a version records -------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """The outcome of a check that passed (a failed one raises)."""

    name: str | None
    version: str | None
    digest: str | None  # None: nothing was recorded (an older version, or no registry)
    signed: bool = False  # the signature was checked against a key

    @property
    def verified(self) -> bool:
        """The files matched recorded hashes."""
        return self.digest is not None

    def describe(self) -> str:
        """For ``/version`` and logs."""
        if self.digest is None:
            return "unverified: no artifact hashes recorded for this model"
        return f"sha256 {self.digest[:16]} verified" + (", signed" if self.signed else "")


def version_label(name: str | None, version: str | None) -> str:
    """``<name> v<version>`` for messages (``this model`` outside the registry)."""
    return f"{name} v{version}" if name else "this model"


def join_problems(problems: list[str]) -> str:
    """The first :data:`SHOWN_FILES` problems joined for one line; the rest are counted."""
    more = len(problems) - SHOWN_FILES
    return "; ".join(problems[:SHOWN_FILES]) + (f"; and {more} more" if more > 0 else "")


def repair_hint(name: str | None, version: str | None, what: str = "files") -> str:
    """The repair of a version whose stored ``what`` are not what its registration recorded.

    Not "re-register it": register registers the workspace's current model, which need not
    be this version's."""
    uri = f"models:/{name}/{version}" if name else "models:/<name>/<version>"
    return (
        f"Fix: move the alias to a good version (make rollback REASON=... [VERSION=n]), or "
        f"restore v{version or '?'}'s {what} from a backup, then check: python -m "
        f"flows.artifacts verify {uri}; do not load these files"
    )


def recorded_manifest(
    mv: ModelVersion, key: bytes | None, key_env: str = DEFAULT_KEY_ENV
) -> tuple[dict[str, str], str, bool] | None:
    """The version's recorded manifest, digest and whether a signature was checked; None when
    it has none (then the caller applies the policy: see :func:`unrecorded`).

    Raises:
        ArtifactIntegrityError: the tags contradict each other (edited), or a key is set and
            the signature is missing or does not match.
    """
    tags = dict(mv.tags or {})
    who, digest = version_label(mv.name, mv.version), tags.get(DIGEST_TAG)
    if digest is None:
        return None
    try:
        manifest = json.loads(tags.get(MANIFEST_TAG, ""))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest_digest(manifest) != digest:
        raise ArtifactIntegrityError(
            f"{who}: tag {MANIFEST_TAG} is missing or does not hash to {DIGEST_TAG} "
            f"{digest[:16]} (the registry tags were edited); refused. "
            + repair_hint(mv.name, mv.version, "registry tags")
        )
    if key is None:
        return manifest, digest, False
    signature = tags.get(SIGNATURE_TAG)
    if signature is None:
        raise ArtifactIntegrityError(
            f"{who} is not signed (no {SIGNATURE_TAG} tag) and {key_env} is set, so only signed "
            f"versions load; refused. Fix: re-register it with {key_env} set, or sign it after "
            f"checking it: python -m flows.artifacts record models:/{mv.name}/"
            f"{mv.version}"
        )
    if not hmac.compare_digest(signature, sign(key, digest)):
        raise ArtifactIntegrityError(
            f"{who}: signature {SIGNATURE_TAG} does not match the key in {key_env} (signed with "
            f"another key, or its tags were edited); refused. Fix: set the key it was signed "
            f"with, or " + repair_hint(mv.name, mv.version, "registry tags").removeprefix("Fix: ")
        )
    return manifest, digest, True


def logged_hashes(folder: str | Path) -> dict[str, str] | None:
    """``model/<stored path> -> sha256`` of the artifacts whose hashes the model's ``MLmodel``
    holds (``model_config.artifact_sha256``, computed from the local files before upload by
    ``model.servable.log_servable``); None for a model logged without them."""
    import yaml

    try:
        meta = yaml.safe_load((Path(folder) / "MLmodel").read_text())
        pyfunc = meta["flavors"]["python_function"]
        hashes = (pyfunc.get("config") or {}).get(HASHES_CONFIG)
        paths = pyfunc.get("artifacts") or {}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(hashes, dict) or not hashes:
        return None
    return {
        MODEL_PREFIX + str((paths.get(key) or {}).get("path", f"artifacts/{key}")): str(h)
        for key, h in hashes.items()
    }


def unrecorded(
    name: str | None, version: str | None, key: bytes | None, key_env: str = DEFAULT_KEY_ENV
) -> Verification:
    """The policy for a model without recorded hashes: refused when a key is set, else loaded
    with a warning (``unverified``).

    Raises:
        ArtifactIntegrityError: a key is set.
    """
    who = version_label(name, version)
    where = f"models:/{name}/{version}" if name else "<model uri>"
    if key is not None:
        raise ArtifactIntegrityError(
            f"{who} has no recorded artifact hashes ({DIGEST_TAG}; registered before they were "
            f"recorded, or not a registry version) and {key_env} is set, so it is refused. "
            f"Fix: re-register it, or record and sign its hashes after checking it: "
            f"python -m flows.artifacts record {where}"
        )
    logger.warning(
        "%s has no recorded artifact hashes (%s): loading it unverified. Record "
        "them: python -m flows.artifacts record %s",
        who,
        DIGEST_TAG,
        where,
    )
    return Verification(name, version, None)


def verify_files(
    mv: ModelVersion,
    folder: str | Path,
    prefix: str = MODEL_PREFIX,
    key_env: str | None = DEFAULT_KEY_ENV,
) -> Verification:
    """Check the files in ``folder`` (the version's model folder, or its run's ``variants/``
    with ``prefix="variants/"``) against what the version recorded. Reads only; loads nothing.

    Raises:
        ArtifactIntegrityError: a file differs, is missing or was not recorded; the tags were
            edited; a key is set and the version is unsigned or signed with another key; or
            a key is set and nothing was recorded.
    """
    key_env = key_env or DEFAULT_KEY_ENV
    key = signing_key(key_env)
    recorded = recorded_manifest(mv, key, key_env)
    if recorded is None:
        if key is None and prefix == MODEL_PREFIX and logged_hashes(folder) is not None:
            # Logged by code that always records the hashes at registration: they were
            # removed (a downgrade to "unverified" by deleting tags). With a key set, every
            # unrecorded version is refused anyway (unrecorded).
            raise ArtifactIntegrityError(
                f"{version_label(mv.name, mv.version)} has no recorded artifact hashes "
                f"({DIGEST_TAG}) although its MLmodel carries {HASHES_CONFIG}: it was registered "
                f"by code that always records them, so its registry tags were removed; refused, "
                f"nothing of it was loaded. Fix: check its files, then record them again: "
                f"python -m flows.artifacts record models:/{mv.name}/{mv.version} (or "
                + repair_hint(mv.name, mv.version, "registry tags").removeprefix("Fix: ")
                + ")"
            )
        return unrecorded(mv.name, mv.version, key, key_env)
    manifest, digest, signed = recorded
    expected = {k: v for k, v in manifest.items() if k.startswith(prefix)}
    actual = hash_folder(folder, prefix)
    if prefix == VARIANTS_PREFIX and not expected and actual:
        raise ArtifactIntegrityError(
            f"{version_label(mv.name, mv.version)} recorded no {VARIANTS_DIR}/ at registration "
            f"(export was disabled, or its report did not vouch for the run's {VARIANTS_DIR}/), "
            f"so its run's {VARIANTS_DIR}/ files are not part of it: "
            f"{join_problems(sorted(actual))}; refused, nothing of them was loaded. Fix: serve "
            f"it with variant 'pyfunc'; variants come with a version registered from a train "
            f"run exported with export.enabled: true"
        )
    if problems := compare(expected, actual):
        raise ArtifactIntegrityError(
            f"{version_label(mv.name, mv.version)}: artifact files differ from the hashes "
            f"recorded at registration ({DIGEST_TAG} {digest[:16]}): {join_problems(problems)}; "
            "refused, nothing of it was loaded. " + repair_hint(mv.name, mv.version)
        )
    return Verification(str(mv.name), str(mv.version), digest, signed)


# --- the registry side (reading) ------------------------------------------------------------


def resolve(model_uri: str, client: MlflowClient | None = None) -> ModelVersion | None:
    """The registry version behind ``models:/<name>@<alias>`` or ``models:/<name>/<n>``; None
    for any other URI."""
    from mlflow import MlflowClient

    if match := _ALIAS_URI.match(model_uri):
        return (client or MlflowClient()).get_model_version_by_alias(match["name"], match["alias"])
    if match := _VERSION_URI.match(model_uri):
        return (client or MlflowClient()).get_model_version(match["name"], match["version"])
    return None


def verified_copy(
    model_uri: str,
    dst: str | Path,
    key_env: str | None = DEFAULT_KEY_ENV,
    client: MlflowClient | None = None,
) -> tuple[str, Verification]:
    """Download the model to ``dst`` and check it; load it from the returned path only.

    Returns:
        (local model folder, the verification).

    Raises:
        ArtifactIntegrityError: see :func:`verify_files`.
    """
    import mlflow

    mv = resolve(model_uri, client)
    uri = f"models:/{mv.name}/{mv.version}" if mv is not None else model_uri
    path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    if mv is None:
        return path, unrecorded(None, None, signing_key(key_env), key_env or DEFAULT_KEY_ENV)
    return path, verify_files(mv, path, MODEL_PREFIX, key_env)


def ensure_verified(model_uri: str, dst: str | Path, key_env: str | None = DEFAULT_KEY_ENV) -> str:
    """A local folder of the model to load from: ``models:/`` URIs are downloaded to ``dst``
    and checked (:func:`verified_copy`); anything else is returned as is (a local copy that
    the caller checked, e.g. :func:`serving.model.load_model`'s).

    Raises:
        ArtifactIntegrityError: see :func:`verify_files`.
    """
    if _ALIAS_URI.match(model_uri) or _VERSION_URI.match(model_uri):
        return verified_copy(model_uri, dst, key_env)[0]
    return model_uri


def verify_run_variants(
    run_id: str,
    folder: str | Path,
    key_env: str | None = DEFAULT_KEY_ENV,
    client: MlflowClient | None = None,
) -> Verification:
    """Check a run's downloaded ``variants/`` folder against every version registered from
    that run: each must have recorded the same files (a version that recorded none, export
    being disabled when it registered, refuses them).

    Raises:
        ArtifactIntegrityError: see :func:`verify_files`.
    """
    from mlflow import MlflowClient

    versions = (client or MlflowClient()).search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return unrecorded(None, None, signing_key(key_env), key_env or DEFAULT_KEY_ENV)
    checks = [verify_files(mv, folder, VARIANTS_PREFIX, key_env) for mv in versions]
    return next((c for c in checks if c.verified), checks[0])


def has_variants(run_id: str) -> bool:
    """Whether the MLflow run holds a ``variants/`` folder (the export stage's)."""
    from mlflow import MlflowClient

    return any(f.path == VARIANTS_DIR for f in MlflowClient().list_artifacts(run_id))
