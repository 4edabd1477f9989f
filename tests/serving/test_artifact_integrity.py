"""Tampered model artifacts are refused before a byte of them is unpickled or imported (issue 10,
item 6).

A real model is registered in a temporary MLflow sqlite store and its hashes recorded
(``stages.register.manifest.record_version``, as the register stage does); then the stored
bytes are replaced, in the store's own artifact folder, by a crafted pickle (or model code) whose
payload would create a marker file. Every loader refuses with one line naming the model, the
version, the file, the expected and actual sha256 and the fix, and the marker never appears.
(The batch-scoring flow's refusal: tests/flows/test_batch_score_integrity.py.)
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import mlflow
import pytest
import yaml

from flows import artifacts as artifacts_cli
from flows.batch_score import open_model
from model import artifacts
from model.artifacts import ArtifactIntegrityError
from model.servable import (
    NETWORK,
    PREPROCESSOR,
    ClassifierModel,
    copy_model_code,
    log_servable,
)
from model.variants import ARTIFACT_DIR, load_variant
from serving.model import ModelHolder, ModelIntegrityError, RegistryFollower, load_model
from stages.export.onnx import build_variants
from stages.register import manifest
from stages.register import stage as register
from stages.register.candidate import score_model
from tests.builders import make_params
from tests.serving import conftest
from tests.serving.conftest import Store, trained_once

NAME = "integrity-clf"
KEY_ENV = artifacts.DEFAULT_KEY_ENV


def __getattr__(name: str) -> object:
    # The `store` fixture lives in tests/serving/conftest.py (built once per session); modules
    # that imported it from here still find it. Not a module attribute: pytest would register
    # it a second time.
    if name == "store":
        return conftest.store
    raise AttributeError(name)


class Payload:
    """Unpickling this runs ``exec(code)``: what an attacker puts in a replaced pickle."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple:
        return exec, (self.code,)


def crafted_pickle(marker: Path) -> bytes:
    """A pickle that, when loaded, creates ``marker``."""
    return pickle.dumps(Payload(f"open({str(marker)!r}, 'w').write('code ran')"))


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


def register_version(
    store: Store, network: Path | None = None, record: bool = True, variants: bool = False
) -> str:
    """Log + register one version through the real ``log_servable``; record its hashes as
    the register stage does (signed when ``MODEL_SIGNING_KEY`` is set)."""
    with mlflow.start_run():
        info = log_servable(
            store.features / "preprocessor.joblib",
            network or store.network,
            store.rows.head(5),
            registered_model_name=NAME,
        )
        if variants:  # the ONNX files the export stage logs beside the pyfunc
            folder = build_variants(
                store.features / "preprocessor.joblib",
                network or store.network,
                store.root / "v" / ARTIFACT_DIR,
            )
            mlflow.log_artifacts(str(folder), ARTIFACT_DIR)
    version = str(info.registered_model_version)
    if record:
        manifest.record_version(mlflow.MlflowClient(), NAME, version)
    return version


def stored(version: str, relative: str, name: str = NAME) -> Path:
    """The file as the store holds it (what an attacker with write access would replace)."""
    location = mlflow.MlflowClient().get_model_version_download_uri(name, version)
    return Path(location.removeprefix("file://")) / relative


def stored_variant(version: str, name: str) -> Path:
    run_id = mlflow.MlflowClient().get_model_version(NAME, version).run_id
    location = mlflow.get_run(run_id).info.artifact_uri.removeprefix("file://")
    return Path(location) / ARTIFACT_DIR / name


def tamper(path: Path, data: bytes) -> tuple[str, str]:
    """Replace ``path``'s bytes; returns (sha256 before, sha256 after)."""
    before = artifacts.file_sha256(path)
    path.write_bytes(data)
    return before, artifacts.file_sha256(path)


def test_the_crafted_pickle_really_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "control"
    pickle.loads(crafted_pickle(marker))
    assert marker.read_text() == "code ran"


def test_a_recorded_version_is_code_not_a_pickle_and_loads_verified(store: Store) -> None:
    version = register_version(store)

    mv = mlflow.MlflowClient().get_model_version(NAME, version)
    manifest = json.loads(mv.tags[artifacts.MANIFEST_TAG])
    assert mv.tags[artifacts.DIGEST_TAG] == artifacts.manifest_digest(manifest)
    assert artifacts.SIGNATURE_TAG not in mv.tags  # no key set
    assert {
        "model/MLmodel",
        "model/servable_model.py",
        "model/artifacts/preprocessor.joblib",
        "model/artifacts/model.pt",
        "model/code/model/servable.py",
    } <= set(manifest)
    assert not any(path.endswith(".pkl") for path in manifest)  # models-from-code
    model = load_model(f"models:/{NAME}/{version}")
    assert model.integrity == f"sha256 {mv.tags[artifacts.DIGEST_TAG][:16]} verified"
    assert model.describe()["integrity"] == model.integrity
    assert artifacts.MANIFEST_TAG not in model.tags  # /version stays small
    assert len(model.predict(store.rows.head(3))) == 3


