"""What a registered model version is made of, by hash: recorded at registration, checked
before anything of it is loaded.

At registration (:func:`record_version`) every file of the version is hashed (sha256): the
logged model folder (``MLmodel``, the model code, ``artifacts/preprocessor.joblib``,
``artifacts/model.pt``, ``artifacts/contract.json``...) as ``model/<path>``, and the ONNX
variants in its run's ``variants/`` folder as ``variants/<path>``. The sorted manifest
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
import tempfile
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


def _who(name: str | None, version: str | None) -> str:
    return f"{name} v{version}" if name else "this model"


def _fix(name: str | None, version: str | None, what: str = "files") -> str:
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
    who, digest = _who(mv.name, mv.version), tags.get(DIGEST_TAG)
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
            + _fix(mv.name, mv.version, "registry tags")
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
            f"with, or " + _fix(mv.name, mv.version, "registry tags").removeprefix("Fix: ")
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
    who = _who(name, version)
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
                f"{_who(mv.name, mv.version)} has no recorded artifact hashes ({DIGEST_TAG}) "
                f"although its MLmodel carries {HASHES_CONFIG}: it was registered by code that "
                f"always records them, so its registry tags were removed; refused, nothing of "
                f"it was loaded. Fix: check its files, then record them again: python -m "
                f"flows.artifacts record models:/{mv.name}/{mv.version} (or "
                + _fix(mv.name, mv.version, "registry tags").removeprefix("Fix: ")
                + ")"
            )
        return unrecorded(mv.name, mv.version, key, key_env)
    manifest, digest, signed = recorded
    expected = {k: v for k, v in manifest.items() if k.startswith(prefix)}
    problems = compare(expected, hash_folder(folder, prefix))
    if problems:
        shown = "; ".join(problems[:SHOWN_FILES])
        more = f"; and {len(problems) - SHOWN_FILES} more" if len(problems) > SHOWN_FILES else ""
        raise ArtifactIntegrityError(
            f"{_who(mv.name, mv.version)}: artifact files differ from the hashes recorded at "
            f"registration ({DIGEST_TAG} {digest[:16]}): {shown}{more}; refused, nothing of it "
            f"was loaded. " + _fix(mv.name, mv.version)
        )
    return Verification(str(mv.name), str(mv.version), digest, signed)


# --- the registry side ------------------------------------------------------------------------


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
    that run (each recorded the same files).

    Raises:
        ArtifactIntegrityError: see :func:`verify_files`.
    """
    from mlflow import MlflowClient

    versions = (client or MlflowClient()).search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return unrecorded(None, None, signing_key(key_env), key_env or DEFAULT_KEY_ENV)
    checks = [verify_files(mv, folder, VARIANTS_PREFIX, key_env) for mv in versions]
    return next((c for c in checks if c.verified), checks[0])


def check_produced(
    name: str,
    version: str,
    manifest: dict[str, str],
    logged: dict[str, str] | None,
    produced: dict[str, str] | None,
) -> None:
    """The stored files are the ones produced locally before upload: the artifacts hash as
    the ``MLmodel`` config says (computed before upload), and every file of ``produced`` (the
    local copy: :func:`model.servable.produced_files`) is stored unchanged, with no
    other model code beside it.

    Raises:
        ArtifactIntegrityError: naming each file that differs; nothing is recorded.
    """
    problems = compare(logged, {k: v for k, v in manifest.items() if k in logged}) if logged else []
    if problems and not produced:  # (python -m flows.artifacts record)
        raise ArtifactIntegrityError(
            f"{name} v{version}: stored artifact(s) differ from the sha256 its MLmodel recorded "
            f"before upload ({HASHES_CONFIG}): {'; '.join(problems[:SHOWN_FILES])}; nothing "
            "recorded or signed. " + _fix(name, version)
        )
    if produced:
        code = (f"{MODEL_PREFIX}code/",)
        stored = {
            k: v
            for k, v in manifest.items()
            if k in produced or (k.startswith(code) and "/__pycache__/" not in k)
        }
        problems += [p for p in compare(produced, stored) if p not in problems]
    if problems:
        shown = "; ".join(problems[:SHOWN_FILES])
        more = f"; and {len(problems) - SHOWN_FILES} more" if len(problems) > SHOWN_FILES else ""
        raise ArtifactIntegrityError(
            f"{name} v{version}: the stored files are not the ones this run produced (changed "
            f"in the artifact store between upload and recording their hashes): {shown}{more}; "
            "nothing recorded or signed. Fix: find who writes to the artifact store, then "
            "re-run register (the version stays pending, not champion)"
        )


