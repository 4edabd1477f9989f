"""The edit-run loop: how long a user waits for the pipeline, against a plain script.

Each round clones the committed project (``git clone`` of HEAD) into a temporary folder, the
clean state a new user starts from (no DVC cache, no MLflow store, no Prefect home), and times,
each as its own process with the project's virtualenv first on PATH (as ``make`` runs them):

1. ``full_run``: ``python -m flows.pipeline --repo .`` (what ``make run`` runs) on the default data;
2. ``noop_run``: the same again right after, nothing changed;
3. ``dvc_repro_lr``: plain ``dvc repro`` after changing only ``train.lr`` in params.yaml (x2);
4. ``make_repro_lr``: ``python -m flows.repro --repo .`` (``make repro``: the MLflow check,
   ``dvc repro``, the cache check and ``dvc push``) after changing ``train.lr`` again (x3: a
   value the DVC run cache has not seen).

Side by side, in the same round: ``plain``, one Python script written by this benchmark
(``PLAIN_SCRIPT``) and run with the same interpreter, imports counted, doing the pipeline's work
on the default data with the values of the clone's params.yaml: load sklearn's breast_cancer,
the stratified train/val/test split (``features`` fractions, ``base.seed``), standard scaling
fitted on train, the same MLP and AdamW (``train``: hidden sizes, dropout, lr, weight decay,
batch size, max epochs, patience on validation loss), macro F1 on the test split, the weights
saved. It is run once untimed first (``--warmup``), so the page cache holds its libraries.

Targets (issue 11): full run <= 3x the plain script; ``dvc repro`` after one param change <= 2x
the plain script; a no-op run <= 5% of a full run. Missed targets are reported, not an error.
Also reported: where the time of each run goes (the flow's task durations from its Prefect
store, the temporary Prefect server's start, the stages of ``dvc repro`` from its output)::

    make bench-feedback
    python -m bench.feedback --repeats 3 --keep   # keep the clones and logs (path printed)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    RESULTS_DIR,
    describe_machine,
    format_table,
    load_average,
    paired_ratios,
    summarize,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
NAME = "feedback"
STEPS = ("plain", "full_run", "noop_run", "dvc_repro_lr", "make_repro_lr")
# target name: (numerator step, denominator step, at most)
TARGETS = {
    "full_run_over_plain": ("full_run", "plain", 3.0),
    "param_change_over_plain": ("dvc_repro_lr", "plain", 2.0),
    "noop_over_full_run": ("noop_run", "full_run", 0.05),
}
DIAGNOSTIC_RATIOS = {"make_repro_lr_over_plain": ("make_repro_lr", "plain")}
LR_FACTORS = {"dvc_repro_lr": 2.0, "make_repro_lr": 3.0}
PLAIN_RUNS = 2  # the plain script per round; the faster run counts (it varies most under load)

PLAIN_SCRIPT = r'''"""The pipeline's work on the default data as one plain script (bench.feedback).

