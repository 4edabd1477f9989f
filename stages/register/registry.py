"""Every alias move of the model registry, and its append-only history.

``move_alias`` is the one way the pipeline moves an alias (register's ``champion`` and
``challenger``, ``flows.rollback``). Each move is one MLflow run in the experiment
``registry-audit`` of the same store, so a remote tracking server keeps the history beside the
registry it describes. The entry is written before the alias moves, as params (MLflow refuses to
change a logged param: the entry cannot be edited) and tags (to search); the run is RUNNING
while the move is under way, FINISHED once the alias is set and FAILED when setting it failed.
A move to the version that already holds the alias records nothing. A move to None deletes the
alias, recorded the same way (``to_version`` ``none``): register and ``flows.rollback`` remove
``compress.alias`` when the champion has no compact model. A caller that decided
against the holder it read earlier passes it as ``expect_from``: when someone else moved the
alias meanwhile (``make rollback`` during a register), nothing moves and ``AliasMovedError``
names that move, so a rollback is never silently undone.

An entry a killed process left RUNNING is settled by the next move of the same alias (FINISHED
when the alias is found on its version, else FAILED) once it is ``SETTLE_AFTER_S`` old.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from stages.common.errors import PipelineError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger(__name__)

AUDIT_EXPERIMENT = "registry-audit"  # one run per alias move, in the registry's own store
GATE_TAG = (
    "promotion.gate"  # on each version: passed | failed | pending (see stages.register.stage)
)
KINDS = ("register", "rollback", "manual")  # who moved it: the register stage, flows.rollback
NONE = "none"  # a param cannot be null: the alias had no holder / no run caused the move
MAX_REASON = 1000  # characters kept of a reason (one line)
_UNREAD = object()  # move_alias/check_holder: no expected holder given / holder not read yet
SETTLE_AFTER_S = 60.0  # an entry RUNNING longer than this was left by a process that died
STATUS = {
    "FINISHED": "done",
    "FAILED": "failed",
    "RUNNING": "unfinished",
    "KILLED": "failed",
    "SCHEDULED": "unfinished",
}


@dataclass(frozen=True)
class AliasMove:
    """One entry of the alias history. ``status``: done, failed or unfinished."""

    model: str
    alias: str
    from_version: str | None
    to_version: str | None  # None: the alias was removed
    reason: str
    caused_by_run: str | None
    actor: str
    time: str  # ISO 8601, UTC
    kind: str
    status: str
    entry_id: str  # the audit run's id
    error: str | None = None

    def describe(self) -> str:
        """``champion v2 -> v1 (rollback, done) by me@host at ...: why``, on one line."""
        source = f"v{self.from_version}" if self.from_version else "nothing"
        target = f"v{self.to_version}" if self.to_version else "nothing (removed)"
        run = f", run {self.caused_by_run}" if self.caused_by_run else ""
        error = f" [{self.error}]" if self.error else ""
        return (
            f"{self.time} {self.alias} {source} -> {target} ({self.kind}, "
            f"{self.status}) by {self.actor}{run}: {self.reason}{error}"
        )


# --- pure core ----------------------------------------------------------------------------


def holders(history: list[AliasMove], current: str | None) -> list[str]:
    """Who held the alias, oldest first, ending with ``current``, rollbacks undone.

    A move pushes its version; a rollback to a version still on the stack pops back to it (so a
    second rollback goes further back, not forth); a removal pushes nothing. Failed and
    unfinished entries are skipped: where the log misses a move (a killed process, a move
    outside this module), the next entry's ``from_version`` (or ``current``) puts the missing
    holder back.
    """
    stack: list[str] = []
    for move in history:
        if move.status != "done":
            continue
        if move.from_version is not None and (not stack or stack[-1] != move.from_version):
            stack.append(move.from_version)
        if move.to_version is None:
            continue
        if move.kind == "rollback" and move.to_version in stack:
            del stack[len(stack) - stack[::-1].index(move.to_version) :]
        else:
            stack.append(move.to_version)
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def previous_holder(history: list[AliasMove], current: str | None) -> str | None:
    """The version that held the alias before ``current`` (None: no earlier holder)."""
    stack = holders(history, current)
    return stack[-2] if len(stack) >= 2 and stack[-1] == current else None


def actor() -> str:
    """``user@host`` of this process (what moved the alias)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = os.environ.get("USER") or f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _cut(text: str) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MAX_REASON else flat[: MAX_REASON - 3] + "..."


