"""Move ``champion`` back: to the version that held it before, or to a named one, with a reason.

    python -m flows.rollback classifier --reason "v7 mislabels night shifts"
    python -m flows.rollback classifier@champion --version 5 --reason "back to the audited one"
    make rollback REASON="..." [VERSION=n] [MODEL=name] [FORCE=1]

The previous holder comes from the alias history (``stages.register.registry``: one MLflow run per
move in the ``registry-audit`` experiment of the same store); a second rollback goes further
back, not forth. The move goes through ``registry.move_alias`` like register's, so it is
recorded (kind ``rollback``, the reason, who, when). A version that does not exist, or whose
``promotion.gate`` is ``failed``, is refused unless ``--force``. Before anything moves, the
target's stored files are hashed and checked against what its registration recorded
(``model.artifacts``; signed with the key in the env var params
``register.signing_key_env`` names, when set): a version whose files were replaced or damaged,
or that cannot be checked, is refused naming the files, unless ``--force`` (then it moves with
a loud warning, noted in the alias history). The service follows: its ``RegistryFollower``
polls the alias and swaps to the new holder (and refuses a version that fails its hashes).

When ``champion`` (params ``register.alias``) moves, ``compress.alias`` (``champion-compact``)
follows it (``stages.register.compact_alias``): to the new champion's compact model (its tag
``compact.version``), once that version's files pass the same check, else the alias is
deleted, audited the same way (kind ``rollback``); the output says which. A service following
a deleted alias keeps serving what it has and reports the gap (/ready 503).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flows.lineage import open_client, resolve_tracking_uri
from model import artifacts
from stages.common.config import read_yaml
from stages.common.errors import PipelineError
from stages.register import registry
from stages.register.compact_alias import follow_champion

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_ALIAS = "champion"
COMPACT_ALIAS = "champion-compact"  # params compress.alias's default
MAX_CHECK_ERROR = 300  # characters kept of an error that stopped the artifact check
_TARGET = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+))?$")


class RollbackError(PipelineError):
    """The rollback is refused: unknown model or version, a failed gate, no earlier holder."""


@dataclass(frozen=True)
class Rollback:
    """What moved (``move`` None: the version already held the alias)."""

    model: str
    alias: str
    from_version: str | None
    to_version: str
    move: registry.AliasMove | None
    warning: str | None = None  # the target's files were not verified (forced, or unrecorded)
    compact: str | None = None  # what became of the compact alias (None: not followed)

    def describe(self) -> str:
        """One line for the terminal."""
        if self.move is None:
            return f"{self.model}@{self.alias} is already v{self.to_version}: nothing moved"
        return (
            f"{self.model}@{self.alias}: v{self.from_version} -> v{self.to_version} "
            f"(rollback by {self.move.actor} at {self.move.time}): {self.move.reason}"
        )


def parse_target(text: str) -> tuple[str, str]:
    """``classifier`` or ``classifier@champion`` -> (name, alias).

    Raises:
        RollbackError: another form (``classifier/3``: use ``--version``).
    """
    match = _TARGET.match(text.strip())
    if not match:
        raise RollbackError(
            f"{text!r}: expected <model> or <model>@<alias> (e.g. classifier "
            "or classifier@champion); name the version with --version"
        )
    return match["name"], match["alias"] or DEFAULT_ALIAS


def _versions(client: MlflowClient, name: str) -> list[int]:
    escaped = name.replace("'", "\\'")
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{escaped}'"))


def choose_version(
    client: MlflowClient, name: str, alias: str, version: str | None, force: bool
) -> tuple[str | None, str]:
    """(the current holder, the version to move to), checked.

    Raises:
        RollbackError: unknown model or version; no earlier holder; a failed gate without
            ``force``.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise RollbackError(
            f"no registered model {name!r} (registered: {', '.join(names) or 'none'})"
        ) from exc
    current = registry.current_holder(client, name, alias)
    if version is None:
        version = registry.previous_holder(registry.alias_history(client, name, alias), current)
        if version is None:
            held = f"v{current}" if current else "nobody"
            raise RollbackError(
                f"{name}@{alias} ({held}) has no earlier holder in the alias "
                "history; name the version: make rollback VERSION=<n> "
                "REASON=... (or --version)"
            )
    try:
        target = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RollbackError(
            f"model {name!r} has no version {version} (versions: "
            f"{', '.join(map(str, _versions(client, name))) or 'none'})"
        ) from exc
    if target.tags.get(registry.GATE_TAG) == "failed" and not force:
        why = target.tags.get("promotion.reason", "no reason recorded")
        raise RollbackError(
            f"refused: {name} v{version} failed the model gate "
            f"({registry.GATE_TAG}=failed: {why}); to move {alias} to it "
            "anyway add --force (make rollback ... FORCE=1)"
        )
    return current, str(target.version)


