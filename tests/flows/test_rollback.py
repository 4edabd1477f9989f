"""Alias history and rollback, against a real MLflow registry (temporary sqlite store).

The store is built once per module by the real register stage: v1 (a weak model, the first
champion), v2 (the trained one: better, promoted), v3 (below the thresholds: gate failed,
challenger). Each test works on its own copy of that store.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest

from flows import lineage, rollback
from serving.model import ModelHolder, RegistryFollower
from stages.common.errors import GateError
from stages.register import registry
from stages.register import stage as register
from tests.builders import TEST_PARAMS, breast_cancer_frame, build_trained, make_params
from tests.stages.register.test_stage import LOOSE, prepare

ROOT = Path(__file__).resolve().parents[2]
NAME = TEST_PARAMS["register"]["model_name"]


def _register(work: Path, params: object) -> None:
    register.run(
        work / "features",
        work / "models",
        work / "reports" / "metrics.json",
        work / "reports" / "registration.json",
        params,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's store: v1 weak (champion, then replaced), v2 champion, v3 gate failed."""
    root = tmp_path_factory.mktemp("rollback")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        trained = build_trained(root / "trained", make_params(), breast_cancer_frame())
        loose = make_params(LOOSE)
        _register(prepare(root / "v1", trained, loose, degrade=True), loose)
        _register(prepare(root / "v2", trained, loose), loose)
        with pytest.raises(GateError):
            _register(
                prepare(root / "v3", trained, make_params(), degrade=True, bias=0.1), make_params()
            )
        mlflow.set_tracking_uri(None)  # the stages set it globally: leave no trace
    return root / "mlflow.db"


