"""Several nodes: the train stage hosts torchrun's c10d rendezvous, ``python -m
stages.train.node`` joins it; 2 nodes x 1 process on 127.0.0.1 (gloo) train the same model as
one process, and only the main node (the one running the stage) writes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from stages.common.config import parse_params
from stages.common.errors import ConfigError, PipelineError
from stages.common.io import read_json
from stages.train import distributed, node
from stages.train import stage as train
from stages.train.distributed import DistInfo, Rendezvous
from tests.postgres import free_port
from tests.stages.train.test_distributed import TRAIN, _args
from tests.stages.train.test_stage import write_train_inputs

ROOT = Path(__file__).resolve().parents[3]
# The node runs dvc.yaml's train cmd: its paths differ from the main node's, so that anything
# it wrote would show under node/.
NODE_CMD = (
    "python -m stages.train --features data/features --validation-report reports/validation "
    "--out node/models --history node/history.csv --resume-dir node/resume"
)


# --- fast: the config, the command, the writer, the errors -----------------------------------


def test_several_nodes_need_an_endpoint_a_network_and_a_batch_that_splits() -> None:
    ok = parse_params({"train": {"nnodes": 2, "rdzv_endpoint": "10.0.0.5:29400"}})
    assert ok.train.nnodes == 2
    for train_section, message in (
        ({"nnodes": 2}, "nnodes 2 needs rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "h:70000"}, "the port must be 1-65535"),
        ({"nnodes": 2, "rdzv_endpoint": "h"}, "rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1", "model": "gbdt"}, "gbdt' trains in one process"),
        (
            {"nnodes": 3, "nproc": 2, "rdzv_endpoint": "h:1", "batch_size": 64},
            "batch_size 64 does not split over 3 nodes x 2 processes",
        ),
        ({"nnodes": 0}, "train.nnodes"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_params({"train": train_section})


def test_the_torchrun_command_of_each_node() -> None:
    main = Rendezvous(2, "127.0.0.1:29400", "train-abc", True, 30)
    cmd = distributed.torchrun_command(1, "stages.train", ["--out", "models"], main)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" not in cmd
    assert cmd[cmd.index("-m", 3) :] == ["-m", "stages.train", "--out", "models"]
    assert {
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:29400",
        "--rdzv-id=train-abc",
        "--rdzv-conf=join_timeout=30,is_host=true",
        "--max-restarts=0",
    } <= set(cmd)
    other = distributed.torchrun_command(1, "m", [], Rendezvous(2, "h:1", "j", False, 30))
    assert "--rdzv-conf=join_timeout=30,is_host=false,read_timeout=30" in other
    assert "--standalone" in distributed.torchrun_command(2, "m", [])


def test_the_main_nodes_local_rank_0_writes_whatever_rank_c10d_gave_it() -> None:
    # c10d sorts the nodes by (host name, torchrun pid): the main node may get any node rank
    assert DistInfo(0, 2, 0).is_main and not DistInfo(1, 2, 0).is_main  # one node: rank 0
    assert DistInfo(1, 2, 0, "main").is_main
    assert not DistInfo(0, 2, 0, "worker").is_main
    assert not DistInfo(3, 4, 1, "main").is_main


def test_join_timeout_comes_from_the_environment() -> None:
    assert distributed.join_timeout_s({}) == distributed.DEFAULT_JOIN_TIMEOUT_S
    assert distributed.join_timeout_s({distributed.JOIN_TIMEOUT_ENV: "45"}) == 45
    with pytest.raises(ConfigError, match="TRAIN_RDZV_JOIN_TIMEOUT_S='soon'"):
        distributed.join_timeout_s({distributed.JOIN_TIMEOUT_ENV: "soon"})


def test_the_main_node_must_host_the_endpoint() -> None:
    distributed.check_main_endpoint("127.0.0.1:29400")
    distributed.check_main_endpoint("localhost:29400")
    with pytest.raises(ConfigError, match="192.0.2.7 is not an address of this machine"):
        distributed.check_main_endpoint("192.0.2.7:29400")  # TEST-NET-1: never local


def test_node_refuses_params_for_one_node(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"nnodes": 1}}))
    with pytest.raises(ConfigError, match="train.nnodes is 1 .* no job to join"):
        node.join(tmp_path / "params.yaml", tmp_path / "dvc.yaml")
    assert node.main(["--params", str(tmp_path / "params.yaml")]) == 1


def test_node_reads_the_stage_arguments_from_dvc_yaml(tmp_path: Path) -> None:
    dvc = tmp_path / "dvc.yaml"
    dvc.write_text(yaml.safe_dump({"stages": {"train": {"cmd": NODE_CMD}}}))
    assert node.stage_argv(dvc)[:2] == ["--features", "data/features"]
    dvc.write_text(yaml.safe_dump({"stages": {"train": {"cmd": "python train.py"}}}))
    with pytest.raises(ConfigError, match="does not run `python -m stages.train`"):
        node.stage_argv(dvc)
    with pytest.raises(ConfigError, match="no stages.train.cmd"):
        node.stage_argv(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_a_node_that_never_joins_times_out_naming_the_endpoint_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main node's torchrun alone, for real: the rendezvous times out within its bound."""
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv = Rendezvous(2, endpoint, "train-alone", True, 3)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    started = time.monotonic()
    with pytest.raises(PipelineError) as failed:
        # the module never runs: the rendezvous fails first
        distributed.launch_torchrun(1, "stages.train", ["--help"], rdzv)
    message = str(failed.value)
    assert "the other nodes never joined" in message and endpoint in message
    assert "train.nnodes 2" in message and "make train-node" in message
    assert "job id train-alone" in message and "TRAIN_RDZV_JOIN_TIMEOUT_S" in message
    assert time.monotonic() - started < 60