def check_artifacts(
    client: MlflowClient, name: str, version: str, key_env: str | None = artifacts.DEFAULT_KEY_ENV
) -> str | None:
    """Hash version ``version``'s stored files (its model folder and its run's ``variants/``)
    against the hashes recorded at its registration, and its signature when ``key_env`` holds
    a key. Reads only; loads nothing.

    Returns:
        None when verified; a warning when the version has no recorded hashes and no key is
        set (registered before hashes were recorded: serving loads it unverified too).

    Raises:
        artifacts.ArtifactIntegrityError: a file differs, is missing or was not recorded; the
            tags were edited; a key is set and the signature is missing or wrong.
        RollbackError: the files could not be read (the artifact store is unreachable, the
            version's files are gone).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mv = client.get_model_version(name, version)
    uri = client.tracking_uri
    try:
        with tempfile.TemporaryDirectory(prefix="rollback-check-") as tmp:
            folder = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}",
                dst_path=f"{tmp}/model",
                tracking_uri=uri,
                registry_uri=uri,
            )
            if (
                artifacts.DIGEST_TAG not in (mv.tags or {})
                and artifacts.signing_key(key_env) is None
                and artifacts.logged_hashes(folder) is None
            ):
                return (
                    f"{name} v{version} has no recorded artifact hashes (registered before "
                    "they were recorded): moved unverified, as the service loads it. "
                    "Check its files, then record them: python -m flows.artifacts "
                    f"record models:/{name}/{version}"
                )
            artifacts.verify_files(mv, folder, artifacts.MODEL_PREFIX, key_env)
            if mv.run_id and any(
                f.path == artifacts.VARIANTS_DIR for f in client.list_artifacts(mv.run_id)
            ):
                variants = mlflow.artifacts.download_artifacts(
                    run_id=mv.run_id,
                    artifact_path=artifacts.VARIANTS_DIR,
                    dst_path=f"{tmp}/run",
                    tracking_uri=uri,
                )
                artifacts.verify_files(mv, variants, artifacts.VARIANTS_PREFIX, key_env)
    except (MlflowException, OSError) as exc:
        error = " ".join(str(exc).split())[:MAX_CHECK_ERROR]
        raise RollbackError(
            f"cannot check {name} v{version}'s stored files against the hashes "
            f"recorded at its registration: {type(exc).__name__}: {error}"
        ) from exc
    return None


def _refusal(exc: PipelineError) -> str:
    """What a failed artifact check found, without the check's own Fix advice."""
    found = str(exc).split(" Fix:")[0].strip()
    return re.sub(r"[;,]? *refused(, nothing of it was loaded)?\.?$", "", found).rstrip(" ;,.")


def rollback(
    client: MlflowClient,
    name: str,
    alias: str,
    reason: str,
    version: str | None = None,
    force: bool = False,
    key_env: str | None = artifacts.DEFAULT_KEY_ENV,
    compact_alias: str | None = None,
) -> Rollback:
    """Move ``name@alias`` back (to the previous holder, or ``version``), recorded with
    ``reason``, once the target's stored files match the hashes recorded at its registration
    (:func:`check_artifacts`; ``key_env``: the env var holding the signing key).
    ``compact_alias``: the alias that follows ``alias`` to its holder's compact model, or is
    deleted (:func:`follow_compact`); None: ``alias`` is not the champion's.

    Raises:
        RollbackError: see :func:`choose_version`; an empty reason; the target's files fail
            their hashes or cannot be checked (without ``force``: nothing moved).
    """
    if not reason.strip():
        raise RollbackError(
            'a reason is required (REASON="..." or --reason): it goes into the alias history'
        )
    current, target = choose_version(client, name, alias, version, force)
    warning = None
    if target != current:
        try:
            warning = check_artifacts(client, name, target, key_env)
        except PipelineError as exc:
            found = _refusal(exc)
            tampered = isinstance(exc, artifacts.ArtifactIntegrityError)
            if not force:
                repair = (
                    f"restore v{target}'s files in the artifact store from a backup and check them"
                    if tampered
                    else "make the artifact store readable and check them"
                )
                raise RollbackError(
                    f"refused: {found}; {alias} stays on "
                    f"{f'v{current}' if current else 'nobody'}, nothing moved. Fix: move it to "
                    f"a good version instead (make rollback REASON=... VERSION=<n>), or {repair}:"
                    f" python -m flows.artifacts verify models:/{name}/{target}; "
                    "to move anyway add FORCE=1 (--force)"
                ) from exc
            state = "fail their recorded hashes" if tampered else "could not be checked"
            warning = (
                f"FORCED (--force): {found}. {alias} now names a version whose files "
                f"{state}: the service refuses to load a version that fails its hashes "
                "(it keeps serving what it has, /ready turns 503) until its files are "
                "restored or the alias moves to a good version"
            )
            reason = f"{reason} [forced past a failed artifact check: {found}]"
    move = registry.move_alias(client, name, alias, target, reason, kind="rollback")
    compact = None
    if compact_alias is not None:
        compact = follow_compact(client, name, compact_alias, target, reason, key_env)
    return Rollback(name, alias, current, target, move, warning, compact)


