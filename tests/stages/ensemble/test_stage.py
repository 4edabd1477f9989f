"""The ensemble stage end to end on sklearn's breast cancer table: members trained by train's
code in their own process (a second seed and a gbdt), each fusion method fitted on val and
written as one model file, the disabled default, and the refusals. One members process for the
module: the other methods reuse the members the first run packed into its zip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from model.predictors import load_predictor
from stages.common import tracking
from stages.common.errors import ConfigError, PipelineError
from stages.common.io import read_json
from stages.ensemble import stage
from tests.builders import make_params

ROOT = Path(__file__).resolve().parents[3]
MEMBERS = {"seeds": [7], "families": ["gbdt"]}


def _params(method: str = "caruana", **ensemble: object):
    return make_params(
        {"ensemble": {"enabled": True, "members": MEMBERS, "method": method, **ensemble}}
    )


@pytest.fixture(scope="module")
def built(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The stage run once (stacking: a learned fusion that keeps every member in the file) on a
    copy of the features whose test split is garbage bytes: it never reads it. Its members are
    unpacked from the zip for the other tests."""
    features, model_dir = trained
    root = tmp_path_factory.mktemp("ensemble")
    garbled = root / "features"
    shutil.copytree(features, garbled)
    (garbled / "test.parquet").write_bytes(b"not parquet at all" * 100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{features.parent / 'mlflow.db'}")
        report = stage.run(garbled, model_dir, root / "out", _params("stacking"))
        mlflow.set_tracking_uri(None)
    unpacked = root / "members"
    with zipfile.ZipFile(root / "out" / "model.ensemble.zip") as archive:
        archive.extractall(unpacked)
    members = [
        {**m, "file": str(unpacked / "members" / m["name"] / Path(m["file"]).name)}
        for m in json.loads((unpacked / "ensemble.json").read_text())["members"]
    ]
    for member, entry in zip(members, report["members"], strict=True):
        member.update(seed=entry["seed"], overrides=entry["overrides"])
    return {"root": root, "report": report, "members": members}


@pytest.fixture
def store(trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{trained[0].parent / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_the_stage_builds_an_ensemble_of_train_s_model_a_seed_and_a_gbdt(
    built: dict, trained: tuple[Path, Path], store: str
) -> None:
    report, out = built["report"], built["root"] / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.ensemble.zip", "report.json"]
    assert json.loads((out / "report.json").read_text()) == report
    assert report["status"] == "built" and report["method"] == "stacking"
    members = report["members"]
    assert [(m["name"], m["source"], m["family"]) for m in members] == [
        ("train", "train", "mlp"),
        ("seed7", "seed:7", "mlp"),
        ("gbdt", "family:gbdt", "gbdt"),
    ]
    assert members[0]["sha256"] == tracking_sha(trained[1] / "model.pt")
    assert report["weights"] is None  # stacking: a meta-model, no weights
    ensemble = load_predictor(out / "model.ensemble.zip")
    assert ensemble.family == "ensemble" and [n for n, _ in ensemble.members] == [
        "train",
        "seed7",
        "gbdt",
    ]
    # logged to train's run: the report, the zip and the val scores
    run_id = read_json(trained[1] / tracking.RUN_FILE)["run_id"]
    run = MlflowClient(store).get_run(run_id)
    assert run.data.metrics["ensemble_val_f1_macro"] == report["val_f1_macro"]
    assert run.data.metrics["ensemble_member_gbdt_val_f1_macro"] == members[2]["val_f1_macro"]
    assert run.data.tags["ensemble.method"] == "stacking"
    assert run.data.tags["ensemble.members"] == "train,seed7,gbdt"  # these metrics are current
    assert "optimistic" in report["note"] and "test scores are the honest" in report["note"]
    logged = {a.path for a in MlflowClient(store).list_artifacts(run_id, "ensemble")}
    assert logged == {"ensemble/report.json", "ensemble/model.ensemble.zip"}


def tracking_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_fusion_never_sees_test_same_zip_with_the_real_test_split(
    built: dict, trained: tuple[Path, Path], store: str, tmp_path: Path
) -> None:
    # the fixture ran on garbage test bytes; the same members on the real features: same bytes
    features, model_dir = trained
    params = _params("stacking")
    report = stage.build(features, model_dir, tmp_path / "out", params, built["members"])
    assert (tmp_path / "out" / "model.ensemble.zip").read_bytes() == (
        built["root"] / "out" / "model.ensemble.zip"
    ).read_bytes()
    assert report == built["report"]


@pytest.mark.slow
def test_caruana_leaves_members_it_never_picked_out_of_the_file(
    built: dict, trained: tuple[Path, Path], store: str, tmp_path: Path
) -> None:
    features, model_dir = trained
    report = stage.build(features, model_dir, tmp_path / "out", _params(), built["members"])
    members = report["members"]
    assert sum(report["weights"]) == pytest.approx(1.0)
    assert len(report["fusion"]["picks"]) == 20
    # caruana starts from the best member: never worse than it on val log loss
    assert report["val_log_loss"] <= min(m["val_log_loss"] for m in members) + 1e-9
    picked = [m["name"] for m in members if m["weight"] > 0]
    assert [m["name"] for m in members if m["in_file"]] == picked
    ensemble = load_predictor(tmp_path / "out" / "model.ensemble.zip")
    assert [name for name, _ in ensemble.members] == picked  # weight 0: not loaded, not run
    assert ensemble.meta["weights"] == [m["weight"] for m in members if m["weight"] > 0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("mean", {}),
        ("vote", {}),
        ("weighted", {}),
        ("weighted", {"weights": [1.0, 1.0, 2.0]}),
        ("stacking", {"stacking_c": 0.5}),
    ],
)
def test_each_fusion_method_is_fitted_on_val_and_reloads_as_fitted(
    method: str, settings: dict, built: dict, trained: tuple[Path, Path], store: str, tmp_path: Path
) -> None:
    features, model_dir = trained
    params = _params(method, **settings)
    report = stage.build(features, model_dir, tmp_path / "out", params, built["members"])
    assert report["method"] == method and report["status"] == "built"
    if method in ("mean", "vote", "stacking"):
        assert report["weights"] is None
    else:
        assert sum(report["weights"]) == pytest.approx(1.0)
    if settings.get("weights"):
        assert report["weights"] == [0.25, 0.25, 0.5]
    ensemble = load_predictor(tmp_path / "out" / "model.ensemble.zip")
    assert ensemble.meta["method"] == method
    assert (ensemble.meta["stacking"] is not None) == (method == "stacking")
    assert 0.85 < report["val_accuracy"] <= 1.0
    assert np.isfinite(report["val_log_loss"])


def test_disabled_writes_only_the_report_without_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")  # the defaults: ensemble.enabled false
    code = (
        "import sys; from stages.ensemble.stage import main; "
        "rc = main(['--params', 'params.yaml', '--features', 'f', '--model', 'm', '--out', 'e']); "
        "print(rc, sorted(m for m in ('torch', 'mlflow', 'sklearn') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split("\n")[-2] == "0 []", done.stderr
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["report.json"]
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["status"] == "disabled" and "ensemble.enabled is false" in report["reason"]
    # again: the same report, the folder left as it was (DVC and make see nothing new)
    before = (tmp_path / "e" / "report.json").stat().st_mtime_ns
    stage.run(tmp_path / "f", tmp_path / "m", tmp_path / "e", make_params())
    assert (tmp_path / "e" / "report.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("members", "extra", "message"),
    [
        ({"families": ["cnn"]}, {}, r"families \['cnn'\]: 'cnn' cannot train.*train.image_shape"),
        ({"families": ["rnn"]}, {}, r"'rnn' cannot train.*train.rnn.sequence_length"),
        ({"families": ["mlp"]}, {}, r"holds train.model 'mlp'.*ensemble.members.seeds"),
        ({"seeds": [42]}, {}, r"seeds \[42\] holds base.seed 42"),
        ({"seeds": [1, 1]}, {}, "list a value twice"),
        ({}, {}, "adds no member to train's model"),
        ({"seeds": [1]}, {"method": "weighted", "weights": [1.0]}, r"1 value\(s\) for 2 members"),
    ],
)
def test_members_that_cannot_be_built_are_refused_before_any_training(
    members: dict, extra: dict, message: str, tmp_path: Path
) -> None:
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "report.json").write_text('{"status": "old"}')
    params = make_params({"ensemble": {"enabled": True, "members": members, **extra}})
    with pytest.raises(ConfigError, match=message):
        stage.run(tmp_path / "features", tmp_path / "models", tmp_path / "ens", params)
    assert (tmp_path / "ens" / "report.json").read_text() == '{"status": "old"}'


@pytest.mark.slow
def test_a_failing_members_process_fails_the_stage_with_its_reason(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tune_top_k without a study: the process refuses; the stage quotes it, keeps the old output
    monkeypatch.setenv("TUNE_STORAGE", f"sqlite:///{tmp_path / 'none' / 'studies.db'}")
    (tmp_path / "ens").mkdir()
    (tmp_path / "ens" / "report.json").write_text('{"status": "old"}')
    params = make_params({"ensemble": {"enabled": True, "members": {"tune_top_k": 2}}})
    with pytest.raises(PipelineError, match=r"members failed .*tune_top_k is 2 .*make tune"):
        stage.run(trained[0], trained[1], tmp_path / "ens", params)
    assert (tmp_path / "ens" / "report.json").read_text() == '{"status": "old"}'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ens.")] == []
