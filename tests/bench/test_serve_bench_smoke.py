"""Smoke run of the serving benchmark at minimal size, so its code cannot rot.

Real servers (``mlflow models serve`` and ours) on 127.0.0.1, a real registered model in a
temporary store; nothing is timed or compared: the numbers come from ``make bench-serve``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.io import read_json

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--servers",
    "mlflow,ours",
    "--batches",
    "1,4",
    "--concurrency",
    "2",
    "--duration",
    "0.3",
    "--warmup",
    "0.1",
    "--rounds",
    "1",
    "--client",
    "python",
    "--epochs",
    "2",
]


@pytest.mark.stack  # out of make test's 20 minutes (issue 14); .ci/run runs it
@pytest.mark.slow
def test_serve_bench_drives_both_servers_and_writes_the_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.serve", *TINY, "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "x mlflow req/s" in done.stdout  # the table was printed
    result = read_json(tmp_path / "serve.json")
    assert {"cpu", "cpu_count"} <= set(result["machine"])
    assert [(c["batch"], c["concurrency"]) for c in result["cells"]] == [(1, 2), (4, 2)]
    for cell in result["cells"]:
        for server in ("mlflow", "ours"):
            assert cell[server]["requests"] > 0 and cell[server]["errors"] == 0
            assert cell[server]["p99_ms"] >= cell[server]["p50_ms"] > 0
        assert cell["ours"]["throughput_ratio"] > 0
    assert set(result["targets"]["ours"]) >= {"throughput_met", "p99_met"}