@pytest.mark.parametrize(
    "relative", ["artifacts/preprocessor.joblib", "artifacts/model.pt", "servable_model.py"]
)
def test_a_replaced_artifact_is_refused_everywhere_and_never_runs(
    store: Store, tmp_path: Path, relative: str
) -> None:
    version = register_version(store)
    marker = tmp_path / "pwned"
    evil = (
        f"open({str(marker)!r}, 'w').write('code ran')\n".encode()
        if relative.endswith(".py")
        else crafted_pickle(marker)
    )
    before, after = tamper(stored(version, relative), evil)
    uri = f"models:/{NAME}/{version}"
    refusal = (
        rf"{NAME} v{version}: artifact files differ from the hashes recorded at "
        rf"registration \(model\.artifacts_sha256 \w+\): model/{relative} expected sha256 "
        rf"{before} got {after}; refused, nothing of it was loaded\. Fix: move the "
        rf"alias to a good version \(make rollback REASON=\.\.\. \[VERSION=n\]\), or "
        rf"restore v{version}'s files from a backup, then check: python -m "
        rf"flows\.artifacts verify models:/{NAME}/{version}; do not load"
    )

    with pytest.raises(ModelIntegrityError, match=refusal) as served:
        load_model(uri)  # the service
    assert "\n" not in str(served.value)
    with pytest.raises(ModelIntegrityError, match=refusal):
        open_model(make_params(), uri)  # batch scoring
    with pytest.raises(ArtifactIntegrityError, match=refusal):
        score_model(uri, store.rows.assign(target=0), "target", [0, 1])  # register
    with pytest.raises(ArtifactIntegrityError, match=refusal):
        load_variant(uri, "pyfunc")  # the variant loader, called directly
    assert not marker.exists()


@pytest.mark.slow
def test_a_tampered_pickled_model_of_before_models_from_code_is_refused(
    store: Store, tmp_path: Path
) -> None:
    # A version logged the old way (cloudpickled python_model), hashes recorded.
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ClassifierModel(),
            registered_model_name=NAME,
            artifacts={
                PREPROCESSOR: str(store.features / "preprocessor.joblib"),
                NETWORK: str(store.network),
            },
            code_paths=[str(copy_model_code(tmp_path / "code"))],
            input_example=store.rows.head(2),
        )
    version = str(info.registered_model_version)
    manifest.record_version(mlflow.MlflowClient(), NAME, version)
    assert load_model(f"models:/{NAME}/{version}").integrity.endswith("verified")
    marker = tmp_path / "pwned"
    tamper(stored(version, "python_model.pkl"), crafted_pickle(marker))

    with pytest.raises(ModelIntegrityError, match=r"model/python_model\.pkl expected sha256"):
        load_model(f"models:/{NAME}/{version}")
    assert not marker.exists()


def test_an_added_file_or_a_removed_one_is_named(store: Store, tmp_path: Path) -> None:
    version = register_version(store)
    stored(version, "python_model.pkl").write_bytes(crafted_pickle(tmp_path / "pwned"))
    stored(version, "input_example.json").unlink()

    with pytest.raises(ModelIntegrityError) as refused:
        load_model(f"models:/{NAME}/{version}")
    message = str(refused.value)
    assert "model/input_example.json missing (expected sha256 " in message
    assert "model/python_model.pkl not recorded at registration (sha256 " in message
    assert not (tmp_path / "pwned").exists()


def test_the_follower_refuses_a_tampered_version_and_keeps_serving(
    store: Store, tmp_path: Path
) -> None:
    good = register_version(store)
    bad = register_version(store, store.zeroed)
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(NAME, "champion", good)
    holder = ModelHolder()
    follower = RegistryFollower(holder, NAME, "champion", interval_s=0.05)
    assert follower.check_once() and holder.current.version == good
    marker = tmp_path / "pwned"
    tamper(stored(bad, "artifacts/preprocessor.joblib"), crafted_pickle(marker))

    client.set_registered_model_alias(NAME, "champion", bad)  # the alias moves to it
    assert not follower.check_once()

    assert holder.current.version == good  # the old version keeps serving
    assert bad in follower.refused and follower.last_error == follower.refused[bad]
    assert f"{NAME} v{bad}: artifact files differ" in follower.refused[bad]
    assert "model/artifacts/preprocessor.joblib expected sha256" in follower.refused[bad]
    assert follower.refused[bad].endswith(f"still serving v{good}")
    assert not follower.check_once()  # remembered: not downloaded again
    assert not marker.exists()
    client.set_registered_model_alias(NAME, "champion", good)


