"""Data at scale: ingest + validate + features on 1M and 10M rows vs a plain pyarrow read.

For each size, a synthetic CSV (``bench.synth``) is run through the real stages, each in its own
process exactly as ``dvc repro`` runs it (``python -m stages.<name>``), in a scratch project
folder. Side by side, a process reads the same CSV with ``pyarrow.csv.read_csv`` (all of it, in
memory, multi-threaded): the plain read. Reported per size: seconds and rows/s of each step,
the stages' total as a ratio to the plain read, and each process's peak RSS (``wait4``).

Targets (issue 3): stages total <= 3x the plain read; the stages' peak RSS at 10M rows <=
1.3x their peak at 1M rows (memory bounded by ``base.batch_rows``, not by the data)::

    make bench-data                       # 1M and 10M rows (about 3 GB of scratch space)
    python -m bench.data_scale --rows 1e6 --rows 1e7 --work /tmp/bench-data
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench import synth
from bench.common import RESULTS_DIR, load_average
from stages.common.config import BaseParams
from stages.common.io import write_json

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "validate", "features")
TARGET_TIME_RATIO = 3.0
TARGET_RSS_RATIO = 1.3
SUITE_FILE = "suites/synth.json"
PLAIN_READ = "import sys, pyarrow.csv as c; t = c.read_csv(sys.argv[1]); print(t.num_rows)"


def stage_commands(project: Path) -> dict[str, list[str]]:
    """The stage commands of ``dvc.yaml``, in ``project`` (its own params.yaml)."""
    python = [sys.executable, "-m"]
    return {
        "ingest": [*python, "stages.ingest", "--out", "data/raw"],
        "validate": [
            *python,
            "stages.validate",
            "gate",
            "--raw",
            "data/raw",
            "--out",
            "data/validated",
            "--quarantine",
            "data/quarantine",
            "--report",
            "reports/validation",
        ],
        "features": [
            *python,
            "stages.features",
            "--validated",
            "data/validated",
            "--out",
            "data/features",
        ],
    }


def run_measured(cmd: list[str], cwd: Path) -> dict[str, float]:
    """Run ``cmd``; its wall seconds and peak RSS (MB), or SystemExit with its output."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}",
        "GX_ANALYTICS_ENABLED": "false",
    }
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{output[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def make_project(work: Path, source: Path, batch_rows: int) -> Path:
    """A scratch project folder whose params.yaml points ingest at ``source``."""
    project = work / f"project-{source.stem}"
    shutil.rmtree(project, ignore_errors=True)
    (project / "suites").mkdir(parents=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base"]["batch_rows"] = batch_rows
    params["ingest"].update(source=str(source), data_root=str(source.parent))
    params["validate"].update(suite_path=SUITE_FILE, max_bad_fraction=0.01)
    params["features"]["drop_columns"] = ["id"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def write_suite(work: Path, batch_rows: int, rows: int = 100_000) -> Path:
    """The reviewed suite for the synthetic table, profiled from a trusted snapshot of ``rows``.

    ``id`` is profiled as a growing (watermark) column, so it and the row count get no upper
    bound: the benchmark grows the data 100x on purpose.
    """
    snapshot = synth.write_table(rows, work / "snapshot" / "snapshot.csv")
    project = make_project(work, snapshot, batch_rows)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["watermark"] = "id"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_measured(stage_commands(project)["ingest"], project)
    suite = work / "synth.json"
    run_measured(
        [
            sys.executable,
            "-m",
            "stages.validate",
            "suite",
            "--snapshot",
            "data/raw",
            "--out",
            str(suite),
        ],
        project,
    )
    return suite


def bench_size(work: Path, rows: int, suite: Path, batch_rows: int) -> dict[str, Any]:
    """Stages and plain read on one synthetic CSV of ``rows`` rows."""
    source = work / f"rows-{rows}" / "synth.csv"
    if not source.exists():
        synth.write_table(rows, source)
    project = make_project(work, source, batch_rows)
    shutil.copy(suite, project / SUITE_FILE)
    plain = run_measured([sys.executable, "-c", PLAIN_READ, str(source)], project)
    steps = {stage: run_measured(cmd, project) for stage, cmd in stage_commands(project).items()}
    total = sum(step["seconds"] for step in steps.values())
    result = {
        "rows": rows,
        "source_mb": round(source.stat().st_size / 1e6, 1),
        "plain_read": {**plain, "rows_per_s": rows / plain["seconds"]},
        "stages": {
            name: {**step, "rows_per_s": rows / step["seconds"]} for name, step in steps.items()
        },
        "total_seconds": total,
        "total_rows_per_s": rows / total,
        "ratio_to_plain_read": total / plain["seconds"],
        "peak_rss_mb": max(step["peak_rss_mb"] for step in steps.values()),
    }
    shutil.rmtree(project, ignore_errors=True)
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    print(
        f"\n{'rows':>11} {'step':>10} {'seconds':>8} {'rows/s':>11} {'x plain':>8} "
        f"{'peak RSS MB':>12}"
    )
    for result in results:
        plain = result["plain_read"]["seconds"]
        lines = [
            ("plain read", result["plain_read"]),
            *result["stages"].items(),
            (
                "total",
                {
                    "seconds": result["total_seconds"],
                    "rows_per_s": result["total_rows_per_s"],
                    "peak_rss_mb": result["peak_rss_mb"],
                },
            ),
        ]
        for name, step in lines:
            print(
                f"{result['rows']:>11,} {name:>10} {step['seconds']:>8.2f} "
                f"{step['rows_per_s']:>11,.0f} {step['seconds'] / plain:>8.2f} "
                f"{step['peak_rss_mb']:>12.0f}"
            )


def check_targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The two targets: time ratio per size, and RSS growth from the smallest to the largest."""
    checks: dict[str, Any] = {
        f"time_ratio_{r['rows']}": {
            "value": round(r["ratio_to_plain_read"], 2),
            "target": f"<= {TARGET_TIME_RATIO}",
            "met": r["ratio_to_plain_read"] <= TARGET_TIME_RATIO,
        }
        for r in results
    }
    if len(results) > 1:
        small, large = results[0], results[-1]
        growth = large["peak_rss_mb"] / small["peak_rss_mb"]
        checks[f"rss_{large['rows']}_over_{small['rows']}"] = {
            "value": round(growth, 3),
            "target": f"<= {TARGET_RSS_RATIO}",
            "met": growth <= TARGET_RSS_RATIO,
        }
        # Diagnosis, no target: the cost per extra row, stages vs plain read, which leaves out
        # the fixed cost of starting three processes (imports: pyarrow, sklearn, GX).
        marginal = (large["total_seconds"] - small["total_seconds"]) / (
            large["plain_read"]["seconds"] - small["plain_read"]["seconds"]
        )
        checks["marginal_time_ratio"] = {
            "value": round(marginal, 2),
            "target": "(diagnosis)",
            "met": None,
        }
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.data_scale",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rows",
        type=lambda text: int(float(text)),
        action="append",
        help="table sizes, smallest first (default: 1e6 and 1e7)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/bench-data"),
        help="scratch folder (the CSVs are kept there and reused)",
    )
    parser.add_argument(
        "--batch-rows", type=int, default=BaseParams().batch_rows, help="params base.batch_rows"
    )
    parser.add_argument(
        "--snapshot-rows",
        type=int,
        default=100_000,
        help="rows of the trusted snapshot the suite is profiled from",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where data_scale.json is written"
    )
    args = parser.parse_args(argv)
    sizes = sorted(args.rows or [1_000_000, 10_000_000])
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    suite = write_suite(args.work, args.batch_rows, args.snapshot_rows)
    results = [bench_size(args.work, rows, suite, args.batch_rows) for rows in sizes]
    print_table(results)
    checks = check_targets(results)
    for name, check in checks.items():
        verdict = {True: "met", False: "NOT MET", None: "-"}[check["met"]]
        print(f"{name}: {check['value']} (target {check['target']}): {verdict}")
    write_json(
        args.results_dir / "data_scale.json",
        {
            "machine": {
                "cpu_count": os.cpu_count(),
                "python": sys.version.split()[0],
                "load_before": load_before,
                "load_after": load_average(),
            },
            "batch_rows": args.batch_rows,
            "results": results,
            "targets": checks,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