@pytest.mark.stack  # two more torchrun starts: make test stays in its budget
def test_a_taken_port_or_an_absent_main_node_fail_with_what_to_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(PipelineError, match="could not host the rendezvous: .* is taken"):
            distributed.launch_torchrun(
                1, "stages.train", [], Rendezvous(2, endpoint, "j", True, 3)
            )
    # the endpoint's port is closed now: a joining node finds no main node there
    with pytest.raises(PipelineError, match="could not reach the rendezvous: .* start the train"):
        distributed.launch_torchrun(1, "stages.train", [], Rendezvous(2, endpoint, "j", False, 3))


# --- stack: 2 nodes x 1 process on 127.0.0.1 against one process ----------------------------


@pytest.fixture
def project(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_train_inputs(tmp_path, rows=400)
    endpoint = f"127.0.0.1:{free_port()}"
    for name, nodes in (("single", {"nproc": 1}), ("nodes", {"nnodes": 2, "nproc": 1})):
        train_section = {**TRAIN, **nodes, "rdzv_endpoint": endpoint}
        (tmp_path / f"{name}.yaml").write_text(
            yaml.safe_dump({"base": {"device": "cpu"}, "train": train_section})
        )
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"cmd": NODE_CMD}}}))
    return tmp_path


def _torchrun_pid(parent: subprocess.Popen, timeout_s: float = 60) -> int:
    """The pid of the torchrun a launcher started (c10d orders the nodes by it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert parent.poll() is None, "the launcher ended before starting torchrun"
        for child in psutil.Process(parent.pid).children():
            try:
                if "torch.distributed.run" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError("no torchrun started")


@dataclass
class _Job:
    """The two nodes' launchers, their torchrun pids and their stderr files."""

    other: subprocess.Popen
    main: subprocess.Popen
    other_torchrun: int
    main_torchrun: int
    logs: dict[str, Path]
    started: float

    def log(self, name: str) -> str:
        return self.logs[name].read_text()


@contextlib.contextmanager
def _two_nodes(project: Path) -> Iterator[_Job]:
    """Start `python -m stages.train.node`, then the train stage; kill what is left at exit.

    The other node first: its torchrun gets the lower pid, so c10d makes it node rank 0
    (global rank 0), and the writer must still be the main node's process.
    """
    # OMP_NUM_THREADS=1: torchrun's default for several processes; one process gets the same.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        distributed.JOIN_TIMEOUT_ENV: "120",
    }
    logs = {name: project / f"{name}.log" for name in ("main", "other")}
    processes: list[subprocess.Popen] = []
    with logs["other"].open("w") as other_err, logs["main"].open("w") as main_err:
        try:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "stages.train.node", "--params", "nodes.yaml"],
                    cwd=project,
                    env=env,
                    start_new_session=True,  # cleanup kills torchrun and its ranks too
                    stderr=other_err,
                )
            )
            other_torchrun = _torchrun_pid(processes[0])
            started = time.monotonic()
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "stages.train", *_args(project, "nodes")],
                    cwd=project,
                    env=env,
                    start_new_session=True,  # cleanup kills torchrun and its ranks too
                    stderr=main_err,
                )
            )
            main_torchrun = _torchrun_pid(processes[1])
            yield _Job(*processes, other_torchrun, main_torchrun, logs, started)
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the launcher, torchrun, its ranks
                process.wait()


