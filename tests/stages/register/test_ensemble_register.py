"""Register with an ensemble: the ensemble stage's model is the candidate, registered as ONE
version (tags ``ensemble.members``, ``ensemble.method``; export's variants of train's single
model not attached), served and batch-scored like any version; a rebuilt identical ensemble
registers nothing; its content hash is its spec and each member's content."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from model.artifacts import MANIFEST_TAG
from model.predictors import load_predictor
from serving import batch
from serving.app import ServiceConfig, create_app
from serving.model import load_model
from stages.evaluate import stage as evaluate
from stages.register import content
from stages.register import stage as register
from tests.builders import make_params
from tests.stages.register.ensemble_builders import resaved, train_member, write_ensemble_dir
from tests.stages.register.test_stage import NAME, params_file, prepare, register_args

CODE = {"model/x.py": b"print(1)"}


@pytest.fixture(scope="module")
def gbdt_member(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gbdt trained by train's own code on the same features: the second member."""
    return train_member(trained[0], tmp_path_factory.mktemp("gbdt"), {"train": {"model": "gbdt"}})


def wait_for_version(app: TestClient, timeout: float = 120.0) -> dict:
    """/version once the service has loaded the alias's version (bounded)."""
    deadline = time.monotonic() + timeout
    while (answer := app.get("/version")).status_code != 200:
        assert time.monotonic() < deadline, answer.json()
        time.sleep(0.05)
    return answer.json()


def members(model_dir: Path, gbdt: Path) -> list[tuple[str, str, Path]]:
    return [("train", "train", model_dir / "model.pt"), ("gbdt", "family:gbdt", gbdt)]


def _hash(path: Path) -> str:
    return content.content_hash(content.model_checkpoint(path), b"prep", None, CODE)


def test_an_ensembles_content_is_its_spec_and_each_members_content(
    tmp_path: Path, trained: tuple[Path, Path], gbdt_member: Path
) -> None:
    network = trained[1] / "model.pt"
    first = write_ensemble_dir(tmp_path / "a", members(trained[1], gbdt_member))
    # the same members, the network re-saved with another epoch: other file bytes, same model
    again = write_ensemble_dir(
        tmp_path / "b",
        [("train", "train", resaved(network, tmp_path / "resaved" / "model.pt"))]
        + members(trained[1], gbdt_member)[1:],
    )
    zip_a, zip_b = first / "model.ensemble.zip", again / "model.ensemble.zip"
    assert zip_a.read_bytes() != zip_b.read_bytes()

    assert _hash(zip_a) == _hash(zip_b)
    assert _hash(zip_a) != _hash(network)  # not its member 0
    weighted = write_ensemble_dir(
        tmp_path / "w", members(trained[1], gbdt_member), "weighted", weights=[0.7, 0.3]
    )
    swapped = write_ensemble_dir(tmp_path / "s", members(trained[1], gbdt_member)[::-1])
    for other in (weighted, swapped):
        assert _hash(other / "model.ensemble.zip") != _hash(zip_a)
    # a single model's hash is unchanged by the recursion (older versions stay identical)
    assert _hash(network) == content.content_hash(
        content._checkpoint(load_predictor(network)), b"prep", None, CODE
    )
    tags = content.ensemble_tags(zip_a)
    assert tags["ensemble.method"] == "mean"
    listed = json.loads(tags["ensemble.members"])
    assert [(m["name"], m["source"], m["family"]) for m in listed] == [
        ("train", "train", "mlp"),
        ("gbdt", "family:gbdt", "gbdt"),
    ]
    assert all(len(m["sha256"]) == 64 for m in listed)
    assert content.ensemble_tags(network) == {}


