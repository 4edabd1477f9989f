"""Move ``champion`` back: to the version that held it before, or to a named one, with a reason.

    python -m flows.rollback classifier --reason "v7 mislabels night shifts"
    python -m flows.rollback classifier@champion --version 5 --reason "back to the audited one"
    make rollback REASON="..." [VERSION=n] [MODEL=name] [FORCE=1]

The previous holder comes from the alias history (``stages.common.registry``: one MLflow run per
move in the ``registry-audit`` experiment of the same store); a second rollback goes further
back, not forth. The move goes through ``registry.move_alias`` like register's, so it is
recorded (kind ``rollback``, the reason, who, when). A version that does not exist, or whose
``promotion.gate`` is ``failed``, is refused unless ``--force``. The service follows: its
``RegistryFollower`` polls the alias and swaps to the new holder.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flows.lineage import open_client, resolve_tracking_uri
from stages.common import registry
from stages.common.errors import PipelineError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_ALIAS = "champion"
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

    def describe(self) -> str:
        """One line for the terminal."""
        if self.move is None:
            return f"{self.model}@{self.alias} is already v{self.to_version}: nothing moved"
        return (f"{self.model}@{self.alias}: v{self.from_version} -> v{self.to_version} "
                f"(rollback by {self.move.actor} at {self.move.time}): {self.move.reason}")


def parse_target(text: str) -> tuple[str, str]:
    """``classifier`` or ``classifier@champion`` -> (name, alias).

    Raises:
        RollbackError: another form (``classifier/3``: use ``--version``).
    """
    match = _TARGET.match(text.strip())
    if not match:
        raise RollbackError(f"{text!r}: expected <model> or <model>@<alias> (e.g. classifier "
                            "or classifier@champion); name the version with --version")
    return match["name"], match["alias"] or DEFAULT_ALIAS


def _versions(client: MlflowClient, name: str) -> list[int]:
    escaped = name.replace("'", "\\'")
    return sorted(int(v.version) for v in client.search_model_versions(f"name = '{escaped}'"))


def choose_version(client: MlflowClient, name: str, alias: str, version: str | None,
                   force: bool) -> tuple[str | None, str]:
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
        raise RollbackError(f"no registered model {name!r} (registered: "
                            f"{', '.join(names) or 'none'})") from exc
    current = registry.current_holder(client, name, alias)
    if version is None:
        version = registry.previous_holder(registry.alias_history(client, name, alias),
                                           current)
        if version is None:
            held = f"v{current}" if current else "nobody"
            raise RollbackError(f"{name}@{alias} ({held}) has no earlier holder in the alias "
                                "history; name the version: make rollback VERSION=<n> "
                                "REASON=... (or --version)")
    try:
        target = client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RollbackError(f"model {name!r} has no version {version} (versions: "
                            f"{', '.join(map(str, _versions(client, name))) or 'none'})") from exc
    if target.tags.get(registry.GATE_TAG) == "failed" and not force:
        why = target.tags.get("promotion.reason", "no reason recorded")
        raise RollbackError(f"refused: {name} v{version} failed the model gate "
                            f"({registry.GATE_TAG}=failed: {why}); to move {alias} to it "
                            "anyway add --force (make rollback ... FORCE=1)")
    return current, str(target.version)


def rollback(client: MlflowClient, name: str, alias: str, reason: str,
             version: str | None = None, force: bool = False) -> Rollback:
    """Move ``name@alias`` back (to the previous holder, or ``version``), recorded with
    ``reason``.

    Raises:
        RollbackError: see :func:`choose_version`; an empty reason.
    """
    if not reason.strip():
        raise RollbackError("a reason is required (REASON=\"...\" or --reason): it goes into "
                            "the alias history")
    current, target = choose_version(client, name, alias, version, force)
    move = registry.move_alias(client, name, alias, target, reason, kind="rollback")
    return Rollback(name, alias, current, target, move)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.rollback <model>[@alias] --reason TEXT [--version N] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.rollback", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m flows.rollback classifier --reason 'v7 is wrong at "
               "night'\n  make rollback REASON='back to the audited one' VERSION=5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="<model> or <model>@<alias> (default alias: champion)")
    parser.add_argument("--reason", required=True, help="why (recorded in the alias history)")
    parser.add_argument("--version", default=None,
                        help="the version to move to (default: the previous holder)")
    parser.add_argument("--force", action="store_true",
                        help="move even to a version whose model gate failed")
    parser.add_argument("--repo", type=Path, default=Path("."),
                        help="the project checkout (default: the current directory)")
    parser.add_argument("--params", type=Path, default=None,
                        help="params file naming the MLflow store (default: REPO/params.yaml; "
                             "env MLFLOW_TRACKING_URI overrides it)")
    args = parser.parse_args(argv)
    try:
        name, alias = parse_target(args.model)
        uri = resolve_tracking_uri(args.repo, args.params or args.repo / "params.yaml")
        done = rollback(open_client(uri), name, alias, args.reason, args.version, args.force)
    except PipelineError as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    print(done.describe())
    if done.move is not None:
        print(f"the service follows: it polls {name}@{alias} and swaps to "
              f"v{done.to_version} within serve.poll_interval_s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
