"""A `make rollback` while a register runs is not silently undone (issue 10 item 2, review #3)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from flows import rollback
from stages.register import registry
from stages.register import stage as register
from tests.builders import TEST_PARAMS, make_params
from tests.stages.register.test_stage import LOOSE, params_file, prepare, register_args

NAME = TEST_PARAMS["register"]["model_name"]


@pytest.mark.slow
def test_a_rollback_during_register_is_not_undone_and_the_version_stays_pending(
    tmp_path: Path,
    mlflow_uri: str,
    trained: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # champion history v1 -> v2 (v2: a copy of v1's files, moved by hand), then a better
    # model's register (v3) reads champion v2 and judges against it; while it does, the
    # operator rolls champion back to v1. The old register moved champion v1 -> v3 anyway.
    loose = params_file(tmp_path / "loose.yaml", LOOSE)
    assert (
        register.main(
            register_args(prepare(tmp_path / "bad", trained, make_params(), degrade=True), loose)
        )
        == 0
    )
    client = mlflow.MlflowClient()
    v1 = client.get_model_version(NAME, "1")
    client.create_model_version(NAME, v1.source, run_id=v1.run_id, tags=dict(v1.tags))
    registry.move_alias(client, NAME, "champion", "2", "hand deploy", kind="manual")
    good = prepare(tmp_path / "good", trained, make_params())
    record_on_version = register.record_on_version

    def record_then_rollback(*args: object, **kwargs: object) -> None:
        record_on_version(*args, **kwargs)  # decided against v2; now someone rolls back
        rollback.rollback(client, NAME, "champion", "v2 mislabels night shifts")

    with monkeypatch.context() as patch:
        patch.setattr(register, "record_on_version", record_then_rollback)
        assert register.main(register_args(good, loose)) == 1

    assert (
        f"stage register failed: {NAME}@champion moved from v2 to v1 during this run "
        "(by rollback by " in caplog.text
    )
    assert "v2 mislabels night shifts); this run decided against v2" in caplog.text
    assert "left promotion.gate=pending, not champion" in caplog.text
    assert str(client.get_registered_model(NAME).aliases["champion"]) == "1"
    stale = client.get_model_version(NAME, "3")
    assert stale.tags["promotion.gate"] == "pending"
    assert stale.tags["promotion.decision"] == "undecided"
    last = registry.alias_history(client, NAME, "champion")[-1]
    assert (last.kind, last.from_version, last.to_version) == ("rollback", "2", "1")

    # the re-run judges v3 against the champion the operator chose, and records that
    assert register.main(register_args(good, loose)) == 0
    record = json.loads((good / "reports" / "registration.json").read_text())
    assert record["version"] == 3 and record["decision"] == "promoted"
    assert record["previous_champion_version"] == 1
    last = registry.alias_history(client, NAME, "champion")[-1]
    assert (last.kind, last.from_version, last.to_version) == ("register", "1", "3")


def test_move_alias_with_a_stale_expected_holder_moves_nothing(mlflow_uri: str) -> None:
    client = mlflow.MlflowClient()
    client.create_registered_model("m")
    for _ in range(3):
        client.create_model_version("m", "file:///nowhere")
    registry.move_alias(client, "m", "champion", "1", "first")
    registry.move_alias(client, "m", "champion", "2", "second", kind="rollback")

    with pytest.raises(
        registry.AliasMovedError,
        match=r"m@champion moved from v1 to v2 during "
        r"this run \(by rollback by .*: second\)",
    ):
        registry.move_alias(client, "m", "champion", "3", "decided against v1", expect_from="1")
    with pytest.raises(registry.AliasMovedError, match="moved from nothing to v2"):
        registry.move_alias(client, "m", "champion", "3", "first model", expect_from=None)
    assert str(client.get_registered_model("m").aliases["champion"]) == "2"
    assert registry.move_alias(client, "m", "champion", "3", "ok", expect_from="2") is not None
    assert str(client.get_registered_model("m").aliases["champion"]) == "3"


@pytest.mark.slow
def test_a_file_changed_in_the_store_after_upload_is_refused_not_recorded(
    tmp_path: Path,
    mlflow_uri: str,
    trained: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Someone with write access to the artifact store adds a line to the uploaded model code
    # before register hashes the version: the old register recorded (and, with a key, signed)
    # the changed files, and the version then loaded as "verified".
    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params())
    register_version = register.register_version

    def upload_then_tamper(rp: object, model_uri: str, cand: object) -> str:
        client = mlflow.MlflowClient()
        stored = Path(
            client.get_logged_model(model_uri.rsplit("/", 1)[-1]).artifact_location.removeprefix(
                "file://"
            )
        )
        code = stored / "code" / "model" / "errors.py"
        code.write_text(code.read_text() + "\nprint('injected')\n")
        return register_version(rp, model_uri, cand)

    with monkeypatch.context() as patch:
        patch.setattr(register, "register_version", upload_then_tamper)
        assert register.main(register_args(workdir, strict)) == 1

    assert (
        f"stage register failed: {NAME} v1: the stored files are not the ones this run "
        "produced" in caplog.text
    )
    assert "model/code/model/errors.py expected sha256 " in caplog.text
    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    assert "model.artifacts_sha256" not in version.tags  # nothing recorded or signed
    assert version.tags["promotion.gate"] == "pending"
    assert mlflow.MlflowClient().get_registered_model(NAME).aliases == {}
