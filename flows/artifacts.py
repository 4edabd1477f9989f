"""``python -m flows.artifacts {verify,record} MODEL_URI``: check a registered version's files
against the hashes recorded at registration, or record (and sign, when the key is set) them.

The checks are ``model.artifacts``, the recording ``stages.register.manifest``; this is the
command line, with the MLflow store and the signing key's env var from ``params.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from typing import TYPE_CHECKING

import mlflow

from model.artifacts import (
    MANIFEST_TAG,
    VARIANTS_DIR,
    VARIANTS_PREFIX,
    has_variants,
    resolve,
    verified_copy,
    verify_files,
)
from stages.common.config import load_params
from stages.common.errors import PipelineError
from stages.common.tracking import tracking_uri
from stages.register.manifest import record_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)


def _checks_variants(mv: ModelVersion) -> bool:
    # The run's variants/ are part of the version when it recorded them; one that recorded
    # hashes but no variants/ (export disabled) is the pyfunc alone, and loading a variant of
    # it is refused. Without recorded hashes the unrecorded policy applies to them too.
    if not mv.run_id:
        return False
    manifest = (mv.tags or {}).get(MANIFEST_TAG)
    return manifest is None or VARIANTS_PREFIX in manifest


def main(argv: list[str] | None = None) -> int:
    """Verify or record MODEL_URI's hashes; prints one line, exits 1 on a problem."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.artifacts",
        description="Check a registered model version's files against the hashes recorded at "
        "registration, or record (and sign, when the key is set) them.",
    )
    parser.add_argument("command", choices=("verify", "record"))
    parser.add_argument("model_uri", help="models:/<name>/<version> or models:/<name>@<alias>")
    parser.add_argument("--params", default="params.yaml", help="pipeline parameters file")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        mlflow.set_tracking_uri(tracking_uri(params.mlflow))
        key_env = params.register.signing_key_env
        mv = resolve(args.model_uri)
        if mv is None:
            raise PipelineError(
                f"{args.model_uri}: not a registry version URI "
                "(models:/<name>/<version> or models:/<name>@<alias>)"
            )
        if args.command == "record":
            result = record_version(mlflow.MlflowClient(), mv.name, str(mv.version), key_env)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                _, result = verified_copy(f"models:/{mv.name}/{mv.version}", tmp, key_env)
                if _checks_variants(mv) and has_variants(mv.run_id):
                    folder = mlflow.artifacts.download_artifacts(
                        run_id=mv.run_id, artifact_path=VARIANTS_DIR, dst_path=tmp + "/run"
                    )
                    verify_files(mv, folder, VARIANTS_PREFIX, key_env)
    except PipelineError as exc:
        logger.error("%s", exc)
        return 1
    print(f"{result.name} v{result.version}: {result.describe()}")  # noqa: T201 - the command's answer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