def test_a_members_tag_too_long_for_mlflow_is_shortened_with_a_note_never_failing() -> None:
    def member(i: int) -> dict:
        return {
            "name": f"trial_{i:03d}",
            "source": f"trial:{i}",
            "family": "transformer",
            "sha256": f"{i:064x}",
            "file": "ignored",
        }

    few = content.members_tags([member(i) for i in range(3)])
    assert set(few) == {"ensemble.members"}  # fits: all of it, no note
    assert json.loads(few["ensemble.members"])[2] == {
        k: v for k, v in member(2).items() if k != "file"
    }

    many = content.members_tags([member(i) for i in range(60)])  # ~ 9,000 characters in full
    listed = json.loads(many["ensemble.members"])
    assert len(many["ensemble.members"]) <= content.MAX_TAG_VALUE == 5000
    assert listed[59] == {"name": "trial_059", "sha256": f"{59:064x}"[:12]}  # all 60 named
    assert many["ensemble.members_note"].startswith("names and sha256 prefixes (12 hex)")
    assert "ensemble.json" in many["ensemble.members_note"]

    huge = content.members_tags([member(i) for i in range(400)])  # not even short ones fit
    listed = json.loads(huge["ensemble.members"])
    assert len(huge["ensemble.members"]) <= 5000 and 0 < len(listed) < 400
    assert huge["ensemble.members_note"].startswith(f"the first {len(listed)} of 400 members")


@pytest.mark.slow
def test_an_ensemble_is_one_version_served_batch_scored_and_not_registered_twice(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], gbdt_member: Path
) -> None:
    params = make_params()
    work = prepare(tmp_path / "v1", trained, params, export=True)  # export: train's variants
    ensemble = write_ensemble_dir(work / "ensemble", members(work / "models", gbdt_member))
    # evaluate scores the ensemble, and each member beside it, on the same test split
    evaluate.run(
        work / "features",
        work / "models",
        work / "reports" / "eval",
        work / "reports" / "metrics.json",
        params,
        ensemble,
    )
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    assert {"member_train_accuracy", "member_gbdt_log_loss"} <= set(metrics)
    args = [*register_args(work, params_file(tmp_path / "p.yaml")), "--ensemble", str(ensemble)]

    assert register.main(args) == 0

    record = json.loads((work / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 1
    assert record["metrics"] == pytest.approx(  # the registered ensemble == what evaluate scored
        {k: metrics[k] for k in record["metrics"]}, abs=1e-6
    )
    assert record["export_variants"].startswith("not attached: export's ONNX/int8 variants")
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, "1")
    assert version.tags["ensemble.method"] == "mean"
    assert [m["name"] for m in json.loads(version.tags["ensemble.members"])] == ["train", "gbdt"]
    manifest = json.loads(version.tags[MANIFEST_TAG])
    assert "model/artifacts/model.ensemble.zip" in manifest
    assert not [k for k in manifest if k.startswith("variants/")]  # train's, not attached

    # served: /version lists the members; batch scoring unchanged
    config = ServiceConfig(model_name=NAME, tracking_uri=mlflow_uri, log_dir=str(tmp_path / "log"))
    with TestClient(create_app(config)) as app:
        described = wait_for_version(app)
    assert described["model_version"] == "1" and described["compact_of"] is None
    assert [m["name"] for m in described["members"]] == ["train", "gbdt"]
    assert described["members"][1]["family"] == "gbdt"
    scored = tmp_path / "scored.parquet"
    model = load_model(f"models:/{NAME}@champion")
    assert batch.score_file(model, work / "features" / "test.parquet", scored) > 0
    out = pd.read_parquet(scored)
    assert set(out["model_version"]) == {"1"}
    assert (out["prediction"] == out["target"]).mean() == pytest.approx(metrics["accuracy"])

    # the same ensemble rebuilt (member 0 re-saved: other bytes) in a new run: identical
    again = prepare(tmp_path / "again", trained, params)
    network = again / "models" / "model.pt"
    shutil.copy2(resaved(network, tmp_path / "tmp" / "model.pt"), network)
    rebuilt = write_ensemble_dir(again / "ensemble", members(again / "models", gbdt_member))
    args = [*register_args(again, params_file(tmp_path / "p.yaml")), "--ensemble", str(rebuilt)]

    assert register.main(args) == 0

    record = json.loads((again / "reports" / "registration.json").read_text())
    assert record["decision"] == "identical" and record["version"] == 1
    assert "same ensemble spec and members" in record["reason"]
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
