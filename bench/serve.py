"""Serving: `mlflow models serve` against our service, on the same registered model, same load.

A model is trained and registered with the real stages (breast cancer, a temporary sqlite MLflow
store), then both servers are started on ``models:/<name>@champion`` (loopback, one worker
each) and driven with the same HTTP requests: ``dataframe_split`` bodies of 1 and 64 rows, 1 and
16 connections kept alive, a fixed duration per cell. Each round runs every cell on every
server, the server order alternating, so drift on a shared machine hits both alike; the table
shows the median over rounds and the throughput ratio (ours / mlflow) per round, paired.
Targets (issue 5, 2 CPU cores): throughput >= 2x mlflow's, p99 <= 20 ms for single rows at
concurrency 16.

The load comes from ``wrk`` when it is installed (``apt-get install wrk``: C, one thread,
a few % of a core), else from a Python client (threads, keep-alive ``http.client``) that costs
far more CPU: its share of a core is in the table, next to the servers' CPU time per request.

    python -m bench.serve
    python -m bench.serve --servers mlflow,ours,ours-onnx --duration 10 --rounds 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, describe_machine, format_table, load_average, write_result

NAME = "serve"
ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "bench-serve-clf"
HOST = "127.0.0.1"
TARGET_RATIO = 2.0  # ours / mlflow requests per second
TARGET_P99_MS = 20.0  # single rows, concurrency 16, ours
HEADERS = {"Content-Type": "application/json"}
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*all")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"non2xx\\":%d,\\"socket\\":%d," ..
    "\\"p50_us\\":%d,\\"p99_us\\":%d}}\\n", summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""

logger = logging.getLogger(__name__)


# --- the servers --------------------------------------------------------------------------


@dataclass
class Server:
    """One HTTP server under test: how to start it and where to send requests."""

    name: str
    argv: list[str]
    port: int
    predict_path: str
    ready_path: str
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.predict_path}"


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def define_servers(names: Sequence[str], uri: str, work: Path) -> list[Server]:
    """``mlflow`` (its own scoring server) and ``ours[-<variant>]`` on the same model URI."""
    bin_dir = Path(sys.executable).parent
    mlflow_cli = (
        [str(bin_dir / "mlflow")]
        if (bin_dir / "mlflow").exists()
        else [sys.executable, "-m", "mlflow"]
    )
    servers = []
    for name in names:
        port = free_port()
        if name == "mlflow":
            argv = [
                *mlflow_cli,
                "models",
                "serve",
                "-m",
                uri,
                "--env-manager",
                "local",
                "-h",
                HOST,
                "-p",
                str(port),
                "-w",
                "1",
            ]
            servers.append(Server(name, argv, port, "/invocations", "/ping"))
            continue
        variant = name.partition("-")[2] or "pyfunc"
        argv = [
            sys.executable,
            "-m",
            "flows.serve",
            "--params",
            str(ROOT / "params.yaml"),
            "--host",
            HOST,
            "--port",
            str(port),
            "--model-name",
            MODEL_NAME,
            "--alias",
            "champion",
            "--variant",
            variant,
            "--log-level",
            "warning",
            "--log-dir",
            str(work / f"predictions-{name}"),
        ]
        servers.append(Server(name, argv, port, "/predict", "/ready"))
    return servers


def server_env(tracking_uri: str) -> dict[str, str]:
    """The servers' environment: this store, this virtualenv first on PATH (uvicorn)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_servers(
    servers: list[Server], env: dict[str, str], work: Path, timeout: float = 180.0
) -> None:
    """Start every server (in parallel), then wait until each answers its ready path."""
    for server in servers:
        server.log_path = work / f"{server.name}.log"
        with open(server.log_path, "wb") as log:
            # A session of its own: stopping it stops the worker processes it forks.
            server.proc = subprocess.Popen(
                server.argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    deadline = time.monotonic() + timeout
    for server in servers:
        _wait_ready(server, deadline)


def _wait_ready(server: Server, deadline: float) -> None:
    url = f"http://{HOST}:{server.port}{server.ready_path}"
    while time.monotonic() < deadline:
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode}:\n{_tail(server.log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{server.name} not ready at {url} in time:\n{_tail(server.log_path)}")


def _tail(path: Path | None, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""


def stop_servers(servers: list[Server]) -> None:
    """SIGTERM each server's process group; SIGKILL what is still there after 15 s."""
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGTERM)
    for server in servers:
        if server.proc is None:
            continue
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def server_cpu_seconds(server: Server) -> float:
    """User + system CPU seconds of the server and every process it forked so far."""
    import psutil

    try:
        root = psutil.Process(server.proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


# --- the load -----------------------------------------------------------------------------


def build_body(rows: Any, batch: int) -> bytes:
    """A ``dataframe_split`` request of ``batch`` rows (cycling through ``rows``)."""
    picked = rows.iloc[[i % len(rows) for i in range(batch)]]
    return json.dumps(
        {"dataframe_split": {"columns": list(picked.columns), "data": picked.to_numpy().tolist()}}
    ).encode()


def percentile_ms(latencies: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of latencies in seconds, in milliseconds."""
    import numpy as np

    return float(np.percentile(latencies, q) * 1e3) if latencies else float("nan")


def run_wrk(url: str, body_file: Path, concurrency: int, duration: float) -> dict[str, float]:
    """Closed-loop load from ``wrk`` (one thread, ``concurrency`` keep-alive connections)."""
    script = body_file.with_suffix(".lua")
    script.write_text(WRK_SCRIPT.format(body=body_file))
    seconds = max(1, round(duration))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{concurrency}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-2000:]}")
    stats = json.loads(line.removeprefix("WRKJSON "))
    wall = stats["duration_us"] / 1e6
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "requests": stats["requests"],
        "errors": stats["non2xx"] + stats["socket"],
        "seconds": wall,
        "p50_ms": stats["p50_us"] / 1e3,
        "p99_ms": stats["p99_us"] / 1e3,
        "client_cpu": cpu / wall,
    }


def run_python_client(url: str, body: bytes, concurrency: int, duration: float) -> dict[str, float]:
    """Closed-loop load from ``concurrency`` threads, each with one keep-alive connection."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start_gate = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        start_gate.wait()
        while time.perf_counter() < deadline[0]:
            t0 = time.perf_counter()
            try:
                conn.request("POST", parts.path, body, HEADERS)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except OSError:
                ok = False
                conn.close()
            latencies[i].append(time.perf_counter() - t0)
            errors[i] += not ok
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline[0] = t0 + duration
    start_gate.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    merged = [x for per in latencies for x in per]
    return {
        "requests": len(merged),
        "errors": sum(errors),
        "seconds": wall,
        "p50_ms": percentile_ms(merged, 50),
        "p99_ms": percentile_ms(merged, 99),
        "client_cpu": (time.process_time() - cpu0) / wall,
    }


def drive(
    server: Server, body_file: Path, concurrency: int, duration: float, client: str
) -> dict[str, float]:
    """One cell on one server: the load's numbers plus the server's CPU per request."""
    cpu0 = server_cpu_seconds(server)
    if client == "wrk":
        result = run_wrk(server.url, body_file, concurrency, duration)
    else:
        result = run_python_client(server.url, body_file.read_bytes(), concurrency, duration)
    cpu = server_cpu_seconds(server) - cpu0
    result["rps"] = result["requests"] / result["seconds"]
    result["server_cpu_ms_per_request"] = 1e3 * cpu / max(result["requests"], 1)
    return result


def check_same_answers(servers: list[Server], body: bytes) -> list[Any]:
    """POST one batch to every server; all must answer 200 with the same predictions."""
    answers = {}
    for server in servers:
        request = urllib.request.Request(server.url, data=body, headers=HEADERS, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
        answers[server.name] = [row["prediction"] for row in predictions]
    first = next(iter(answers.values()))
    if any(labels != first for labels in answers.values()):
        raise RuntimeError(f"the servers disagree on the same rows: {answers}")
    return first


# --- the model ----------------------------------------------------------------------------


@contextmanager
def tracking_env(uri: str) -> Iterator[None]:
    """``MLFLOW_TRACKING_URI`` = ``uri`` inside, restored after (the stages read it)."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def register_model(work: Path, epochs: int) -> tuple[str, Any]:
    """Train and register a breast-cancer MLP with the real stages; returns (URI, test rows)."""
    import pandas as pd

    from stages.common.config import parse_params
    from stages.common.io import write_parquet
    from stages.evaluate import stage as evaluate
    from stages.export import stage as export
    from stages.features import stage as features
    from stages.ingest import stage as ingest
    from stages.register import stage as register
    from stages.train import stage as train

    params = parse_params(
        {
            "base": {"device": "cpu", "seed": 0},
            "mlflow": {"experiment": "bench-serve"},
            "train": {"max_epochs": epochs},
            # no gate: the benchmark needs a champion, not a good one
            "register": {
                "model_name": MODEL_NAME,
                "min_metrics": {},
                "max_metrics": {},
                "max_gap_to_baseline": None,
            },
        }
    )
    write_parquet(work / "validated" / "data.parquet", ingest.load_sklearn_dataset("breast_cancer"))
    features.run(work / "validated", work / "features", params)
    train.run(
        work / "features",
        work / "no-report",
        work / "models",
        work / "history.csv",
        params,
        resume_dir=work / "resume",
    )
    evaluate.run(work / "features", work / "models", work / "eval", work / "metrics.json", params)
    export.run(work / "features", work / "models", work / "export.json", params)  # ours-onnx/int8
    register.run(
        work / "features",
        work / "models",
        work / "metrics.json",
        work / "registration.json",
        params,
        export_path=work / "export.json",
    )
    test = pd.read_parquet(work / "features" / "test.parquet")
    return f"models:/{MODEL_NAME}@champion", test.drop(columns=["target"])


# --- the benchmark ------------------------------------------------------------------------


def run_cells(
    servers: list[Server], rows: Any, work: Path, args: argparse.Namespace, client: str
) -> list[dict[str, Any]]:
    """Every (round, batch, concurrency, server) measurement, server order alternating."""
    results = []
    for batch in args.batches:
        body_file = work / f"body-{batch}.json"
        body_file.write_bytes(build_body(rows, batch))
        for concurrency in args.concurrency:
            for server in servers:  # warm-up: untimed
                drive(server, body_file, concurrency, args.warmup, client)
            for round_ in range(args.rounds):
                order = servers if round_ % 2 == 0 else servers[::-1]
                for server in order:
                    result = drive(server, body_file, concurrency, args.duration, client)
                    results.append(
                        {
                            "server": server.name,
                            "round": round_,
                            "batch": batch,
                            "concurrency": concurrency,
                            **result,
                        }
                    )
                    logger.info(
                        "%s b%d c%d round %d: %.0f req/s p99 %.1f ms",
                        server.name,
                        batch,
                        concurrency,
                        round_,
                        result["rps"],
                        result["p99_ms"],
                    )
    return results


def summarize_cells(raw: list[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Median over rounds per (batch, concurrency, server) + paired ratios against mlflow."""
    cells = []
    keys = sorted({(r["batch"], r["concurrency"]) for r in raw})
    for batch, concurrency in keys:
        mine = [r for r in raw if (r["batch"], r["concurrency"]) == (batch, concurrency)]
        cell: dict[str, Any] = {"batch": batch, "concurrency": concurrency}
        for name in names:
            runs = sorted((r for r in mine if r["server"] == name), key=lambda r: r["round"])
            cell[name] = {
                k: statistics.median(r[k] for r in runs)
                for k in ("rps", "p50_ms", "p99_ms", "server_cpu_ms_per_request", "client_cpu")
            }
            cell[name]["errors"] = sum(r["errors"] for r in runs)
            cell[name]["requests"] = sum(r["requests"] for r in runs)
            cell[name]["rps_per_round"] = [r["rps"] for r in runs]
        if "mlflow" in names:
            base = cell["mlflow"]["rps_per_round"]
            for name in names:
                if name != "mlflow":
                    ratios = [
                        a / b for a, b in zip(cell[name]["rps_per_round"], base, strict=False)
                    ]
                    cell[name]["throughput_ratio"] = statistics.median(ratios)
                    cell[name]["p99_ratio"] = cell[name]["p99_ms"] / cell["mlflow"]["p99_ms"]
        cells.append(cell)
    return cells


def check_targets(cells: list[dict[str, Any]], ours: str = "ours") -> dict[str, Any]:
    """Issue 5's two targets, for ``ours`` against mlflow."""
    ratios = [
        c[ours]["throughput_ratio"] for c in cells if ours in c and "throughput_ratio" in c[ours]
    ]
    single = [
        c[ours]["p99_ms"] for c in cells if ours in c and c["batch"] == 1 and c["concurrency"] == 16
    ]
    return {
        "min_throughput_ratio": min(ratios) if ratios else None,
        "throughput_target": TARGET_RATIO,
        "throughput_met": bool(ratios) and min(ratios) >= TARGET_RATIO,
        "p99_single_c16_ms": single[0] if single else None,
        "p99_target_ms": TARGET_P99_MS,
        "p99_met": bool(single) and single[0] <= TARGET_P99_MS,
    }


def describe_verdict(name: str, verdict: dict[str, Any]) -> str:
    """One line: each target, its measured value and met / MISSED (n/a: cell not run)."""

    def _state(met: bool, value: Any) -> str:
        return "n/a" if value is None else ("met" if met else "MISSED")

    ratio, p99 = verdict["min_throughput_ratio"], verdict["p99_single_c16_ms"]
    return (
        f"{name}: lowest throughput ratio vs mlflow "
        f"{'-' if ratio is None else f'{ratio:.2f}'} (target >= {TARGET_RATIO}: "
        f"{_state(verdict['throughput_met'], ratio)}); p99 single row c16 "
        f"{'-' if p99 is None else f'{p99:.1f}'} ms (target <= {TARGET_P99_MS}: "
        f"{_state(verdict['p99_met'], p99)})"
    )


def format_cells(cells: list[dict[str, Any]], names: Sequence[str]) -> str:
    """One line per (batch, concurrency, server)."""
    header = [
        "rows/req",
        "conc",
        "server",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x mlflow req/s",
        "server CPU ms/req",
        "client CPU",
        "errors",
    ]
    lines = []
    for cell in cells:
        for name in names:
            s = cell[name]
            ratio = s.get("throughput_ratio")
            lines.append(
                [
                    cell["batch"],
                    cell["concurrency"],
                    name,
                    round(s["rps"], 1),
                    s["p50_ms"],
                    s["p99_ms"],
                    f"{ratio:.2f}" if ratio else "",
                    s["server_cpu_ms_per_request"],
                    f"{100 * s['client_cpu']:.0f}%",
                    s["errors"],
                ]
            )
    return format_table(header, lines)


def pick_client(choice: str) -> str:
    """``wrk`` when asked for or (``auto``) installed; else the Python client."""
    if choice == "wrk" and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk), use --client python")
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    return choice


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--servers",
        default="mlflow,ours,ours-onnx",
        help="comma list: mlflow, ours, ours-onnx, ours-int8",
    )
    parser.add_argument("--batches", type=_ints, default=[1, 64], help="rows per request")
    parser.add_argument(
        "--concurrency", type=_ints, default=[1, 16], help="connections kept busy at once"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds of load per cell and round (whole seconds with wrk)",
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="untimed seconds per cell")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per cell")
    parser.add_argument(
        "--client",
        default="auto",
        choices=["auto", "wrk", "python"],
        help="load generator (auto: wrk when installed)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="training epochs of the model")
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where serve.json is written"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Register a model, start the servers, drive them, print and write the results."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    names = [n for n in args.servers.split(",") if n]
    client = pick_client(args.client)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        uri_store = f"sqlite:///{work / 'mlflow.db'}"
        with tracking_env(uri_store):
            model_uri, rows = register_model(work, args.epochs)
        servers = define_servers(names, model_uri, work)
        load_before = load_average()
        try:
            start_servers(servers, server_env(uri_store), work)
            check_same_answers(servers, build_body(rows, 8))
            raw = run_cells(servers, rows, work, args, client)
        finally:
            stop_servers(servers)
    cells = summarize_cells(raw, names)
    print(format_cells(cells, names))
    targets = (
        {n: check_targets(cells, n) for n in names if n != "mlflow"} if "mlflow" in names else {}
    )
    for name, verdict in targets.items():
        print(describe_verdict(name, verdict))
    path = write_result(
        NAME,
        {
            "machine": {
                **describe_machine(),
                "load_average_before": load_before,
                "load_average_after": load_average(),
            },
            "client": client,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "servers": {s.name: " ".join(s.argv[1:]) for s in servers},
            "model": MODEL_NAME,
            "cells": cells,
            "raw": raw,
            "targets": targets,
        },
        args.results_dir,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