# --- I/O ----------------------------------------------------------------------------------


def current_holder(client: MlflowClient, model: str, alias: str) -> str | None:
    """The version ``model@alias`` points at, None when the alias (or the model) is not set."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(model).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get(alias)  # an int from some stores
    return None if version is None else str(version)


class AliasMovedError(PipelineError):
    """The alias was moved by someone else (a rollback, a hand move) while a run decided
    against its earlier holder: the run's decision is stale, nothing was moved."""


def check_holder(
    client: MlflowClient,
    model: str,
    alias: str,
    expected: str | None,
    holder: str | None | object = _UNREAD,
) -> None:
    """Refuse when ``model@alias`` is no longer held by ``expected`` (read at the run's start).

    Raises:
        AliasMovedError: one line naming both versions and the move that did it (from the
            alias history: kind, who, reason), and the fix (re-run).
    """
    now = current_holder(client, model, alias) if holder is _UNREAD else holder
    expected = None if expected is None else str(expected)
    if now == expected:
        return
    moves = [
        m for m in alias_history(client, model, alias) if m.status == "done" and m.to_version == now
    ]
    by = (
        f"{moves[-1].kind} by {moves[-1].actor} at {moves[-1].time}: {moves[-1].reason}"
        if moves
        else "a move outside the alias history"
    )
    source = f"v{expected}" if expected else "nothing"
    target = f"v{now}" if now else "nothing (alias removed)"
    raise AliasMovedError(
        f"{model}@{alias} moved from {source} to {target} during this run "
        f"(by {_cut(by)}); this run decided against {source}, so nothing "
        "was moved; re-run to decide against the current holder"
    )


def move_alias(
    client: MlflowClient,
    model: str,
    alias: str,
    version: str | int | None,
    reason: str,
    *,
    caused_by_run: str | None = None,
    kind: str = "register",
    expect_from: str | None | object = _UNREAD,
) -> AliasMove | None:
    """Point ``model@alias`` at ``version`` (None: delete the alias, an entry whose
    ``to_version`` is ``none``), recording the move first (see the module doc).

    Args:
        expect_from: the holder the caller decided against (None: no holder); when given and
            the alias is held by another version now, nothing moves (:func:`check_holder`).

    Returns:
        The entry (status ``done``), or None when ``version`` already held the alias (or,
        to delete it, the alias was not set).

    Raises:
        AliasMovedError: ``expect_from`` no longer holds the alias.
        MlflowException: the alias could not be set (the entry is marked FAILED first).
    """
    version = None if version is None else str(version)
    before = current_holder(client, model, alias)
    if before == version:
        return None
    if expect_from is not _UNREAD:
        check_holder(client, model, alias, expect_from, before)  # type: ignore[arg-type]
    experiment_id = audit_experiment_id(client, create=True)
    _settle_unfinished(client, experiment_id, model, alias, before)
    entry = {
        "model": model,
        "alias": alias,
        "from_version": before or NONE,
        "to_version": version or NONE,
        "reason": _cut(reason),
        "caused_by_run": caused_by_run or NONE,
        "actor": actor(),
        "time": datetime.now(UTC).isoformat(timespec="microseconds"),
        "kind": kind,
    }
    source = f"v{before}" if before else "nothing"
    target = f"v{version}" if version else "nothing (removed)"
    run = client.create_run(
        experiment_id,
        run_name=f"{model}@{alias} {source} -> {target}",
        tags={f"audit.{k}": v for k, v in entry.items()},
    )
    run_id = run.info.run_id
    try:
        from mlflow.entities import Param

        client.log_batch(run_id, params=[Param(k, v) for k, v in entry.items()])
        if version is None:
            client.delete_registered_model_alias(model, alias)
        else:
            client.set_registered_model_alias(model, alias, version)
    except Exception as exc:  # (a kill leaves it RUNNING: settled by the next move)
        _close(client, run_id, "FAILED", f"{type(exc).__name__}: {_cut(str(exc))}")
        raise
    _close(client, run_id, "FINISHED")
    logger.info("%s@%s: %s -> %s (%s): %s", model, alias, source, target, kind, entry["reason"])
    return _entry_of(client.get_run(run_id))