usage: python plain.py PARAMS_YAML MODEL_OUT   (prints one JSON line)
"""
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

with open(sys.argv[1], encoding="utf-8") as file:
    params = yaml.safe_load(file)
seed, split, train = params["base"]["seed"], params["features"], params["train"]

X, y = load_breast_cancer(return_X_y=True)
X_rest, X_test, y_rest, y_test = train_test_split(
    X, y, test_size=split["test_size"], stratify=y, random_state=seed)
X_train, X_val, y_train, y_val = train_test_split(
    X_rest, y_rest, test_size=split["val_size"] / (1 - split["test_size"]), stratify=y_rest,
    random_state=seed)
scaler = StandardScaler().fit(X_train)


def tensors(features, labels):
    return (torch.tensor(scaler.transform(features), dtype=torch.float32),
            torch.tensor(labels, dtype=torch.long))


X_train, y_train = tensors(X_train, y_train)
X_val, y_val = tensors(X_val, y_val)
X_test, y_test = tensors(X_test, y_test)

torch.manual_seed(seed)
layers, width = [], X_train.shape[1]
for hidden in train["hidden_sizes"]:
    layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(train["dropout"])]
    width = hidden
model = nn.Sequential(*layers, nn.Linear(width, len(np.unique(y))))
optimizer = torch.optim.AdamW(model.parameters(), lr=train["lr"],
                              weight_decay=train["weight_decay"])
order = torch.Generator().manual_seed(seed)

best_loss, best_state, best_epoch, since_best, epoch = float("inf"), None, 0, 0, 0
for epoch in range(1, train["max_epochs"] + 1):
    model.train()
    for index in torch.randperm(len(y_train), generator=order).split(train["batch_size"]):
        loss = F.cross_entropy(model(X_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        val_loss = F.cross_entropy(model(X_val), y_val).item()
    if val_loss < best_loss:
        best_loss, best_epoch, since_best = val_loss, epoch, 0
        best_state = {key: value.clone() for key, value in model.state_dict().items()}
    else:
        since_best += 1
        if since_best >= train["patience"]:
            break

model.load_state_dict(best_state)
model.eval()
with torch.no_grad():
    predicted = model(X_test).argmax(dim=1).numpy()
torch.save(model.state_dict(), sys.argv[2])
print(json.dumps({"f1_macro": float(f1_score(y_test.numpy(), predicted, average="macro")),
                  "epochs": epoch, "best_epoch": best_epoch, "val_loss": best_loss,
                  "rows": {"train": len(y_train), "val": len(y_val), "test": len(y_test)}}))
'''

# Lines of `make run`'s console log that start its phases (flows/pipeline.py's and Prefect 3's
# own words), in the order they come.
_PHASES = (
    (r"stage ingest: asking the source", "ingest + dvc status, before Prefect"),
    (r"Prefect API: ", "Prefect import"),
    (r"Starting temporary server", "Prefect server start"),
    (r"Flow run '[^']+' - Beginning flow run", "flow run"),
    (r"Flow run '[^']+' - Finished in state", "after the flow (summary, server stop)"),
    (r"^Nothing changed: ", "summary"),
)
# DVC's own words (as flows/pipeline.py reads them) marking where each stage starts.
_DVC_STAGE = re.compile(
    r"(?:Running stage '(?P<ran>[^']+)':|"
    r"Stage '(?P<skipped>[^']+)' didn't change, skipping)"
)


def pipeline_env(repo: Path) -> dict[str, str]:
    """What ``make`` exports for ``run``/``repro``, for a workspace at ``repo``.

    The virtualenv's bin first on PATH (the ``python`` of dvc.yaml's commands), Prefect's home
    in the workspace, everything offline and quiet; bytecode writing on, as users' Python does;
    no ``MLFLOW_TRACKING_URI``: params.yaml's store inside the workspace is used.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        PREFECT_HOME=str(repo / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        GX_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    for name in ("PYTHONDONTWRITEBYTECODE", "MLFLOW_TRACKING_URI", "PYTHONPATH"):
        env.pop(name, None)
    return env


def run_step(
    cmd: Sequence[str], cwd: Path, env: dict[str, str], log: Path
) -> tuple[float, list[tuple[float, str]], float]:
    """Run ``cmd``; its wall seconds, its output lines (each with the second it arrived) and
    the CPU seconds (user + system) of it and every process it waited for.

    The output (stdout and stderr together) is also written to ``log``. A failing command
    stops the benchmark (SystemExit with the end of its output).
    """
    lines: list[tuple[float, str]] = []
    cpu_before = _children_cpu()
    start = time.perf_counter()
    with (
        subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        ) as proc,
        open(log, "w") as out,
    ):
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n").split("\r")[-1]
            lines.append((time.perf_counter() - start, text))
            out.write(text + "\n")
    seconds = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    if proc.returncode != 0:
        tail = "\n".join(text for _, text in lines[-40:])
        raise SystemExit(
            f"{' '.join(cmd)} failed (exit {proc.returncode}) in {cwd}; log: {log}\n{tail}"
        )
    return seconds, lines, cpu


def _children_cpu() -> float:
    # Waited-for descendants only: a step's processes count once each has exited.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def clone_workspace(dest: Path) -> str:
    """A fresh clone of the project's committed HEAD at ``dest``; returns its commit."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=dest, check=True, capture_output=True, text=True
    ).stdout.strip()


def set_lr(repo: Path, lr: float) -> None:
    """Change ``train.lr`` in ``repo/params.yaml`` and nothing else (values, not comments)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["train"]["lr"] = lr
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def write_plain_script(folder: Path) -> Path:
    """``PLAIN_SCRIPT`` as ``folder/plain.py``."""
    script = folder / "plain.py"
    script.write_text(PLAIN_SCRIPT, encoding="utf-8")
    return script