@pytest.fixture
def store(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A copy of the module's store for this test (artifacts are read from the original)."""
    copy = tmp_path / "mlflow.db"
    with sqlite3.connect(built) as source, sqlite3.connect(copy) as dest:
        source.backup(dest)  # (WAL: a plain file copy could miss the last transactions)
    uri = f"sqlite:///{copy}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(None)
    return uri


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _moves(uri: str) -> list[tuple[str, str | None, str, str, str]]:
    return [
        (m.alias, m.from_version, m.to_version, m.kind, m.status)
        for m in registry.alias_history(_client(uri), NAME)
    ]


def _champion(uri: str) -> str | None:
    return registry.current_holder(_client(uri), NAME, "champion")


# ----------------------------------------------------------------------------- pure core


def _move(
    source: str | None, to: str | None, kind: str = "register", status: str = "done"
) -> registry.AliasMove:
    return registry.AliasMove(
        NAME,
        "champion",
        source,
        to,
        "why",
        None,
        "me@here",
        "2026-01-01T00:00:00+00:00",
        kind,
        status,
        "entry",
    )


def test_the_previous_holder_undoes_moves_and_a_second_rollback_goes_further_back() -> None:
    moves = [_move(None, "1"), _move("1", "2"), _move("2", "3")]
    assert registry.previous_holder(moves, "3") == "2"

    moves.append(_move("3", "2", "rollback"))
    assert registry.holders(moves, "2") == ["1", "2"]
    assert registry.previous_holder(moves, "2") == "1"  # not back to 3

    moves.append(_move("2", "1", "rollback"))
    assert registry.previous_holder(moves, "1") is None
    moves.append(_move("1", "4"))
    assert registry.previous_holder(moves, "4") == "1"


def test_the_previous_holder_survives_moves_missing_from_the_log() -> None:
    # 2 -> 3 failed to be marked (a killed process), 4 was set by hand outside the module
    moves = [
        _move(None, "1"),
        _move("1", "2"),
        _move("2", "3", status="unfinished"),
        _move("3", "4"),
        _move("2", "9", status="failed"),
    ]

    assert registry.holders(moves, "5") == ["1", "2", "3", "4", "5"]
    assert registry.previous_holder(moves, "5") == "4"
    assert registry.previous_holder([], "1") is None and registry.previous_holder([], None) is None


def test_a_removal_is_no_holder_and_leaves_the_earlier_ones() -> None:
    moves = [_move(None, "1"), _move("1", "2"), _move("2", None)]  # 2, then the alias deleted

    assert registry.holders(moves, None) == ["1", "2"]
    assert "champion v2 -> nothing (removed) (register, done)" in moves[-1].describe()


# ----------------------------------------------------------------------------- the history


@pytest.mark.slow
def test_register_recorded_every_alias_move_with_its_reason_and_run(store: str) -> None:
    client = _client(store)
    history = registry.alias_history(client, NAME)

    assert [(m.alias, m.from_version, m.to_version, m.kind, m.status) for m in history] == [
        ("champion", None, "1", "register", "done"),
        ("champion", "1", "2", "register", "done"),
        ("challenger", None, "3", "register", "done"),
    ]
    for move in history:
        version = client.get_model_version(NAME, move.to_version)
        assert move.reason == version.tags["promotion.reason"]  # recorded before the move
        assert move.caused_by_run == version.run_id
        assert move.actor == registry.actor() and move.time.endswith("+00:00")
    audit = client.get_experiment_by_name(registry.AUDIT_EXPERIMENT)
    assert {r.info.status for r in client.search_runs([audit.experiment_id])} == {"FINISHED"}


@pytest.mark.slow
def test_a_failed_move_is_recorded_as_failed_and_a_repeat_records_nothing(store: str) -> None:
    client = _client(store)
    before = _moves(store)

    assert registry.move_alias(client, NAME, "champion", "2", "again") is None  # holds it
    with pytest.raises(mlflow.exceptions.MlflowException):
        registry.move_alias(client, NAME, "champion", "99", "no such version", kind="manual")

    assert _champion(store) == "2"
    [failed] = [m for m in registry.alias_history(client, NAME) if m.to_version == "99"]
    assert (failed.status, failed.from_version, failed.reason) == ("failed", "2", "no such version")
    assert "not found" in failed.error
    assert _moves(store) == [*before, ("champion", "2", "99", "manual", "failed")]
    # params are the entry: MLflow refuses to change a logged param
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.log_param(failed.entry_id, "to_version", "2")


@pytest.mark.slow
def test_an_entry_a_killed_process_left_running_is_settled_by_the_next_move(store: str) -> None:
    import time

    client = _client(store)
    experiment_id = registry.audit_experiment_id(client)
    # what a kill between writing the entry and setting the alias leaves: RUNNING, no params
    fields = {"model": NAME, "alias": "champion", "from_version": "2", "to_version": "1"}
    left = client.create_run(
        experiment_id,
        start_time=int(time.time() * 1000) - 120_000,
        tags={f"audit.{k}": v for k, v in fields.items()},
    ).info.run_id

    registry.move_alias(client, NAME, "champion", "1", "now for real", kind="manual")

    settled = client.get_run(left)
    assert settled.info.status == "FAILED"  # the alias was not on v1 when the next move came
    assert settled.data.tags["audit.settled"] == "by a later move: alias not found on v1"
    history = registry.alias_history(client, NAME)
    assert [m.status for m in history if m.entry_id == left] == ["failed"]
    assert history[-1].reason == "now for real" and history[-1].status == "done"


@pytest.mark.slow
def test_lineage_shows_the_alias_history(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert lineage.main([f"{NAME}@champion"]) == 0

    text = capsys.readouterr().out
    assert "Aliases    history of test-clf" in text
    assert "champion v1 -> v2 (register, done)" in text
    assert "challenger nothing -> v3 (register, done)" in text


# ----------------------------------------------------------------------------- rollback


@pytest.mark.slow
def test_rollback_moves_champion_back_and_a_following_service_swaps_to_it(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = ModelHolder()
    follower = RegistryFollower(holder, NAME, "champion")
    assert follower.check_once() and holder.current.version == "2"

    assert rollback.main([NAME, "--reason", "v2 misreads the night shift"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("test-clf@champion: v2 -> v1 (rollback by ")
    assert out.splitlines()[0].endswith("): v2 misreads the night shift")
    assert _champion(store) == "1"
    last = registry.alias_history(_client(store), NAME)[-1]
    assert (last.from_version, last.to_version, last.kind, last.status, last.reason) == (
        "2",
        "1",
        "rollback",
        "done",
        "v2 misreads the night shift",
    )
    assert follower.check_once() is True  # the real follower polls the alias
    assert holder.current.version == "1" and follower.last_error is None
    # v1 was the first champion: nothing earlier to go back to (not forth to v2)
    assert rollback.main([f"{NAME}@champion", "--reason", "again"]) == 1
    assert (
        "test-clf@champion (v1) has no earlier holder in the alias history; name the "
        "version" in capsys.readouterr().err
    )
    assert lineage.main([f"{NAME}@champion", "--json"]) == 0
    assert '"kind": "rollback"' in capsys.readouterr().out


def _compact_of(uri: str, parent: str) -> str:
    """A compact model of ``parent`` as register leaves one: a version (here: of the same
    stored files as ``parent``, its recorded hashes copied), passed, linked both ways."""
    client = _client(uri)
    of = client.get_model_version(NAME, parent)
    tags = {k: v for k, v in of.tags.items() if k.startswith("model.artifact")}
    tags |= {"compact.parent_version": parent, "promotion.gate": "passed"}
    version = client.create_model_version(NAME, of.source, of.run_id, tags=tags).version
    client.set_model_version_tag(NAME, parent, "compact.version", str(version))
    return str(version)


@pytest.mark.slow
def test_champion_compact_follows_a_rollback_to_the_compact_or_is_removed(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client, alias = _client(store), "champion-compact"
    small_v1, small_v2 = _compact_of(store, "1"), _compact_of(store, "2")
    registry.move_alias(client, NAME, alias, small_v2, "compact of v2", kind="register")

    assert rollback.main([NAME, "--reason", "v2 misreads the night shift"]) == 0

    out = capsys.readouterr().out.splitlines()
    assert _champion(store) == "1"
    assert registry.current_holder(client, NAME, alias) == small_v1  # v1's compact, not v2's
    assert out[1] == (
        f"test-clf@{alias} v{small_v2} -> v{small_v1}: the compact of champion v1 (champion "
        "moved: v2 misreads the night shift)"
    )
    last = registry.alias_history(client, NAME, alias)[-1]
    assert (last.from_version, last.to_version, last.kind, last.status) == (
        small_v2,
        small_v1,
        "rollback",
        "done",
    )

    # back to v2, whose compact is gone meanwhile: the alias is removed, audited, said
    client.delete_model_version_tag(NAME, "2", "compact.version")
    assert rollback.main([NAME, "--reason", "v1 was worse", "--version", "2"]) == 0

    out = capsys.readouterr().out.splitlines()
    assert _champion(store) == "2" and registry.current_holder(client, NAME, alias) is None
    assert out[1].startswith(f"test-clf@{alias} v{small_v1} -> nothing (removed): removed: v2 has ")
    last = registry.alias_history(client, NAME, alias)[-1]
    assert (last.from_version, last.to_version, last.kind, last.status) == (
        small_v1,
        None,
        "rollback",
        "done",
    )
    assert "-> nothing (removed) (rollback, done)" in last.describe()
    # another alias (challenger) moves alone
    assert rollback.main([f"{NAME}@challenger", "--reason", "x", "--version", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # no compact line
    assert registry.current_holder(client, NAME, alias) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--version", "3"],
            ("rollback: refused: test-clf v3 failed the model gate (promotion.gate=failed: "),
        ),
        (["--version", "99"], "rollback: model 'test-clf' has no version 99 (versions: 1, 2, 3)"),
        (["--version", "1", "--reason", " "], "rollback: a reason is required"),
    ],
)
def test_rollback_refuses_with_one_line_and_moves_nothing(
    store: str, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    before = _moves(store)

    assert rollback.main([NAME, "--reason", "why", *args]) == 1

    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert _champion(store) == "2" and _moves(store) == before


@pytest.mark.slow
def test_rollback_to_a_failed_version_needs_force_and_to_the_holder_moves_nothing(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rollback.main(["nope", "--reason", "x"]) == 1
    assert "rollback: no registered model 'nope' (registered: test-clf)" in capsys.readouterr().err
    assert rollback.main([NAME, "--reason", "x", "--version", "2"]) == 0
    assert "test-clf@champion is already v2: nothing moved" in capsys.readouterr().out
    assert len(_moves(store)) == 3

    assert rollback.main([NAME, "--reason", "the gate was wrong", "--version", "3", "--force"]) == 0

    assert _champion(store) == "3"
    assert _moves(store)[-1] == ("champion", "2", "3", "rollback", "done")


@pytest.mark.slow
def test_make_rollback_needs_a_reason_and_moves_champion(store: str, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}

    def make(*args: str) -> subprocess.CompletedProcess:  # (-o install: .venv is there)
        return subprocess.run(
            ["make", "-s", "-o", "install", "-C", str(ROOT), "rollback", f"MODEL={NAME}", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    missing = make()
    assert missing.returncode == 2 and "usage: make rollback REASON=" in missing.stderr
    done = make("REASON=it's the wrong one", "VERSION=1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test-clf@champion: v2 -> v1 (rollback by " in done.stdout
    assert _moves(store)[-1] == ("champion", "2", "1", "rollback", "done")
    assert registry.alias_history(_client(store), NAME)[-1].reason == "it's the wrong one"


@pytest.mark.slow
def test_make_rollback_passes_any_reason_through_as_text(store: str) -> None:
    # A double quote used to break the recipe's `test -n "..."` (usage error, nothing moved);
    # $ and backticks would have been expanded by the shell.
    reason = 'the "fix" broke it; it\'s `date` $HOME $(shell echo x) \\'
    done = subprocess.run(
        [
            "make",
            "-s",
            "-o",
            "install",
            "-C",
            str(ROOT),
            "rollback",
            f"MODEL={NAME}",
            f"REASON={reason}",
            "VERSION=1",
        ],
        check=False,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert _moves(store)[-1] == ("champion", "2", "1", "rollback", "done")
    assert registry.alias_history(_client(store), NAME)[-1].reason == reason


# ----------------------------------------------------------------------------- the target's files


def _stored(uri: str, version: str, relative: str) -> Path:
    """A file of the version as the artifact store holds it."""
    location = _client(uri).get_model_version_download_uri(NAME, version)
    return Path(location.removeprefix("file://")) / relative


@pytest.fixture
def tampered_v1(store: str):
    """v1's stored preprocessor overwritten (the module's artifacts are shared: put back after);
    yields (sha256 recorded, sha256 now)."""
    from model import artifacts

    path = _stored(store, "1", "artifacts/preprocessor.joblib")
    original = path.read_bytes()
    before = artifacts.file_sha256(path)
    path.write_bytes(original[:-16] + b"\0" * 16)
    try:
        yield before, artifacts.file_sha256(path)
    finally:
        path.write_bytes(original)


@pytest.mark.slow
def test_rollback_refuses_a_version_whose_stored_files_were_tampered_with(
    store: str, tampered_v1: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The fault: `make rollback` moved champion v2 -> v1 although v1's preprocessor.joblib had
    # been overwritten in the artifact store (the service then refused to load it).
    before, after = tampered_v1
    moves = _moves(store)

    assert rollback.main([NAME, "--reason", "v2 misreads the night shift"]) == 1

    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(
        "rollback: refused: test-clf v1: artifact files differ from the "
        "hashes recorded at registration"
    )
    assert (
        f"model/artifacts/preprocessor.joblib expected sha256 {before} got {after}; "
        "champion stays on v2, nothing moved. Fix: move it to a good version instead "
        "(make rollback REASON=... VERSION=<n>), or restore v1's files in the artifact "
        "store from a backup and check them: python -m flows.artifacts verify "
        "models:/test-clf/1; to move anyway add FORCE=1 (--force)"
    ) in err
    assert _champion(store) == "2" and _moves(store) == moves  # nothing moved, nothing logged

    assert rollback.main([NAME, "--reason", "v2 is worse", "--force"]) == 0

    out, err = capsys.readouterr()
    assert (
        err.startswith("rollback: WARNING: FORCED (--force): test-clf v1: artifact files differ")
        and "the service refuses to load a version that fails" in err
    )
    assert out.startswith("test-clf@champion: v2 -> v1 (rollback by ")
    assert _champion(store) == "1"
    last = registry.alias_history(_client(store), NAME)[-1]
    assert last.reason.startswith(
        "v2 is worse [forced past a failed artifact check: test-clf v1: artifact files differ"
    )
    assert f"got {after}" in last.reason


@pytest.mark.slow
def test_rollback_checks_the_signature_with_the_key_env_params_names(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("register:\n  signing_key_env: ROLLBACK_TEST_KEY\n")
    monkeypatch.setenv("ROLLBACK_TEST_KEY", "s3cret")  # the versions were registered unsigned

    assert rollback.main([NAME, "--reason", "x", "--params", str(params)]) == 1

    err = capsys.readouterr().err
    assert err.startswith(
        "rollback: refused: test-clf v1 is not signed (no "
        "model.artifacts_hmac tag) and ROLLBACK_TEST_KEY is set"
    ), err
    assert _champion(store) == "2"
    monkeypatch.delenv("ROLLBACK_TEST_KEY")
    assert rollback.main([NAME, "--reason", "x", "--params", str(params)]) == 0
    assert _champion(store) == "1"


@pytest.mark.slow
def test_rollback_refuses_a_version_whose_stored_files_are_gone(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _stored(store, "1", "")
    hidden = folder.with_name(folder.name + ".hidden")
    folder.rename(hidden)  # the module's artifacts are shared: put back after
    try:
        assert rollback.main([NAME, "--reason", "x"]) == 1
    finally:
        hidden.rename(folder)

    [refusal] = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("rollback:")
    ]  # (MLflow logs "No artifacts found" too)
    assert refusal.startswith(
        "rollback: refused: test-clf v1: artifact files differ from the "
        "hashes recorded at registration"
    ), refusal
    assert "model/MLmodel missing (expected sha256 " in refusal and "; and " in refusal
    assert _champion(store) == "2"