def _close(client: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    try:
        if error is not None:
            client.set_tag(run_id, "audit.error", error)
        client.set_terminated(run_id, status)
    except Exception as exc:  # the store is failing: the move's own error matters more
        if error is None:
            raise
        logger.warning("could not mark audit entry %s %s: %s", run_id, status, exc)


def audit_experiment_id(client: MlflowClient, create: bool = False) -> str | None:
    """The id of the ``registry-audit`` experiment (None when it does not exist and not
    ``create``); a deleted one is restored, since the history must stay readable."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None and create:
        uri = client.tracking_uri
        location = None  # a tracking server chooses its own
        if uri.startswith("sqlite:///"):  # beside the database, as tracking.configure_mlflow
            location = (
                Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts"
            ).as_uri()
        try:
            return client.create_experiment(AUDIT_EXPERIMENT, artifact_location=location)
        except MlflowException as exc:  # another process created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return None
    if experiment.lifecycle_stage == "deleted":
        logger.warning("the %s experiment was deleted: restored", AUDIT_EXPERIMENT)
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _search(client: MlflowClient, experiment_id: str, where: str) -> list[Run]:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:  # every page: the history is never cut short
        page = client.search_runs(
            [experiment_id], where, run_view_type=ViewType.ALL, max_results=1000, page_token=token
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _entry_of(run: Run) -> AliasMove:
    # The params are the entry; the tags (the same fields) stand in where a process died
    # between creating the entry and logging them.
    params, tags = run.data.params, run.data.tags

    def field(name: str) -> str:
        return params.get(name, tags.get(f"audit.{name}", ""))

    def optional(name: str) -> str | None:
        return None if field(name) in (NONE, "") else field(name)

    started = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
    return AliasMove(
        model=field("model"),
        alias=field("alias"),
        from_version=optional("from_version"),
        to_version=optional("to_version"),
        reason=field("reason"),
        caused_by_run=optional("caused_by_run"),
        actor=field("actor"),
        time=field("time") or started.isoformat(timespec="microseconds"),
        kind=field("kind"),
        status=STATUS.get(run.info.status, run.info.status),
        entry_id=run.info.run_id,
        error=tags.get("audit.error"),
    )


def alias_history(client: MlflowClient, model: str, alias: str | None = None) -> list[AliasMove]:
    """Every recorded move of ``model``'s aliases (or of ``alias`` only), oldest first."""
    experiment_id = audit_experiment_id(client)
    if experiment_id is None:
        return []
    where = f"tags.`audit.model` = {_quote(model)}"
    if alias is not None:
        where += f" and tags.`audit.alias` = {_quote(alias)}"
    entries = [_entry_of(run) for run in _search(client, experiment_id, where)]
    return sorted(entries, key=lambda e: e.time)


def _settle_unfinished(
    client: MlflowClient, experiment_id: str, model: str, alias: str, holder: str | None
) -> None:
    # A RUNNING entry older than SETTLE_AFTER_S was left by a process that died mid-move.
    now_ms = time.time() * 1000
    where = (
        f"tags.`audit.model` = {_quote(model)} and tags.`audit.alias` = {_quote(alias)} "
        "and attributes.status = 'RUNNING'"
    )
    for run in _search(client, experiment_id, where):
        if now_ms - run.info.start_time < SETTLE_AFTER_S * 1000:
            continue  # perhaps another process moving it right now
        target = run.data.tags.get("audit.to_version")
        moved = (None if target == NONE else target) == holder
        client.set_tag(
            run.info.run_id,
            "audit.settled",
            f"by a later move: alias {'found' if moved else 'not found'} on v{target}",
        )
        client.set_terminated(run.info.run_id, "FINISHED" if moved else "FAILED")
