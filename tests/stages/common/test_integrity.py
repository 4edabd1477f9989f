"""Params read once, inputs checked against dvc.lock by hash (issue 10 items 3 and 4).

Fast: a hand-made dvc.yaml / dvc.lock / DVC cache in a temp folder; DVC's own Tree class is the
reference for the folder hash. The real DVC pipeline is in tests/flows/test_lineage_honesty.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from flows import verify
from stages.common import dvc_hashes, integrity, params_snapshot, tracking
from stages.common.dvc_hashes import IntegrityError
from stages.common.params_snapshot import ParamsSnapshot

DVC_YAML = {
    "stages": {
        "features": {
            "cmd": "f",
            "deps": ["data/validated"],
            "params": ["features"],
            "outs": ["data/features"],
        },
        "train": {
            "cmd": "t",
            "deps": ["stages/train/stage.py", "data/features", "reports/v/summary.json"],
            "params": ["train", "base.seed"],
            "outs": ["models"],
        },
        "evaluate": {
            "cmd": "e",
            "deps": ["data/features", "models"],
            "metrics": [{"reports/metrics.json": {"cache": False}}],
        },
        "register": {"cmd": "r", "deps": ["models", "reports/metrics.json"]},
    }
}


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _add(repo: Path, path: str, files: dict[str, bytes]) -> dict:
    """Write an output into the workspace and the DVC cache; its dvc.lock ``outs`` entry."""
    target = repo / path
    for rel, data in files.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(data)
        obj = dvc_hashes.cache_path(repo, _md5(data))
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(data)
    entries = {rel: _md5(data) for rel, data in files.items()}
    md5 = dvc_hashes.dir_hash(entries)
    obj = dvc_hashes.cache_path(repo, md5)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(dvc_hashes.dir_object(entries))
    return {"path": path, "hash": "md5", "md5": md5}


def _add_file(repo: Path, path: str, data: bytes) -> dict:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_bytes(data)
    return {"path": path, "hash": "md5", "md5": _md5(data)}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """features -> train -> evaluate -> register, with dvc.lock and cache as DVC leaves them."""
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (tmp_path / ".dvcignore").write_text("__pycache__/\n*.pyc\n")
    lock = {
        "schema": "2.0",
        "stages": {
            "features": {
                "outs": [
                    _add(
                        tmp_path,
                        "data/features",
                        {"train.parquet": b"train rows" * 100, "sub/test.bin": b"t"},
                    )
                ]
            },
            "validate": {
                "outs": [
                    _add(
                        tmp_path,
                        "reports/v",
                        {"summary.json": b'{"ok": 1}', "docs.html": b"<html>"},
                    )
                ]
            },
            "train": {
                "deps": [{"path": "data/features"}],
                "outs": [_add(tmp_path, "models", {"model.pt": b"weights"})],
            },
            "evaluate": {"outs": [_add_file(tmp_path, "reports/metrics.json", b'{"f1": 1}')]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    return tmp_path


@pytest.fixture
def under_dvc(monkeypatch: pytest.MonkeyPatch, repo: Path):
    """Run as DVC runs a stage command: DVC_STAGE and DVC_ROOT set."""
    monkeypatch.setenv("DVC_ROOT", str(repo))

    def run_as(stage: str) -> None:
        monkeypatch.setenv("DVC_STAGE", stage)

    return run_as


def _corrupt(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.chmod(0o644)  # DVC leaves its cache objects read-only
    path.write_bytes(bytes(data))
    return _md5(bytes(data))


def test_folder_hash_is_dvcs(tmp_path: Path) -> None:
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    for rel, data in {
        "a.parquet": b"x" * 5000,
        "sub/b.json": b"{}",
        "sub/c/d": b"",
        "__pycache__/m.pyc": b"ignored",
        "e.pyc": b"ignored",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    entries = dvc_hashes.hash_folder(tmp_path, ["__pycache__/", "*.pyc"])
    assert sorted(entries) == ["a.parquet", "sub/b.json", "sub/c/d"]
    tree = Tree()
    for rel, md5 in entries.items():
        tree.add(tuple(rel.split("/")), None, HashInfo("md5", md5))
    tree.digest()
    assert dvc_hashes.dir_hash(entries) == tree.hash_info.value


def test_params_are_parsed_from_the_snapshot_and_a_change_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.001\nserve:\n  port: 8000\n")
    snapshot = ParamsSnapshot.take("params.yaml")
    params.write_text("train:\n  lr: 0.5\nserve:\n  port: 8000\n")
    assert snapshot.load().train.lr == 0.001  # the bytes read at start, not the file now
    assert params_snapshot.snapshot_for("params.yaml") is snapshot
    with pytest.raises(IntegrityError) as err:
        snapshot.check_unchanged("train")
    message = str(err.value)
    assert "params.yaml changed while stage train ran (train)" in message
    assert "dvc repro train" in message

    # a section train does not declare in dvc.yaml: DVC does not lock it, the outputs stand
    params.write_text("train:\n  lr: 0.001\nserve:\n  port: 9000\n")
    snapshot.check_unchanged("train")
    with pytest.raises(IntegrityError, match="changed while stage features ran"):
        ParamsSnapshot(params, b"features:\n  test_size: 0.3\n").check_unchanged("features")
    params.unlink()
    with pytest.raises(IntegrityError, match="params.yaml changed"):
        snapshot.check_unchanged("train")
    ParamsSnapshot.take("params.yaml").check_unchanged("train")  # absent both times: fine


def test_a_change_without_dvc_yaml_refuses(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "p.yaml").write_text("serve:\n  port: 1\n")
    snapshot = ParamsSnapshot.take(tmp_path / "p.yaml")
    (tmp_path / "p.yaml").write_text("serve:\n  port: 2\n")
    with pytest.raises(IntegrityError, match="p.yaml changed while stage ingest ran"):
        snapshot.check_unchanged("ingest")


@pytest.mark.slow
def test_lineage_logs_the_params_the_stage_read(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    snapshot = ParamsSnapshot.take("params.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.5\n")
    mlflow.set_tracking_uri(mlflow_uri)
    # An explicit experiment: the fluent API otherwise reuses the id an earlier test set.
    experiment_id = mlflow.create_experiment("lineage-params")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_lineage(".", "params.yaml", params_text=snapshot.text)
    logged = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/lineage/params.yaml")
    assert logged == "train:\n  lr: 0.001\n"


def test_inputs_are_not_checked_outside_dvc(repo: Path, monkeypatch) -> None:
    monkeypatch.delenv("DVC_STAGE", raising=False)
    _corrupt(repo / "data/features/train.parquet")
    # Neither raises although the input is corrupt: nothing was checked.
    integrity.verify_stage_inputs("train", repo)  # a stage started by hand: not DVC's run
    monkeypatch.setenv("DVC_STAGE", "train")
    integrity.verify_stage_inputs("train", repo / "nowhere")  # no dvc.lock: nothing to check


def test_a_corrupt_input_stops_the_stage_naming_file_and_hashes(repo: Path, under_dvc) -> None:
    under_dvc("train")
    integrity.verify_stage_inputs("train")  # all good
    expected = _md5(b"train rows" * 100)
    actual = _corrupt(repo / "data/features/train.parquet")
    with pytest.raises(IntegrityError) as err:
        integrity.verify_stage_inputs("train")
    message = str(err.value)
    assert f"data/features/train.parquet (output of stage features) has md5 {actual}" in message
    assert f"dvc.lock expects {expected}" in message
    assert "cache object .dvc/cache/files/md5/" in message and "is good" in message
    assert "make repair" in message and "then `make run` or `make repro` (" in message
    assert "it re-runs train (a plain `dvc repro train` does too, without the run lock)" in message

    # a dependency inside another stage's output folder: that file alone is checked
    under_dvc("train")
    (repo / "reports/v/docs.html").write_bytes(b"changed, not read by train")
    (repo / "data/features/train.parquet").write_bytes(b"train rows" * 100)
    integrity.verify_stage_inputs("train")
    (repo / "reports/v/summary.json").write_bytes(b'{"ok": 0}')
    with pytest.raises(IntegrityError, match="reports/v/summary.json"):
        integrity.verify_stage_inputs("train")


def test_a_missing_or_extra_file_and_a_corrupt_dir_object(repo: Path, under_dvc) -> None:
    under_dvc("evaluate")
    (repo / "models/extra.pt").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="models/extra.pt"):
        integrity.verify_stage_inputs("evaluate")
    (repo / "models/extra.pt").unlink()
    (repo / "reports/metrics.json").unlink()
    integrity.verify_stage_inputs("evaluate")  # evaluate does not read its own output
    under_dvc("register")
    with pytest.raises(IntegrityError, match="reports/metrics.json .* is missing"):
        integrity.verify_stage_inputs("register")
    # the .dir object corrupt: the folder is checked as a whole (its hash)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    dir_md5 = lock["stages"]["train"]["outs"][0]["md5"]
    _corrupt(dvc_hashes.cache_path(repo, dir_md5))
    (repo / "models/model.pt").write_bytes(b"other weights")
    with pytest.raises(IntegrityError, match=f"models .* dvc.lock expects {dir_md5}"):
        integrity.verify_stage_inputs("register")


def test_check_and_repair_the_cache_and_the_workspace(repo: Path) -> None:
    good = b"train rows" * 100
    cached = dvc_hashes.cache_path(repo, _md5(good))
    _corrupt(cached)  # the cache object only: the workspace copy is good
    metrics = repo / "reports/metrics.json"
    metrics.write_bytes(b'{"f1": 0}')  # a corrupt output with no cache copy
    problems = integrity.check_repo(repo)
    assert {(p.path, p.cache) for p in problems} == {
        (cached.relative_to(repo).as_posix(), True),
        ("reports/metrics.json", False),
    }
    assert verify.main(["--repo", str(repo)]) == 1
    assert verify.main(["--repo", str(repo), "--repair"]) == 0
    assert cached.read_bytes() == good  # rewritten from the good workspace copy
    assert not metrics.exists()  # removed: `dvc repro` re-creates it
    assert integrity.check_repo(repo) == []

    # workspace and cache both corrupt: both removed, so `dvc repro` rebuilds the output
    _corrupt(cached)
    _corrupt(repo / "data/features/train.parquet")
    assert verify.main(["--repo", str(repo), "--repair"]) == 0
    assert not cached.exists() and not (repo / "data/features/train.parquet").exists()


def test_lineage_tags_of_a_stage_leave_out_its_own_and_later_outputs(repo: Path) -> None:
    tags = tracking.lineage_tags(repo, stage="train")
    assert "dvc.data/features.md5" in tags
    assert not {"dvc.models.md5", "dvc.reports/metrics.json.md5"} & set(tags)
    assert "dvc.models.md5" in tracking.lineage_tags(repo)  # no stage: the whole lock


def test_produced_outputs_are_hashed_from_disk_and_checked(
    repo: Path, under_dvc, monkeypatch
) -> None:
    under_dvc("register")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    produced = tracking.produced_output_tags(repo / "models", repo)
    assert produced == {
        "dvc.models.md5": lock["stages"]["train"]["outs"][0]["md5"],
        "dvc.reports/metrics.json.md5": _md5(b'{"f1": 1}'),
    }
    assert tracking.produced_output_tags(repo / "elsewhere", repo) == {}  # not a DVC output
    monkeypatch.delenv("DVC_STAGE")
    assert tracking.produced_output_tags(repo / "models", repo) == {}  # run by hand
    under_dvc("register")
    (repo / "models/model.pt").write_bytes(b"swapped after dvc locked it")
    with pytest.raises(IntegrityError, match="models .* has md5 .*, dvc.lock expects"):
        tracking.produced_output_tags(repo / "models", repo)


def test_repair_restores_a_corrupt_workspace_file_from_its_good_cache_object(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The fault: `make repair` deleted a corrupt workspace file whose DVC cache object was good,
    # then `make verify` called it missing and advised `make repair ... then dvc repro` again.
    good = b"train rows" * 100
    train = repo / "data/features/train.parquet"
    _corrupt(train)
    (repo / "data/features/sub/test.bin").unlink()  # missing from its folder: restored too
    obj = dvc_hashes.cache_path(repo, _md5(good)).relative_to(repo).as_posix()

    assert verify.main(["--repo", str(repo)]) == 1
    err = capsys.readouterr().err
    assert f"cache object {obj} is good" in err
    assert "then `make run` or `make repro` (" in err and "dvc repro" not in err

    assert verify.main(["--repo", str(repo), "--repair"]) == 0

    out = capsys.readouterr().out.splitlines()
    small = dvc_hashes.cache_path(repo, _md5(b"t")).relative_to(repo).as_posix()
    assert sorted(out[:2]) == [
        (
            f"restored corrupt data/features/train.parquet from its good DVC cache object {obj} "
            f"(md5 {_md5(good)})"
        ),
        (
            f"restored missing data/features/sub/test.bin from its good DVC cache object {small} "
            f"(md5 {_md5(b't')})"
        ),
    ]
    assert out[2] == "every file repaired in place: nothing to re-run (`make verify` checks again)"
    assert train.read_bytes() == good
    assert (repo / "data/features/sub/test.bin").read_bytes() == b"t"
    assert train.stat().st_mode & 0o200  # writable, as DVC's workspace copies are
    assert not list(train.parent.glob(".*.repair"))  # no temp file left
    assert dvc_hashes.cache_path(repo, _md5(good)).read_bytes() == good  # the object untouched
    assert integrity.check_repo(repo) == []


def test_repair_points_at_make_run_for_what_it_removed(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (repo / "reports/metrics.json").write_bytes(b'{"f1": 0}')  # no cache copy (cache: false)

    assert verify.main(["--repo", str(repo), "--repair"]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out == [
        "removed reports/metrics.json (not the bytes dvc.lock records)",
        (
            "now run `make run` or `make repro` (re-runs or restores evaluate); "
            "`dvc pull` first if the DVC remote holds good copies"
        ),
    ]