def test_an_onnx_variant_file_is_checked_too(store: Store, tmp_path: Path) -> None:
    version = register_version(store, variants=True)
    manifest = json.loads(
        mlflow.MlflowClient().get_model_version(NAME, version).tags[artifacts.MANIFEST_TAG]
    )
    assert {
        "variants/model.onnx",
        "variants/model.int8.onnx",
        "variants/preprocessor.joblib",
    } <= set(manifest)
    assert load_model(f"models:/{NAME}/{version}", "onnx").variant == "onnx"
    marker = tmp_path / "pwned"
    tamper(stored_variant(version, "preprocessor.joblib"), crafted_pickle(marker))

    with pytest.raises(
        ModelIntegrityError, match=r"artifact files differ .*variants/preprocessor\.joblib expected"
    ):
        load_model(f"models:/{NAME}/{version}", "int8")
    assert load_model(f"models:/{NAME}/{version}").variant == "pyfunc"  # its files are intact
    assert not marker.exists()


def test_signed_versions_need_the_right_key(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "the-right-key")
    signed = register_version(store)
    tags = mlflow.MlflowClient().get_model_version(NAME, signed).tags
    assert tags[artifacts.SIGNATURE_TAG] == artifacts.sign(
        b"the-right-key", tags[artifacts.DIGEST_TAG]
    )
    assert load_model(f"models:/{NAME}/{signed}").integrity.endswith("verified, signed")

    monkeypatch.setenv(KEY_ENV, "another-key")
    with pytest.raises(
        ModelIntegrityError,
        match=rf"{NAME} v{signed}: signature "
        r"model\.artifacts_hmac does not match the key in MODEL_SIGNING_KEY",
    ):
        load_model(f"models:/{NAME}/{signed}")
    monkeypatch.delenv(KEY_ENV)
    unsigned = register_version(store)
    monkeypatch.setenv(KEY_ENV, "the-right-key")
    with pytest.raises(
        ModelIntegrityError,
        match=rf"{NAME} v{unsigned} is not signed \(no "
        r"model\.artifacts_hmac tag\) and MODEL_SIGNING_KEY is set.*refused",
    ):
        load_model(f"models:/{NAME}/{unsigned}")
    # params name the env var: batch scoring reads the key from there
    monkeypatch.setenv("OTHER_KEY", "another-key")
    with pytest.raises(ModelIntegrityError, match="does not match the key in OTHER_KEY"):
        open_model(
            make_params({"register": {"signing_key_env": "OTHER_KEY"}}), f"models:/{NAME}/{signed}"
        )


def test_edited_tags_without_the_key_are_caught_by_the_signature(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "the-right-key")
    version = register_version(store)
    client = mlflow.MlflowClient()
    marker = tmp_path / "pwned"
    _, after = tamper(stored(version, "artifacts/preprocessor.joblib"), crafted_pickle(marker))
    manifest = json.loads(client.get_model_version(NAME, version).tags[artifacts.MANIFEST_TAG])
    manifest["model/artifacts/preprocessor.joblib"] = after  # registry write access, no key
    client.set_model_version_tag(
        NAME, version, artifacts.MANIFEST_TAG, artifacts.canonical(manifest)
    )

    with pytest.raises(
        ModelIntegrityError,
        match=r"tag model\.artifacts_manifest is missing or "
        r"does not hash to model\.artifacts_sha256 .*tags were edited",
    ):
        load_model(f"models:/{NAME}/{version}")
    client.set_model_version_tag(
        NAME, version, artifacts.DIGEST_TAG, artifacts.manifest_digest(manifest)
    )
    with pytest.raises(ModelIntegrityError, match="signature model.artifacts_hmac does not match"):
        load_model(f"models:/{NAME}/{version}")
    assert not marker.exists()


