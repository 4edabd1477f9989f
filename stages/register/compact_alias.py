"""``compress.alias`` (``champion-compact``) follows ``champion``: it names the compact model OF
the current champion, or nothing.

A service started with ``--alias champion-compact`` must never serve the smaller copy of a
model that is no longer champion (after a rollback, or a new champion whose compress stage
chose none, was disabled, or whose compact failed its serving check). So each time
``champion`` is decided (register) or moved (``flows.rollback``), :func:`follow_champion` moves
the alias to the champion's compact (the version its tag ``compact.version`` names, when that
version passed: ``promotion.gate: passed``, and names the champion as its parent), else deletes
it. Both go through ``stages.register.registry`` (the audit log; a deletion is an entry with
``to_version`` ``none``).

A service following a deleted alias keeps serving the model it loaded and reports the gap
(``serving.model.RegistryFollower``: ``/ready`` 503 with the reason, ``/version``
``last_error``); a fresh start on it fails loudly, rather than serve a stale copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.model import COMPACT_PARENT_TAG
from stages.register import registry

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_TAG = COMPACT_PARENT_TAG  # on a compact model: its parent's version (/version compact_of)
LINK_TAG = "compact.version"  # on a parent: its compact's version


@dataclass(frozen=True)
class Followed:
    """What became of the compact alias: ``before`` -> ``after`` (None: not set), the entry
    (None: nothing moved) and why."""

    alias: str
    before: str | None
    after: str | None
    move: registry.AliasMove | None
    why: str

    def describe(self) -> str:
        """One line: ``champion-compact v2 -> nothing (removed): ...``."""
        source = f"v{self.before}" if self.before else "nothing"
        if self.move is None:
            return f"{self.alias} stays on {source}: {self.why}"
        target = f"v{self.after}" if self.after else "nothing (removed)"
        return f"{self.alias} {source} -> {target}: {self.why}"


def compact_of(client: MlflowClient, model: str, parent: str) -> tuple[str | None, str]:
    """(the version of ``parent``'s compact model, or None; why)."""
    from mlflow.exceptions import MlflowException

    linked = (client.get_model_version(model, parent).tags or {}).get(LINK_TAG)
    if not linked:
        return None, f"v{parent} has no compact model (no {LINK_TAG} tag)"
    try:
        compact = client.get_model_version(model, linked)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None, f"v{parent}'s compact v{linked} no longer exists"
    tags = compact.tags or {}
    if tags.get(PARENT_TAG) != str(parent):
        return None, f"v{linked} ({LINK_TAG} of v{parent}) names v{tags.get(PARENT_TAG)} as parent"
    if tags.get(registry.GATE_TAG) != "passed":
        gate = tags.get(registry.GATE_TAG)
        return None, f"v{parent}'s compact v{linked} is not servable ({registry.GATE_TAG}: {gate})"
    return str(linked), f"the compact of champion v{parent}"


def follow_champion(
    client: MlflowClient,
    model: str,
    alias: str,
    champion: str | None,
    *,
    kind: str,
    caused_by_run: str | None = None,
    check: Callable[[str], str | None] | None = None,
    note: str | None = None,
) -> Followed:
    """Point ``model@alias`` at champion ``champion``'s compact model, or delete it when it has
    none (or there is no champion), through the audited registry.

    Args:
        kind: who moves it (``register``, ``rollback``), for the audit log.
        check: called with the compact's version before the alias moves to it; a returned
            problem (its files fail their hashes...) deletes the alias instead.
        note: why the champion moved (a rollback's reason), added to the audit entry.

    Raises:
        MlflowException: the registry could not be read or written.
    """
    before = registry.current_holder(client, model, alias)
    target, why = (
        compact_of(client, model, champion) if champion else (None, "there is no champion")
    )
    if target not in (None, before) and check is not None and (problem := check(target)):
        why = f"champion v{champion}'s compact v{target}: {problem}"
        target = None
    reason = f"removed: {why}; {alias} names only a compact of the champion" if not target else why
    if note:
        reason = f"{reason} (champion moved: {note})"
    move = registry.move_alias(
        client, model, alias, target, reason, caused_by_run=caused_by_run, kind=kind
    )
    return Followed(alias, before, target, move, reason if move is not None else why)