@pytest.mark.stack
def test_two_nodes_match_one_process_and_only_the_main_node_writes(project: Path) -> None:
    from mlflow.tracking import MlflowClient

    with _two_nodes(project) as job:
        main, other = job.main, job.other
        main.wait(timeout=300)
        other.wait(timeout=60)
        wall = time.monotonic() - job.started
        main_log, other_log = job.log("main"), job.log("other")
    assert main.returncode == 0, main_log[-3000:]
    assert other.returncode == 0, other_log[-3000:]
    writer_rank = 1 if job.other_torchrun < job.main_torchrun else 0
    assert f"writes the outputs: global rank {writer_rank} of 2" in main_log
    assert "writes the outputs" not in other_log and "wrote nothing" in other_log
    print(f"2 nodes x 1 process: {wall:.1f} s (writer global rank {writer_rank})")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.monotonic()
        assert train.main(_args(project, "single")) == 0
        print(f"1 process: {time.monotonic() - started:.1f} s")
    finally:
        torch.set_num_threads(threads)

    # The same tolerances as the 2-process DDP test (test_distributed.py): each global batch
    # holds the same rows, so the runs differ by float rounding only.
    single = pd.read_csv(project / "single/history.csv")
    multi = pd.read_csv(project / "nodes/history.csv")
    assert len(single) == len(multi)
    for column, tolerance in (("val_accuracy", 0.02), ("val_loss", 1e-3), ("train_loss", 1e-3)):
        gap = (single[column] - multi[column]).abs().max()
        print(f"max |{column} difference|: {gap:.2e}")
        assert gap <= tolerance
    weights = [
        torch.load(project / name / "models/model.pt", weights_only=True)["state_dict"]
        for name in ("single", "nodes")
    ]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, atol=1e-3, rtol=0)

    # Only the main node wrote: its model, history and one MLflow run; nothing under node/
    # (the other node's dvc.yaml paths), and the main node's resume checkpoint is cleared.
    assert not (project / "node").exists()
    assert not any((project / "nodes/resume").glob("*/checkpoint.pt"))
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    node_runs = [r for r in runs if r.data.tags.get("world_size") == "2"]
    assert len(runs) == 2 and len(node_runs) == 1
    assert node_runs[0].info.run_id == read_json(project / "nodes/models/run.json")["run_id"]
    assert node_runs[0].info.status == "FINISHED"


@pytest.mark.stack
def test_a_rank_that_dies_on_the_other_node_fails_the_job(project: Path) -> None:
    # long enough to be killed mid-training: 200 epochs without early stopping
    params = yaml.safe_load((project / "nodes.yaml").read_text())
    params["train"].update(max_epochs=200, patience=200)
    (project / "nodes.yaml").write_text(yaml.safe_dump(params))
    with _two_nodes(project) as job:
        deadline = time.monotonic() + 120
        while "writes the outputs" not in job.log("main"):
            assert job.main.poll() is None and time.monotonic() < deadline, job.log("main")
            time.sleep(0.2)
        rank = psutil.Process(job.other_torchrun).children()[0]
        rank.kill()  # the other node's only rank dies mid-training
        assert job.main.wait(timeout=120) == 1
        assert job.other.wait(timeout=60) == 1
        main_log, other_log = job.log("main"), job.log("other")
    assert "stage train failed: distributed training failed: train.nnodes 2" in main_log
    assert "train node failed: distributed training failed" in other_log
    assert not (project / "nodes/models").exists() and not (project / "node").exists()


@pytest.mark.stack
def test_a_stopped_job_resumes_on_both_nodes_from_the_main_nodes_checkpoint(
    project: Path,
) -> None:
    # The other node's resume folder (node/resume, from its dvc.yaml) stays empty, as on
    # another machine: it must take the main node's checkpoint, or the ranks would disagree.
    longer = {"max_epochs": 20, "patience": 20, "checkpoint_every_steps": 5}
    for name in ("nodes", "single"):
        params = yaml.safe_load((project / f"{name}.yaml").read_text())
        params["train"].update(longer)
        (project / f"{name}.yaml").write_text(yaml.safe_dump(params))
    with _two_nodes(project) as job:
        deadline = time.monotonic() + 120
        while not list((project / "nodes/resume").glob("*/checkpoint.pt")):
            assert job.main.poll() is None and time.monotonic() < deadline, job.log("main")
            time.sleep(0.05)
        job.main.send_signal(signal.SIGTERM)  # as `dvc repro` or the flow stops the stage
        assert job.main.wait(timeout=120) == 1
        job.other.wait(timeout=60)
        assert "training stopped by SIGTERM" in job.log("main")
    assert not (project / "nodes/models").exists()
    [checkpoint] = (project / "nodes/resume").glob("*/checkpoint.pt")
    stopped_at = torch.load(checkpoint, weights_only=False)["step"]

    with _two_nodes(project) as job:  # without the main node's checkpoint the ranks hang
        assert job.main.wait(timeout=180) == 0, job.log("main")[-3000:]
        assert job.other.wait(timeout=60) == 0, job.log("other")[-3000:]
        assert "resuming at epoch" in job.log("main")
    assert not (project / "node").exists()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(_args(project, "single")) == 0
    finally:
        torch.set_num_threads(threads)
    single = pd.read_csv(project / "single/history.csv")
    multi = pd.read_csv(project / "nodes/history.csv")
    assert len(single) == len(multi) == 20 and stopped_at < 20 * 20
    for column, tolerance in (("val_accuracy", 0.02), ("val_loss", 1e-3), ("train_loss", 1e-3)):
        assert (single[column] - multi[column]).abs().max() <= tolerance, column
