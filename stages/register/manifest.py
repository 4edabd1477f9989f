"""Recording a registered version's artifact hashes (and signing them): what register writes on
the version, what ``model.artifacts`` checks before anything of it loads. Registry-writing
code, so it stays here and does not travel with the model.

:func:`record_version` hashes every stored file of the version: the logged model folder
(``model/<path>``), checked against the hashes computed locally before upload, and the run's
``variants/`` (``variants/<path>``) only when the export stage's report vouches for them
(status ``exported`` or ``kept``, the same sha256 for every file). With export ``disabled`` (or
no variants in its report) the run's ``variants/`` are not recorded, even when an earlier export
left some: loading a variant of that version is then refused as unrecorded.
``python -m flows.artifacts record`` (a version registered before hashes were recorded, after a
person checked it) records whatever the run holds.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from model.artifacts import (
    DEFAULT_KEY_ENV,
    DIGEST_TAG,
    HASHES_CONFIG,
    MANIFEST_TAG,
    MODEL_PREFIX,
    SIGNATURE_TAG,
    VARIANTS_DIR,
    VARIANTS_PREFIX,
    ArtifactIntegrityError,
    Verification,
    canonical,
    compare,
    has_variants,
    hash_folder,
    join_problems,
    logged_hashes,
    manifest_digest,
    recorded_manifest,
    repair_hint,
    sign,
    signing_key,
    version_label,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)


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
            f"before upload ({HASHES_CONFIG}): {join_problems(problems)}; nothing "
            "recorded or signed. " + repair_hint(name, version)
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
        raise ArtifactIntegrityError(
            f"{name} v{version}: the stored files are not the ones this run produced (changed "
            f"in the artifact store between upload and recording their hashes): "
            f"{join_problems(problems)}; nothing recorded or signed. Fix: find who writes to "
            "the artifact store, then re-run register (the version stays pending, not champion)"
        )


def check_variants(
    name: str, version: str, vouched: dict[str, str], manifest: dict[str, str]
) -> None:
    """The run's stored ``variants/`` (in ``manifest``) are exactly the files export's report
    vouches for (``variants/<file> -> sha256``).

    Raises:
        ArtifactIntegrityError: naming each file that differs, is missing or is extra;
            nothing is recorded.
    """
    stored = {k: v for k, v in manifest.items() if k.startswith(VARIANTS_PREFIX)}
    if problems := compare(vouched, stored):
        raise ArtifactIntegrityError(
            f"{name} v{version}: the run's {VARIANTS_DIR}/ are not the files the export "
            f"stage's report vouches for (changed in the artifact store since): "
            f"{join_problems(problems)}; nothing recorded or signed. Fix: find who writes to "
            "the artifact store, then re-run export and register (the version stays pending, "
            "not champion)"
        )


def collect_manifest(
    name: str,
    version: str,
    run_id: str | None,
    produced: dict[str, str] | None = None,
    check: bool = True,
    variants: bool = True,
) -> dict[str, str]:
    """Hash every stored file of the version: its model folder, checked (``check``) against
    what was produced locally (:func:`check_produced`), and (``variants``) its run's
    ``variants/``."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="artifact-hashes-") as tmp:
        model = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(Path(tmp) / "model")
        )
        manifest = hash_folder(model, MODEL_PREFIX)
        if check:
            check_produced(name, version, manifest, logged_hashes(model), produced)
        if variants and run_id and has_variants(run_id):
            folder = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=VARIANTS_DIR, dst_path=str(Path(tmp) / "run")
            )
            manifest |= hash_folder(folder, VARIANTS_PREFIX)
    return manifest


def _collect_new(
    name: str,
    version: str,
    run_id: str | None,
    produced: dict[str, str] | None,
    variants: dict[str, str] | None,
) -> dict[str, str]:
    # The manifest of a version that recorded nothing yet: variants/ as export vouches for them.
    manifest = collect_manifest(name, version, run_id, produced, variants=variants != {})
    if variants is None:
        return manifest
    check_variants(name, version, variants, manifest)
    if not variants and run_id and has_variants(run_id):
        logger.warning(
            "%s v%s: run %s's %s/ not recorded: export's report does not vouch for them "
            "(disabled, none logged, or they are not of this version's model: an ensemble, "
            "a compact model); loading a variant of v%s is refused",
            name,
            version,
            run_id,
            VARIANTS_DIR,
            version,
        )
    return manifest


def record_version(
    client: MlflowClient,
    name: str,
    version: str,
    key_env: str | None = DEFAULT_KEY_ENV,
    only_run: str | None = None,
    produced: dict[str, str] | None = None,
    variants: dict[str, str] | None = None,
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
        variants: ``variants/<path> -> sha256`` export's report vouches for (register): the
            run's ``variants/`` are recorded only when they are exactly these; ``{}`` records
            none of them. None (``python -m flows.artifacts record``, after a person checked
            the version): whatever the run's ``variants/`` holds is recorded.

    Raises:
        ArtifactIntegrityError: the version already recorded other hashes than its files have;
            the stored files are not the ones produced (``produced``, the MLmodel's config) or
            not the variants export vouched for (``variants``).
    """
    key_env = key_env or DEFAULT_KEY_ENV
    key = signing_key(key_env)
    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    if only_run is not None and mv.run_id != only_run and DIGEST_TAG not in tags:
        return Verification(name, str(version), None)
    if DIGEST_TAG in tags:  # compare with what it recorded (the tags agree with each other)
        recorded = recorded_manifest(mv, None, key_env)
        expected = recorded[0] if recorded else {}
        with_variants = any(k.startswith(VARIANTS_PREFIX) for k in expected)
        manifest = collect_manifest(
            name, str(version), mv.run_id, check=False, variants=with_variants
        )
        if problems := compare(expected, manifest):
            raise ArtifactIntegrityError(
                f"{version_label(name, version)}: its files differ from the hashes it recorded: "
                f"{join_problems(problems)}; not re-recorded. " + repair_hint(name, str(version))
            )
        digest = manifest_digest(manifest)
    else:
        manifest = _collect_new(name, str(version), mv.run_id, produced, variants)
        digest = manifest_digest(manifest)
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
