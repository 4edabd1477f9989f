"""Honest lineage and verified data, end to end (issue 10 items 3 and 4).

The session's reproduced pipeline (``tests/conftest.py``: one real ``dvc repro`` of the TINY
params, committed and pushed), copied for each test; then, on the copy, the faults the issue
found:

* the model version's ``dvc.<output>.md5`` tags name the model that run produced;
* a corrupt object in the DVC remote: ``flows.reproduce`` stops right after ``dvc pull``;
* a flipped byte in a DVC cache object of ``data/features``, checked out into the workspace
  (``dvc status`` stays clean): the next stage that reads it stops naming the file and both
  hashes; ``python -m flows.verify --repair`` and ``dvc repro`` repair it;
* ``params.yaml`` edited while train runs: the stage fails, no output, ``dvc status`` still
  shows train changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT, Reproduced, dvc

pytestmark = pytest.mark.slow

MODEL = "classifier"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cached(repo: Path, md5: str) -> Path:
    return repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def _dir_hash(folder: Path) -> str:
    """DVC's own hash of a folder (dvc_data's Tree), for comparison."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    tree = Tree()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        tree.add(file.relative_to(folder).parts, None, HashInfo("md5", _md5(file)))
    tree.digest()
    return tree.hash_info.value


def _integrity(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.verify", "--repo", str(repo), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def _lock_out(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def _dir_entries(repo: Path, dir_md5: str) -> dict[str, str]:
    listing = json.loads(_cached(repo, dir_md5).read_bytes())
    return {item["relpath"]: item["md5"] for item in listing}


def _flip_byte(path: Path) -> None:
    """Bit rot: one byte flipped, size and mtime kept (what DVC's state database keys on)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)  # DVC leaves its objects read-only
    path.write_bytes(bytes(data))
    path.chmod(stat.st_mode)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.fixture
def pipeline(reproduced: Reproduced, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """This test's copy of the session's reproduced TINY pipeline (committed, pushed to its
    local remote ``.dvcstore``): the repo and its MLflow store's URI (MLFLOW_TRACKING_URI)."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return reproduced.repo, reproduced.uri


def test_version_tags_name_the_model_that_run_produced(pipeline) -> None:
    from mlflow import MlflowClient

    repo, uri = pipeline
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(MODEL, "champion")
    models = _lock_out(repo, "train", "models")
    # the model the run wrote (dvc.lock and the files on disk agree), not the previous one
    assert version.tags["dvc.models.md5"] == models
    assert _dir_hash(repo / "models") == models
    assert version.tags["dvc.reports/metrics.json.md5"] == _lock_out(
        repo, "evaluate", "reports/metrics.json"
    )
    assert version.tags["dvc.data/features.md5"] == _lock_out(repo, "features", "data/features")
    run = client.get_run(version.run_id)
    assert run.data.tags["dvc.models.md5"] == models


def test_reproduce_refuses_a_corrupt_object_pulled_from_the_remote(
    pipeline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows import reproduce

    repo, _ = pipeline
    raw = _dir_entries(repo, _lock_out(repo, "ingest", "data/raw"))
    name, md5 = next((rel, m) for rel, m in raw.items() if rel.endswith(".parquet"))
    remote_object = repo / ".dvcstore" / "files" / "md5" / md5[:2] / md5[2:]
    good = remote_object.read_bytes()
    _flip_byte(remote_object)
    bad_md5 = _md5(remote_object)
    try:
        code = reproduce.main(
            [f"{MODEL}@champion", "--repo", str(repo), "--workdir", str(tmp_path / "ws")]
        )
    finally:
        remote_object.chmod(0o644)
        remote_object.write_bytes(good)
    err = capsys.readouterr().err
    assert code == 1
    assert f"data/raw/{name}" in err and md5 in err and bad_md5 in err, err
    assert str(remote_object) in err and "dvc push" in err, err
    assert "stage 1/" not in err  # stopped before any stage ran on the bad data


def test_flipped_byte_in_a_cache_object_stops_the_next_stage_and_repair_works(pipeline) -> None:
    repo, _ = pipeline
    features = _lock_out(repo, "features", "data/features")
    expected = _dir_entries(repo, features)["train.parquet"]
    cached = _cached(repo, expected)
    _flip_byte(cached)
    bad = _md5(cached)
    # DVC trusts the object's name: the corrupt bytes reach the workspace, status stays clean
    (repo / "data/features/train.parquet").unlink()
    dvc(repo, "checkout", "data/features")
    assert _md5(repo / "data/features/train.parquet") == bad
    assert "up to date" in dvc(repo, "status", "features").stdout

    result = dvc(repo, "repro", "--single-item", "--force", "train", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "stage train refuses its input" in output, output[-3000:]
    assert "data/features/train.parquet" in output and expected in output and bad in output
    assert "make repair" in output and "dvc repro train" in output
    assert "corrupt too" in output  # the cache object is named as the source

    check = _integrity(repo)
    assert check.returncode == 1 and "train.parquet" in check.stderr
    repaired = _integrity(repo, "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert not cached.exists() and not (repo / "data/features/train.parquet").exists()

    result = dvc(repo, "repro", "train", check=False)  # features re-runs, re-adds the object
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _md5(cached) == expected
    assert _md5(repo / "data/features/train.parquet") == expected
    assert _integrity(repo).returncode == 0


def _has_open(proc: subprocess.Popen, path: Path) -> bool:
    """Whether a process under ``proc`` has ``path`` open."""
    try:
        processes = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return False
    for process in processes:
        try:
            if any(Path(f.path) == path for f in process.open_files()):
                return True
        except psutil.Error:
            continue
    return False


def test_params_edited_while_train_runs_fail_the_stage(pipeline) -> None:
    from mlflow import MlflowClient

    repo, uri = pipeline
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    models_before = _dir_hash(repo / "models")
    params = yaml.safe_load(original)
    params["train"]["lr"] = 0.002  # train re-runs
    params_file.write_text(yaml.safe_dump(params))
    # The edit must land after the stage read params.yaml and before it ends. The stage reads
    # it first thing (run_main); it opens the MLflow store later (configure_mlflow) and takes
    # a write lock there, which it waits for (sqlite's 30 s busy timeout) while we hold it.
    db = Path(uri.removeprefix("sqlite:///"))
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", "train"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _has_open(proc, db):  # the stage has read params and waits for the lock
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "train never opened the MLflow store"
            time.sleep(0.05)
        params["train"]["lr"] = 0.003  # edited while train runs
        params_file.write_text(yaml.safe_dump(params))
        blocker.rollback()
        output, _ = proc.communicate(timeout=300)
    finally:
        blocker.close()
        if proc.poll() is None:
            proc.kill()
    try:
        assert proc.returncode != 0, output[-3000:]
        assert "params.yaml changed while stage train ran (train)" in output, output[-3000:]
        assert "dvc repro train" in output
        # nothing recorded: the old model stays, dvc.lock still holds the old params
        assert _dir_hash(repo / "models") == models_before
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] == 0.001
        status = dvc(repo, "status", "train").stdout
        assert "train" in status and "changed" in status, status
        # the run used and logged the params it read at start, and ended FAILED
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("pipeline")
        run = client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
        )[0]
        assert run.info.status == "FAILED" and run.data.params["train.lr"] == "0.002"
        local = client.download_artifacts(run.info.run_id, "lineage/params.yaml", str(repo.parent))
        assert yaml.safe_load(Path(local).read_text())["train"]["lr"] == 0.002
    finally:
        params_file.write_text(original)  # (a copy: for a rerun by hand)