def run_plain(params_file: Path, folder: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run the plain script once on ``params_file``'s values, in a process of this interpreter.

    Returns:
        ``seconds`` (wall, the process start and imports included), ``cpu_seconds`` and what
        the script printed: ``f1_macro`` on the test split, ``epochs``, ``best_epoch``, ``rows``.
    """
    script = write_plain_script(folder)
    seconds, lines, cpu = run_step(
        [
            sys.executable,
            str(script),
            str(Path(params_file).resolve()),
            str(folder / "plain-model.pt"),
        ],
        folder,
        env or dict(os.environ),
        folder / "plain.log",
    )
    result = json.loads(next(text for _, text in reversed(lines) if text.startswith("{")))
    return {"seconds": seconds, "cpu_seconds": cpu, **result}


def flow_breakdown(
    seconds: float, lines: list[tuple[float, str]], prefect_home: Path
) -> dict[str, float]:
    """Where a ``make run``'s wall time went: start-up, ingest and ``dvc status`` before
    Prefect, Prefect's import and server, each task, the rest.

    Phases run from the first log line that marks them (``_PHASES``) to the next one found.
    When a flow ran, its task durations come from its Prefect store (``prefect_home/prefect.db``,
    the latest flow run), and the flow's phase is split into them.
    """
    marks = [("start-up (imports, lock, MLflow check)", 0.0)]
    for mark, phase in _PHASES:
        found = next((t for t, text in lines if re.search(mark, text)), None)
        if found is not None:
            marks.append((phase, found))
    marks.sort(key=lambda item: item[1])
    ends = [t for _, t in marks[1:]] + [seconds]
    parts = {phase: end - start for (phase, start), end in zip(marks, ends, strict=True)}
    if "flow run" not in parts:  # no flow run (nothing changed): nothing in the store is ours
        return parts
    try:
        tasks, flow_seconds = _prefect_durations(prefect_home / "prefect.db")
    except (sqlite3.Error, LookupError) as exc:
        print(f"(no task durations from the Prefect store: {exc})", file=sys.stderr)
        return parts
    flow_phase = parts.pop("flow run")
    parts.update({f"task {name}": value for name, value in tasks.items()})
    parts["flow, between tasks"] = flow_seconds - sum(tasks.values())
    parts["other"] = flow_phase - flow_seconds
    return parts


def _prefect_durations(db: Path) -> tuple[dict[str, float], float]:
    """The latest flow run's task durations by task name, and its own duration (seconds)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(
            "SELECT id, (julianday(end_time) - julianday(start_time)) * 86400 "
            "FROM flow_run ORDER BY start_time DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise LookupError(f"no flow run in {db}")
        flow_id, flow_seconds = row
        tasks = conn.execute(
            "SELECT name, (julianday(end_time) - julianday(start_time)) "
            "* 86400 FROM task_run WHERE flow_run_id = ? ORDER BY start_time",
            (flow_id,),
        ).fetchall()
    finally:
        conn.close()
    durations: dict[str, float] = {}
    for name, value in tasks:  # task run names are <task>-<3 hex digits>
        key = re.sub(r"-[0-9a-f]{3}$", "", name)
        durations[key] = durations.get(key, 0.0) + (value or 0.0)
    return durations, flow_seconds or 0.0


def repro_breakdown(seconds: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds from each stage's first line in DVC's output to the next stage's (the last one
    to the end: ``make repro``'s push included); before the first stage: DVC's start-up."""
    marks = [("start-up", 0.0)]
    for t, text in lines:
        if match := _DVC_STAGE.search(text):
            stage = match["ran"] or match["skipped"]
            marks.append((f"{stage} ({'ran' if match['ran'] else 'skipped'})", t))
    ends = [t for _, t in marks[1:]] + [seconds]
    return {name: end - start for (name, start), end in zip(marks, ends, strict=True)}


def bench_round(work: Path, index: int) -> dict[str, Any]:
    """One round: the plain script and the four pipeline steps, in a fresh clone."""
    folder = work / f"round-{index}"
    folder.mkdir(parents=True)
    repo = folder / "repo"
    commit = clone_workspace(repo)
    env = pipeline_env(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    base_lr = float(params["train"]["lr"])
    flow = [sys.executable, "-m", "flows.pipeline", "--repo", "."]
    result: dict[str, Any] = {
        "commit": commit,
        "source": params["ingest"]["source"],
        "seconds": {},
        "cpu_seconds": {},
        "breakdown": {},
        "lr": {"base": base_lr},
    }

    # The plain script does the full run's work: the values before the lr changes below.
    params_file = shutil.copy(repo / "params.yaml", folder / "params.yaml")

    def plain() -> None:
        # The most load-sensitive step: the faster of PLAIN_RUNS runs.
        runs = [
            run_plain(Path(params_file), folder, pipeline_env(folder)) for _ in range(PLAIN_RUNS)
        ]
        result["plain"] = min(runs, key=lambda run: run["seconds"])
        result["plain"]["all_seconds"] = [run["seconds"] for run in runs]
        result["seconds"]["plain"] = result["plain"]["seconds"]
        result["cpu_seconds"]["plain"] = result["plain"]["cpu_seconds"]

    if index % 2 == 0:  # alternate: the plain script before, then after the pipeline steps
        plain()
    for step, cmd in (("full_run", flow), ("noop_run", flow)):
        seconds, lines, cpu = run_step(cmd, repo, env, folder / f"{step}.log")
        result["seconds"][step], result["cpu_seconds"][step] = seconds, cpu
        result["breakdown"][step] = flow_breakdown(seconds, lines, repo / ".prefect")
    for step, cmd in (
        ("dvc_repro_lr", [sys.executable, "-m", "dvc", "repro"]),
        ("make_repro_lr", [sys.executable, "-m", "flows.repro", "--repo", "."]),
    ):
        result["lr"][step] = base_lr * LR_FACTORS[step]
        set_lr(repo, result["lr"][step])
        seconds, lines, cpu = run_step(cmd, repo, env, folder / f"{step}.log")
        result["seconds"][step], result["cpu_seconds"][step] = seconds, cpu
        result["breakdown"][step] = repro_breakdown(seconds, lines)
    if index % 2 == 1:
        plain()
    return result


def check_targets(seconds: dict[str, list[float]]) -> dict[str, Any]:
    """Each target's paired ratios (median, min..max), the limit and whether it is met."""
    checks: dict[str, Any] = {}
    for name, (num, den, limit) in TARGETS.items():
        stats = summarize(paired_ratios(seconds[num], seconds[den]))
        checks[name] = {"ratio": stats, "target": f"<= {limit}", "met": stats["median"] <= limit}
    for name, (num, den) in DIAGNOSTIC_RATIOS.items():
        checks[name] = {
            "ratio": summarize(paired_ratios(seconds[num], seconds[den])),
            "target": "(diagnosis)",
            "met": None,
        }
    return checks


def print_report(
    seconds: dict[str, list[float]],
    checks: dict[str, Any],
    breakdowns: dict[str, dict[str, float]],
    cpu: dict[str, list[float]],
) -> None:
    rows = [
        [
            step,
            summarize(values)["median"],
            f"{min(values):.1f}..{max(values):.1f}",
            summarize(cpu[step])["median"],
        ]
        for step, values in seconds.items()
    ]
    print("\n" + format_table(["step", "seconds (median)", "min..max", "CPU s (median)"], rows))
    rows = [
        [
            name,
            check["ratio"]["median"],
            f"{check['ratio']['min']:.3g}..{check['ratio']['max']:.3g}",
            check["target"],
            {True: "met", False: "NOT MET", None: "-"}[check["met"]],
        ]
        for name, check in checks.items()
    ]
    print("\n" + format_table(["ratio", "median", "min..max", "target", "verdict"], rows))
    for step, parts in breakdowns.items():
        print(f"\nwhere {step}'s time went (last round):")
        print(format_table(["part", "seconds"], [[k, v] for k, v in parts.items()]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.feedback",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds (each a fresh clone: about 2 minutes on 2 cores)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed runs of the plain script first (page cache)"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary clones and logs (the path is printed)",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help=f"where {NAME}.json is written"
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    load_before = load_average()
    try:
        warm = work / "warmup"
        warm.mkdir()
        for _ in range(args.warmup):
            run_plain(ROOT / "params.yaml", warm, pipeline_env(warm))
        rounds = []
        for index in range(args.repeats):
            rounds.append(bench_round(work, index))
            print(
                f"round {index + 1}/{args.repeats}: "
                + ", ".join(f"{step} {rounds[-1]['seconds'][step]:.1f}s" for step in STEPS),
                flush=True,
            )
    finally:
        if args.keep:
            print(f"clones and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = {step: [r["seconds"][step] for r in rounds] for step in STEPS}
    cpu = {step: [r["cpu_seconds"][step] for r in rounds] for step in STEPS}
    checks = check_targets(seconds)
    print_report(seconds, checks, rounds[-1]["breakdown"], cpu)
    path = write_result(
        NAME,
        {
            "machine": {
                **describe_machine(),
                "load_before": load_before,
                "load_after": load_average(),
            },
            "commit": rounds[-1]["commit"],
            "source": rounds[-1]["source"],
            "repeats": args.repeats,
            "warmup": args.warmup,
            "lr": rounds[-1]["lr"],
            "plain": {
                "f1_macro": [r["plain"]["f1_macro"] for r in rounds],
                "epochs": [r["plain"]["epochs"] for r in rounds],
            },
            "seconds": {
                step: {**summarize(values), "values": values} for step, values in seconds.items()
            },
            "cpu_seconds": {
                step: {**summarize(values), "values": values} for step, values in cpu.items()
            },
            "plain_all_seconds": [r["plain"]["all_seconds"] for r in rounds],
            "targets": checks,
            "breakdown": [r["breakdown"] for r in rounds],
        },
        args.results_dir,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
