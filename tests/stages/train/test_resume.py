"""Crash-safe training: resume checkpoints, SIGKILL/SIGTERM mid-epoch, the MLflow run's end state.

The kill tests run ``python -m stages.train`` as a real subprocess against a real MLflow store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from model.nets import build_network
from stages.common.config import TrainParams
from stages.common.io import read_json
from stages.train import loop
from stages.train import stage as train
from stages.train.checkpoint import GracefulStop, ResumeStore, TrainingInterrupted, hash_files
from tests.stages.train.test_stage import CPU, fit, make_tensors, write_train_inputs

ROOT = Path(__file__).resolve().parents[3]
# Big enough that one epoch is hundreds of steps (a kill lands mid-epoch), small enough to be
# seconds: 3000 rows -> 1920 train rows -> 240 steps of 8 per epoch.
TRAIN = {
    "hidden_sizes": [64, 64],
    "lr": 0.003,
    "batch_size": 8,
    "max_epochs": 3,
    "patience": 3,
    "checkpoint_every_steps": 5,
}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One intra-op thread here and in the subprocesses: tiny steps on a shared 2-core box
    are ~10x slower with two spinning OpenMP threads, and every run must use the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- in process


def test_stop_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # Everything that carries state: SGD momentum, one-cycle LR, clipping, augmentation RNG,
    # dropout RNG, the shuffle generator and a partial epoch's loss sum.
    params = TrainParams(
        model="cnn",
        image_shape=[1, 4, 4],
        channels=[2, 4],
        dropout=0.2,
        batch_size=8,
        max_epochs=4,
        patience=4,
        optimizer="sgd",
        lr=0.05,
        lr_schedule="onecycle",
        max_grad_norm=1.0,
        augment_crop_pad=1,
        augment_noise=0.05,
        checkpoint_every_steps=4,
    )
    data = make_tensors(n=64, n_features=16)  # 48 train rows: 6 steps per epoch
    reference = fit(params, data)
    store, stop = ResumeStore(tmp_path, "0" * 16), GracefulStop()

    def stop_after_epoch_2(row: dict[str, float]) -> None:
        if row["epoch"] == 2:
            stop.signal_name = "SIGTERM"  # what the handler records when the signal arrives

    loop.seed_torch(0, CPU)
    network = build_network(params, 16, 2)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM at epoch 3, step 13"):
        loop.train_model(
            network,
            data,
            params,
            CPU,
            0,
            stop_after_epoch_2,
            store=store,
            stop=stop,
            checkpoint_extra={"run_id": "abc"},
        )
    checkpoint = store.load()
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (3, 1, 13)
    assert checkpoint["run_id"] == "abc" and len(checkpoint["history"]) == 2

    torch.manual_seed(999)  # a new process: other RNG state, other initial weights
    network = build_network(params, 16, 2)
    resumed = loop.train_model(network, data, params, CPU, 0, store=store, resume=store.load())

    assert resumed.history == reference.history
    assert resumed.best_epoch == reference.best_epoch
    assert all(
        torch.equal(resumed.state_dict[k], reference.state_dict[k]) for k in reference.state_dict
    )


def test_checkpoint_is_keyed_by_params_and_data(tmp_path: Path) -> None:
    from stages.train.checkpoint import resume_key

    (tmp_path / "a").write_bytes(b"rows")
    data_hash = hash_files([tmp_path / "a"])
    key = resume_key({"lr": 0.1}, data_hash)
    (tmp_path / "a").write_bytes(b"other rows")

    assert key == resume_key({"lr": 0.1}, data_hash)
    assert key != resume_key({"lr": 0.2}, data_hash)
    assert key != resume_key({"lr": 0.1}, hash_files([tmp_path / "a"]))
    stale = ResumeStore(tmp_path / "resume", resume_key({"lr": 0.2}, data_hash))
    stale.save({"epoch": 1})
    (tmp_path / "resume" / "notes").mkdir()
    current = ResumeStore(tmp_path / "resume", key)
    assert current.load() is None
    current.clear_others()
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["notes"]


# ----------------------------------------------------------------------------- subprocess


@pytest.fixture
def project(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path with 3000-row features, a validation report and params.yaml (TRAIN)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": TRAIN}))
    return write_train_inputs(tmp_path, rows=3000)


def _args(root: Path, name: str) -> list[str]:
    return [
        "--params",
        str(root / "params.yaml"),
        "--features",
        str(root / "data/features"),
        "--validation-report",
        str(root / "reports/validation"),
        "--out",
        str(root / name / "models"),
        "--history",
        str(root / name / "history.csv"),
        "--resume-dir",
        str(root / name / "resume"),
    ]


def _start(root: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """``python -m stages.train`` in a subprocess; returns it and its resume folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train", *_args(root, name)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, root / name / "resume"


def _wait_for_checkpoint(proc: subprocess.Popen, resume: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(resume.glob("*/checkpoint.pt"))
        if found:
            return found[0]
        assert proc.poll() is None, f"trainer exited early:\n{proc.stdout.read()}"
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def _runs(status: str | None = None) -> list:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # not an earlier test's store
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    return [r for r in runs if status is None or r.info.status == status]


def _weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(root / name / "models" / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_gives_identical_weights_and_metrics(project: Path) -> None:
    assert train.main(_args(project, "reference")) == 0

    proc, resume = _start(project, "killed")
    checkpoint_file = _wait_for_checkpoint(proc, resume)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    assert checkpoint["epoch"] == 1 and 0 < checkpoint["batch"] < 240  # killed mid-epoch
    assert not (project / "killed" / "models").exists()
    [stuck] = _runs("RUNNING")  # SIGKILL gives MLflow no chance: the re-run must finish it

    assert train.main(_args(project, "killed")) == 0  # resumes from the checkpoint

    reference, resumed = _weights(project, "reference"), _weights(project, "killed")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert (project / "reference/history.csv").read_text() == (
        project / "killed/history.csv"
    ).read_text()
    run_id = read_json(project / "killed/models/run.json")["run_id"]
    assert run_id == stuck.info.run_id  # the same MLflow run, continued
    assert {r.info.status for r in _runs()} == {"FINISHED"} and len(_runs()) == 2
    assert not list(resume.iterdir())  # a finished run leaves no resume state behind


@pytest.mark.slow
def test_sigterm_checkpoints_ends_the_run_killed_and_a_rerun_finishes_it(project: Path) -> None:
    proc, resume = _start(project, "term")
    checkpoint_file = _wait_for_checkpoint(proc, resume)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)

    assert proc.returncode == 1, output
    assert "training stopped by SIGTERM at epoch" in output
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    [killed] = _runs()
    assert killed.info.status == "KILLED" and checkpoint["run_id"] == killed.info.run_id
    assert not (project / "term" / "models").exists()

    assert train.main(_args(project, "term")) == 0

    [finished] = _runs()
    assert finished.info.run_id == killed.info.run_id and finished.info.status == "FINISHED"
    assert finished.data.tags["resumed_at_step"] == str(checkpoint["step"])
    assert read_json(project / "term/models/run.json")["run_id"] == killed.info.run_id
