"""Data-parallel training: launch under torchrun, find this process's rank, shard, reduce.

The train stage re-launches itself with ``python -m torch.distributed.run`` when it should use
more than one process; each rank then calls ``current()`` to learn its place. With one process
every helper here is a cheap no-op, so the training loop has a single code path.

Several machines (``train.nnodes`` > 1): the node where DVC runs the stage (the main node)
starts torchrun with a c10d rendezvous at ``train.rdzv_endpoint``, which it hosts; every other
machine joins with ``python -m stages.train.node`` (``make train-node``). c10d numbers the
nodes by sorting (host name, torchrun's pid), so global rank 0 may live on any node: the one
process that logs and writes outputs is local rank 0 *of the main node*, which its launcher
marks in the environment (``NODE_ENV``), never "rank 0".
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import torch

from stages.common.errors import ConfigError, PipelineError

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Set by the launcher for the ranks of a several-node job: "main" on the node that runs the
# train stage (its local rank 0 writes), "worker" on the nodes `make train-node` joins.
NODE_ENV = "TRAIN_NODE"
JOIN_TIMEOUT_ENV = "TRAIN_RDZV_JOIN_TIMEOUT_S"  # how long the nodes wait for each other
DEFAULT_JOIN_TIMEOUT_S = 300
_T = TypeVar("_T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node: str | None = None  # several nodes: "main" or "worker" (NODE_ENV); None: one node

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one process that logs to MLflow and writes outputs and checkpoints."""
        if self.node is None:
            return self.rank == 0
        return self.node == "main" and self.local_rank == 0