def follow_compact(
    client: MlflowClient,
    name: str,
    compact_alias: str,
    champion: str,
    reason: str,
    key_env: str | None = artifacts.DEFAULT_KEY_ENV,
) -> str:
    """Move ``compact_alias`` to champion ``champion``'s compact model once its files pass
    :func:`check_artifacts`, else delete it (audited, kind rollback); one line saying which.
    Never raises: ``champion`` has moved; a failure is a loud line with the fix."""

    def refused(version: str) -> str | None:
        try:
            check_artifacts(client, name, version, key_env)  # (unrecorded: served unverified)
        except PipelineError as exc:
            return f"refused: {_refusal(exc)}"
        return None

    try:
        return (
            f"{name}@"
            + follow_champion(
                client, name, compact_alias, champion, kind="rollback", check=refused, note=reason
            ).describe()
        )
    except Exception as exc:  # noqa: BLE001 - the champion moved; say what is left to do
        error = " ".join(str(exc).split())[:MAX_CHECK_ERROR]
        return (
            f"WARNING: {name}@{compact_alias} could not follow v{champion}: "
            f"{type(exc).__name__}: {error}. Fix: retry, or move it by hand (make rollback "
            f"MODEL={name}@{compact_alias} VERSION=<v{champion}'s compact.version> REASON=...)"
        )


def _param(params_file: Path, section: str, key: str, default: str) -> str:
    # One string of the params file, read from its section alone (a bad other section must
    # not stop a rollback); the default when the file, section or field is absent.
    raw = read_yaml(params_file, "params file") if params_file.is_file() else {}
    part = (raw or {}).get(section) if isinstance(raw, dict) else None
    value = part.get(key) if isinstance(part, dict) else None
    return value if isinstance(value, str) and value else default


def signing_key_env(params_file: Path) -> str:
    """Params ``register.signing_key_env`` (the env var holding the artifact signing key)."""
    return _param(params_file, "register", "signing_key_env", artifacts.DEFAULT_KEY_ENV)


def compact_alias_for(params_file: Path, alias: str) -> str | None:
    """Params ``compress.alias`` when ``alias`` is the champion's (``register.alias``): the
    alias that follows it; None for another alias."""
    if alias != _param(params_file, "register", "alias", DEFAULT_ALIAS):
        return None
    return _param(params_file, "compress", "alias", COMPACT_ALIAS)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.rollback <model>[@alias] --reason TEXT [--version N] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.rollback",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m flows.rollback classifier --reason 'v7 is wrong at "
        "night'\n  make rollback REASON='back to the audited one' VERSION=5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="<model> or <model>@<alias> (default alias: champion)")
    parser.add_argument("--reason", required=True, help="why (recorded in the alias history)")
    parser.add_argument(
        "--version", default=None, help="the version to move to (default: the previous holder)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="move even to a version whose model gate failed, or whose stored "
        "files fail the hashes recorded at its registration (warns)",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=Path("."),
        help="the project checkout (default: the current directory)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="params file naming the MLflow store (default: REPO/params.yaml; "
        "env MLFLOW_TRACKING_URI overrides it)",
    )
    args = parser.parse_args(argv)
    try:
        name, alias = parse_target(args.model)
        params_file = args.params or args.repo / "params.yaml"
        uri = resolve_tracking_uri(args.repo, params_file)
        done = rollback(
            open_client(uri),
            name,
            alias,
            args.reason,
            args.version,
            args.force,
            signing_key_env(params_file),
            compact_alias_for(params_file, alias),
        )
    except PipelineError as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    if done.warning:
        print(f"rollback: WARNING: {done.warning}", file=sys.stderr)
    print(done.describe())
    if done.compact:
        print(done.compact, file=sys.stderr if done.compact.startswith("WARNING") else sys.stdout)
    if done.move is not None:
        print(
            f"the service follows: it polls {name}@{alias} and swaps to "
            f"v{done.to_version} within serve.poll_interval_s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