def collect_manifest(
    name: str,
    version: str,
    run_id: str | None,
    produced: dict[str, str] | None = None,
    check: bool = True,
) -> dict[str, str]:
    """Hash every stored file of the version: its model folder and its run's ``variants/``,
    checked (``check``) against what was produced locally (:func:`check_produced`)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="artifact-hashes-") as tmp:
        model = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(Path(tmp) / "model")
        )
        manifest = hash_folder(model, MODEL_PREFIX)
        if check:
            check_produced(name, version, manifest, logged_hashes(model), produced)
        if run_id and has_variants(run_id):
            variants = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=VARIANTS_DIR, dst_path=str(Path(tmp) / "run")
            )
            manifest |= hash_folder(variants, VARIANTS_PREFIX)
    return manifest


def has_variants(run_id: str) -> bool:
    from mlflow import MlflowClient

    return any(f.path == VARIANTS_DIR for f in MlflowClient().list_artifacts(run_id))


def record_version(
    client: MlflowClient,
    name: str,
    version: str,
    key_env: str | None = DEFAULT_KEY_ENV,
    only_run: str | None = None,
    produced: dict[str, str] | None = None,
) -> Verification:
    """Hash the version's stored files and tag it (manifest, digest, signature when a key is
    set). Idempotent: a version that already recorded hashes is checked against them instead
    (and signed if a key is set and it is not yet), never re-recorded.

    Args:
        only_run: record only a version registered from this run (the register stage's own);
            another run's version without hashes is left as it is (the policy for unrecorded
            versions applies when it is loaded).
        produced: ``model/<path> -> sha256`` of the files as produced locally before upload
            (:func:`model.servable.produced_files`): a stored file that differs is
            refused, never recorded or signed.

    Raises:
        ArtifactIntegrityError: the version already recorded other hashes than its files have;
            the stored files are not the ones produced (``produced``, the MLmodel's config).
    """
    key_env = key_env or DEFAULT_KEY_ENV
    key = signing_key(key_env)
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    if only_run is not None and mv.run_id != only_run and DIGEST_TAG not in tags:
        return Verification(name, str(version), None)
    manifest = collect_manifest(
        name, str(version), mv.run_id, produced, check=DIGEST_TAG not in tags
    )  # else: compared below
    digest = manifest_digest(manifest)
    if DIGEST_TAG in tags:
        recorded = recorded_manifest(mv, None, key_env)  # the tags agree with each other
        problems = compare(recorded[0] if recorded else {}, manifest)
        if problems:
            raise ArtifactIntegrityError(
                f"{_who(name, version)}: its files differ from the hashes it recorded: "
                f"{'; '.join(problems[:SHOWN_FILES])}; not re-recorded. " + _fix(name, str(version))
            )
    else:
        client.set_model_version_tag(name, str(version), MANIFEST_TAG, canonical(manifest))
        client.set_model_version_tag(name, str(version), DIGEST_TAG, digest)
    signed = key is not None
    if signed and SIGNATURE_TAG not in tags:
        client.set_model_version_tag(name, str(version), SIGNATURE_TAG, sign(key, digest))
    elif signed:  # already signed: it must be with this key
        recorded_manifest(client.get_model_version(name, str(version)), key, key_env)
    logger.info(
        "%s v%s: %d artifact file(s) recorded, sha256 %s%s",
        name,
        version,
        len(manifest),
        digest[:16],
        ", signed" if signed else "",
    )
    return Verification(name, str(version), digest, signed)