def current() -> DistInfo:
    """Read the rank and world size torchrun put in the environment."""
    env = os.environ
    return DistInfo(
        int(env.get("RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)),
        (env.get(NODE_ENV) or None) if "LOCAL_RANK" in env else None,
    )


@dataclass(frozen=True)
class Rendezvous:
    """Where the machines of a several-node job meet: torchrun's c10d rendezvous."""

    nnodes: int
    endpoint: str  # host:port on the main node, which hosts the rendezvous store
    job_id: str  # --rdzv-id: every node derives the same one from the params and data
    main: bool  # this node runs the train stage (DVC's workspace): its local rank 0 writes
    join_timeout_s: int = DEFAULT_JOIN_TIMEOUT_S


def join_timeout_s(environ: dict[str, str] | None = None) -> int:
    """Seconds the nodes wait for each other: ``TRAIN_RDZV_JOIN_TIMEOUT_S`` or 300.

    Raises:
        ConfigError: the variable is not a positive whole number.
    """
    raw = (os.environ if environ is None else environ).get(JOIN_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_JOIN_TIMEOUT_S
    if not raw.isdigit() or int(raw) <= 0:
        raise ConfigError(
            f"environment variable {JOIN_TIMEOUT_ENV}={raw!r}: must be a positive number of "
            "seconds (how long the nodes wait for each other), or unset for "
            f"{DEFAULT_JOIN_TIMEOUT_S}"
        )
    return int(raw)


def is_local_address(host: str) -> bool:
    """Whether ``host`` names this machine: one of its addresses binds here."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False


def check_main_endpoint(endpoint: str) -> None:
    """The main node hosts the rendezvous, so ``train.rdzv_endpoint`` must be its address.

    Raises:
        ConfigError: the host is not an address of this machine.
    """
    host = endpoint.rsplit(":", 1)[0]
    if not is_local_address(host):
        raise ConfigError(
            f"train.rdzv_endpoint {endpoint}: {host} is not an address of this machine, but the "
            "machine that runs the train stage hosts the rendezvous: set train.rdzv_endpoint "
            "to this machine's host:port (a free port the other nodes can reach), on every node"
        )


def resolve_nproc(nproc: int | None, device_name: str) -> int:
    """``train.nproc``, or one process per visible GPU when it is unset (1 on CPU).

    Raises:
        ConfigError: more CUDA processes than visible GPUs.
    """
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if nproc is None:
        return torch.cuda.device_count() if cuda else 1
    if cuda and nproc > torch.cuda.device_count():
        raise ConfigError(
            f"train.nproc: {nproc} processes but only {torch.cuda.device_count()} "
            "GPU(s) visible (one process per GPU; set base.device: cpu for CPU DDP)"
        )
    return nproc


def torchrun_command(
    nproc: int, module: str, argv: Sequence[str], rendezvous: Rendezvous | None = None
) -> list[str]:
    """``python -m torch.distributed.run ...``: standalone on one node, else c10d."""
    if rendezvous is None:
        nodes = ["--standalone"]
    else:
        timeout = rendezvous.join_timeout_s
        # is_host: the main node serves the store; another node only connects, waiting up to
        # the join timeout (read_timeout) for it, so it may be started first.
        host = "is_host=true" if rendezvous.main else f"is_host=false,read_timeout={timeout}"
        nodes = [
            f"--nnodes={rendezvous.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous.endpoint}",
            f"--rdzv-id={rendezvous.job_id}",
            f"--rdzv-conf=join_timeout={timeout},{host}",
            "--max-restarts=0",  # a rank that dies fails the job, as on one node
        ]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes,
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *argv,
    ]


def launch_torchrun(
    nproc: int, module: str, argv: Sequence[str], rendezvous: Rendezvous | None = None
) -> None:
    """Run ``python -m module argv`` in ``nproc`` processes under torchrun; wait for them.

    With ``rendezvous`` this node is one of ``rendezvous.nnodes``: torchrun waits for the
    others at the endpoint, and the job ends when every node's ranks have ended.
    SIGTERM/SIGINT are passed on to torchrun, which passes them to every rank (the writing
    rank then checkpoints and ends the MLflow run KILLED).

    Raises:
        PipelineError: a rank failed (its own error is in the log above), or the nodes did
            not meet within the join timeout (the message says what to start where).
    """
    cmd = torchrun_command(nproc, module, argv, rendezvous)
    env = dict(os.environ)
    # The ranks import the stage as a module: make the project importable from any cwd.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    env.pop(NODE_ENV, None)
    if rendezvous is not None:
        env[NODE_ENV] = "main" if rendezvous.main else "worker"
    logger.info("launching %d training processes: %s", nproc, " ".join(cmd))
    # Several nodes: torchrun's stderr passes through a tee that spots a rendezvous failure.
    child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE if rendezvous else None)
    tee = _StderrTee(child.stderr) if child.stderr is not None else None
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if tee is not None:
            tee.join()
    if code == 0:
        return
    if rendezvous is not None and tee is not None:
        raise PipelineError(_node_failure(rendezvous, nproc, code, tee.failure))
    raise PipelineError(
        f"distributed training failed: torchrun with {nproc} processes "
        f"exited with code {code} (see the rank logs above)"
    )


class _StderrTee:
    """Copies a child's stderr to ours, noting the rendezvous error torchrun ends with."""

    MARKERS = ("RendezvousTimeoutError", "RendezvousConnectionError", "RendezvousClosedError")

    def __init__(self, stream: IO[bytes]) -> None:
        self.failure: str | None = None
        self._stream = stream
        self._thread = threading.Thread(target=self._copy, name="torchrun-stderr", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        for line in iter(self._stream.readline, b""):
            if out is not None:
                out.write(line)
                out.flush()
            else:
                sys.stderr.write(line.decode(errors="replace"))
            text = line.decode(errors="replace")
            for marker in self.MARKERS:
                if marker in text:
                    self.failure = marker
        self._stream.close()

    def join(self) -> None:
        self._thread.join(timeout=10)


def _node_failure(rdzv: Rendezvous, nproc: int, code: int, failure: str | None) -> str:
    """The error of a several-node job: which node waited for what, and what to start."""
    where = (
        f"train.nnodes {rdzv.nnodes} (rendezvous {rdzv.endpoint}, job id {rdzv.job_id}, "
        f"join timeout {rdzv.join_timeout_s} s, set by {JOIN_TIMEOUT_ENV})"
    )
    same = (
        "with the same checkout, params.yaml and data (`dvc pull`): a node with other params "
        "or data derives another job id and waits apart"
    )
    if failure == "RendezvousTimeoutError" and rdzv.main:
        return (
            f"the other nodes never joined: {where}: start `make train-node` "
            f"(python -m stages.train.node) on each of the {rdzv.nnodes - 1} other machine(s), "
            f"{same}; or set train.nnodes: 1"
        )
    if failure == "RendezvousTimeoutError":
        return (
            f"the job never started: {where}: not every node joined; start the train stage "
            f"(dvc repro / make run) on the main node and `make train-node` on every other "
            f"machine, {same}"
        )
    if failure == "RendezvousConnectionError" and rdzv.main:
        return (
            f"could not host the rendezvous: {where}: port {rdzv.endpoint.rsplit(':', 1)[1]} "
            "is taken on this machine (another job, or an earlier one still ending): set "
            "train.rdzv_endpoint to a free port, on every node"
        )
    if failure == "RendezvousConnectionError":
        return (
            f"could not reach the rendezvous: {where}: start the train stage (dvc repro / make "
            f"run) on the machine at {rdzv.endpoint}, which hosts it; check that the address "
            "and port are reachable from here"
        )
    return (
        f"distributed training failed: {where}: torchrun with {nproc} processes on this node "
        f"exited with code {code} (see the rank logs above and on the other nodes)"
    )


def setup(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU); return this rank's device."""
    if not info.enabled:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    return device


def teardown(info: DistInfo) -> None:
    """Leave the process group (safe to call twice or without one)."""
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard_indices(order: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's share of an epoch's order, padded like DistributedSampler.

    Rank r takes positions r, r+W, r+2W, ... so per-rank batches of ``B/W`` rows together
    hold exactly the rows of the single-process batch of ``B`` rows.
    """
    if not info.enabled:
        return order
    total = math.ceil(len(order) / info.world_size) * info.world_size
    padded = torch.cat([order, order[: total - len(order)]])
    return padded[info.rank :: info.world_size]


def sum_all(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks (``tensor`` itself with one process)."""
    if not info.enabled:
        return tensor
    import torch.distributed as dist

    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def gather_all(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``tensor`` from every rank, stacked as ``(world_size, *shape)``."""
    if not info.enabled:
        return tensor.unsqueeze(0)
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(info.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def main_rank(info: DistInfo, device: torch.device) -> int:
    """The global rank of the process that writes (a collective: every rank calls it).

    Raises:
        PipelineError: not exactly one process claims to write (two main nodes, or none).
    """
    flags = gather_all(torch.tensor([int(info.is_main)], device=device), info).flatten()
    writers = flags.nonzero().flatten().tolist()
    if len(writers) != 1:
        raise PipelineError(
            f"{len(writers)} of {info.world_size} training processes would write the outputs "
            "(one should: local rank 0 of the node that runs the train stage): run the train "
            "stage on one machine only and `make train-node` on the others"
        )
    if info.is_main:
        logger.info(
            "this process writes the outputs: global rank %d of %d, local rank 0 of the main node",
            writers[0],
            info.world_size,
        )
    return int(writers[0])


def share_from_main(value: _T, info: DistInfo, device: torch.device) -> _T:
    """``value`` as the writing process has it, on every rank (a collective)."""
    if not info.enabled:
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(
        box, src=main_rank(info, device), device=device if device.type == "cuda" else None
    )
    return box[0]


def local_batch_size(batch_size: int, info: DistInfo) -> int:
    """Rows per rank and step: ``train.batch_size`` is the global batch.

    Raises:
        ConfigError: the batch does not split evenly over the processes.
    """
    if batch_size % info.world_size:
        raise ConfigError(
            f"train.batch_size {batch_size} does not split over "
            f"{info.world_size} processes (train.nproc): use a multiple of "
            f"{info.world_size}"
        )
    return batch_size // info.world_size