def test_a_version_without_hashes_loads_unverified_unless_a_key_is_set(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    old = register_version(store, record=False)  # registered before hashes were recorded:
    mlmodel = stored(old, "MLmodel")  # its MLmodel had no artifact_sha256 either (else refused)
    meta = yaml.safe_load(mlmodel.read_text())
    del meta["flavors"]["python_function"]["config"]
    mlmodel.write_text(yaml.safe_dump(meta))

    model = load_model(f"models:/{NAME}/{old}")
    assert model.integrity == "unverified: no artifact hashes recorded for this model"
    assert f"{NAME} v{old} has no recorded artifact hashes" in caplog.text
    monkeypatch.setenv(KEY_ENV, "the-right-key")
    with pytest.raises(
        ModelIntegrityError,
        match=rf"{NAME} v{old} has no recorded artifact "
        r"hashes .*MODEL_SIGNING_KEY is set, so it is refused.*python -m "
        rf"flows\.artifacts record models:/{NAME}/{old}",
    ):
        load_model(f"models:/{NAME}/{old}")

    # the way out for a version you have checked: record (and sign) its hashes
    assert artifacts_cli.main(["record", f"models:/{NAME}/{old}"]) == 0
    assert load_model(f"models:/{NAME}/{old}").integrity.endswith("verified, signed")
    assert artifacts_cli.main(["verify", f"models:/{NAME}/{old}"]) == 0


def test_recording_again_never_launders_a_tampered_version(store: Store, tmp_path: Path) -> None:
    version = register_version(store)
    first = mlflow.MlflowClient().get_model_version(NAME, version).tags[artifacts.DIGEST_TAG]
    assert manifest.record_version(mlflow.MlflowClient(), NAME, version).digest == first
    tamper(stored(version, "artifacts/preprocessor.joblib"), crafted_pickle(tmp_path / "x"))

    with pytest.raises(
        ArtifactIntegrityError, match="its files differ from the hashes it recorded"
    ):
        manifest.record_version(mlflow.MlflowClient(), NAME, version)
    assert (
        mlflow.MlflowClient().get_model_version(NAME, version).tags[artifacts.DIGEST_TAG] == first
    )
    assert artifacts_cli.main(["verify", f"models:/{NAME}/{version}"]) == 1


def test_a_damaged_preprocessor_is_not_unpickled_even_by_plain_mlflow(
    store: Store, tmp_path: Path
) -> None:
    # mlflow.pyfunc.load_model straight from the store (no registry check): the hashes in the
    # model's own config still stop the pickle before it is loaded.
    version = register_version(store)
    marker = tmp_path / "pwned"
    tamper(stored(version, "artifacts/preprocessor.joblib"), crafted_pickle(marker))

    with pytest.raises(
        Exception,
        match=r"preprocessor\.joblib: sha256 \w+ is not the expected "
        r"\w+ \(damaged or replaced\); not unpickled",
    ):
        mlflow.pyfunc.load_model(str(stored(version, "")))
    assert not marker.exists()


@pytest.mark.slow
def test_register_records_signed_hashes_and_refuses_a_tampered_champion(
    tmp_path: Path,
    mlflow_uri: str,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stages.common.errors import GateError
    from tests.stages.register.test_stage import LOOSE, params_file, prepare, register_args

    trained = trained_once(tmp_path_factory)
    monkeypatch.setenv(KEY_ENV, "the-right-key")  # params' register.signing_key_env
    loose = params_file(
        tmp_path / "p.yaml", {"register": {**LOOSE["register"], "model_name": NAME}}
    )
    assert (
        register.main(
            register_args(prepare(tmp_path / "v1", trained, make_params(), export=True), loose)
        )
        == 0
    )
    tags = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").tags
    assert tags[artifacts.SIGNATURE_TAG] == artifacts.sign(
        b"the-right-key", tags[artifacts.DIGEST_TAG]
    )
    assert "variants/preprocessor.joblib" in json.loads(tags[artifacts.MANIFEST_TAG])
    marker = tmp_path / "pwned"
    tamper(stored("1", "artifacts/preprocessor.joblib"), crafted_pickle(marker))

    # v2 (another model) cannot be compared with a champion whose files were replaced: the
    # reason names the file and the repair, not a schema change (allowing one does not help)
    v2 = prepare(tmp_path / "v2", trained, make_params(LOOSE), degrade=True)
    allowing = params_file(
        tmp_path / "allow.yaml",
        {"register": {**LOOSE["register"], "model_name": NAME, "allow_schema_change": True}},
    )
    with pytest.raises(
        GateError,
        match=r"is not compared with champion v1, whose stored files "
        r"fail their recorded hashes \(file\(s\) model/"
        r"artifacts/preprocessor\.joblib differ",
    ):
        register.run(
            v2 / "features",
            v2 / "models",
            v2 / "reports" / "metrics.json",
            v2 / "reports" / "registration.json",
            _params(allowing),
        )
    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["gate_failed"] and "make rollback" in record["reason"]
    assert f"verify models:/{NAME}/1" in record["reason"]
    assert "allow_schema_change" not in record["reason"]
    assert "could not score the current test data" not in record["reason"]
    assert str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"
    assert not marker.exists()


def _params(path: Path):
    from stages.common.config import load_params

    return load_params(path)
