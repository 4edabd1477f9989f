"""MLflow set-up and lineage: every run records its exact data, code and params."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from stages.common.config import MlflowParams
from stages.common.errors import PipelineError
from stages.common.io import read_json, write_json

if TYPE_CHECKING:
    from mlflow import ActiveRun

logger = logging.getLogger(__name__)

FLOW_RUN_ENV = "PIPELINE_FLOW_RUN_ID"  # set by the Prefect flow for the stages it runs
RUN_FILE = "run.json"  # written by train next to the model: the MLflow run to log into
# Run artifacts that let `flows.reproduce` rebuild a run's inputs: params.yaml and dvc.lock as
# they were at train time (dvc.lock's data-stage entries are the ones this run trained on).
LINEAGE_DIR = "lineage"
PARAMS_ARTIFACT, LOCK_ARTIFACT = "params.yaml", "dvc.lock"
VALIDATION_ARTIFACT = "validation_summary.json"  # the validate stage's summary.json
# Every input file the stages read (dvc.lock deps that no stage writes: the suite, code) by
# hash; a copy of the small ones that the commit does not hold as they were (an untracked suite)
# under inputs/<path>, so that `flows.reproduce` can put them back.
INPUTS_ARTIFACT, INPUTS_DIR = "inputs.json", "inputs"
MAX_LOGGED_INPUT_BYTES = 5_000_000  # larger inputs are recorded by hash only
VALIDATION_TAG_KEYS = ("success", "rows", "bad_fraction")  # tagged validation.<key> if present
DIRTY_FILES_TAG = "git.dirty_files"  # which tracked files differed from git.commit
MAX_TAG_CHARS = 1000  # a longer list of dirty files is cut and ends with "..."


def tracking_uri(params: MlflowParams) -> str:
    """The MLflow tracking URI: ``MLFLOW_TRACKING_URI`` if set, else params."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def configure_mlflow(params: MlflowParams) -> str:
    """Point MLflow at the store, create the experiment if needed; return its id."""
    import mlflow

    uri = tracking_uri(params)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        _enable_wal(Path(uri.removeprefix("sqlite:///")))
    experiment = mlflow.get_experiment_by_name(params.experiment)
    if experiment is not None:
        mlflow.set_experiment(experiment_id=experiment.experiment_id)
        return experiment.experiment_id
    artifact_location = None  # a tracking server chooses its own
    if uri.startswith("sqlite:///"):
        # Keep artifacts beside the database that points at them: mlflow/artifacts.
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        artifact_location = (db.parent / "artifacts").as_uri()
    experiment_id = mlflow.create_experiment(params.experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _enable_wal(db: Path) -> None:
    # WAL lets the UI read while a stage writes; it is a property of the file, set once.
    if db.exists():
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute("PRAGMA journal_mode=WAL")


def _git(repo: str | Path, *args: str) -> str:
    # The output of a git command, "" when it fails (not a repo, no commit, unknown path).
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def git_state(repo: str | Path = ".") -> dict[str, str]:
    """The git commit and whether the work tree has uncommitted changes."""
    commit = _git(repo, "rev-parse", "HEAD") or "unknown"
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def git_dirty_files(repo: str | Path = ".") -> list[str]:
    """The tracked files whose content differs from HEAD (empty when clean or not a repo)."""
    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return []
    return [line[3:].split(" -> ")[-1] for line in result.stdout.splitlines() if line.strip()]


def dvc_lock_hashes(lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """``{"dvc.<path>.md5": hash}`` for every stage output recorded in ``dvc.lock``."""
    lock_file = Path(lock_file)
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    hashes = {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if "md5" in out:
                hashes[f"dvc.{out['path']}.md5"] = out["md5"]
    return hashes


def lock_inputs(lock: dict) -> dict[str, dict]:
    """The deps of a parsed ``dvc.lock`` that no stage writes: ``{path: {"md5", "stages"}}``.

    These are what the pipeline reads from outside itself (code, the suite, the data source);
    the outputs of one stage read by the next are data versions, restored by DVC.
    """
    stages = (lock.get("stages") or {}).items()
    outs = {out["path"] for _, entry in stages for out in (entry or {}).get("outs") or []}
    inputs: dict[str, dict] = {}
    for name, entry in stages:
        for dep in (entry or {}).get("deps") or []:
            path = dep["path"]
            if path not in outs and not any(path.startswith(f"{out}/") for out in outs):
                item = inputs.setdefault(path, {"md5": dep.get("md5"), "stages": []})
                item["stages"].append(name)
    return inputs


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes (what ``dvc.lock`` records for a file with ``hash: md5``)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _in_git(repo: Path, path: str) -> bool | None:
    # True: HEAD holds the file exactly as it is now (a clone at the commit has it); False:
    # HEAD holds another version; None: HEAD does not hold it (untracked, or not a repo).
    committed = _git(repo, "ls-tree", "HEAD", "--", path).split()
    if len(committed) < 3:
        return None
    return committed[2] == _git(repo, "hash-object", "--", path)


def record_inputs(repo: str | Path = ".") -> tuple[dict[str, dict], list[str]]:
    """Every input file of ``repo/dvc.lock`` as it is now, and which of them to copy.

    Returns ``({path: {"md5", "lock_md5", "stages", "in_git", "logged"}}, [paths to log])``.
    Folders (``stages/common``, ``data/source``) are listed with their ``dvc.lock`` hash only.
    A file is copied when the commit does not hold it as it is, it is small and it is the one
    ``dvc.lock`` recorded (so the stage that read it read these bytes).
    """
    repo = Path(repo)
    lock_file = repo / "dvc.lock"
    if not lock_file.is_file():
        return {}, []
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    record, to_log = {}, []
    for path, item in lock_inputs(lock).items():
        file = repo / path
        entry = {"lock_md5": item["md5"], "stages": item["stages"], "md5": None,
                 "in_git": False, "logged": False}
        if file.is_file():
            entry["md5"] = file_md5(file)
            committed = _in_git(repo, path)
            entry["in_git"] = bool(committed)
            entry["logged"] = (not committed and entry["md5"] == item["md5"]
                               and file.stat().st_size <= MAX_LOGGED_INPUT_BYTES)
            if entry["logged"]:
                to_log.append(path)
            elif committed is None:  # (a changed tracked file shows in git.dirty_files)
                logger.warning("%s, which %s read, is not in git and not logged (changed since "
                               "or over %d bytes): a reproduction cannot restore it", path,
                               ", ".join(item["stages"]), MAX_LOGGED_INPUT_BYTES)
        record[path] = entry
    return record, to_log


def lineage_tags(repo: str | Path = ".") -> dict[str, str]:
    """Tags that tie a run to its code, data versions and the Prefect run that made it."""
    repo = Path(repo)
    tags = {**git_state(repo), **dvc_lock_hashes(repo / "dvc.lock")}
    if tags["git.dirty"] == "true":
        # `dvc repro` rewrites dvc.lock before train runs, so the tree is dirty on every run
        # after the first; the list lets `reproduce` tell that (the lock is logged) from code.
        tags[DIRTY_FILES_TAG] = _cut(",".join(git_dirty_files(repo)))
    if flow_run_id := os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = flow_run_id
    return tags


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TAG_CHARS else text[:MAX_TAG_CHARS - 3] + "..."


def validation_tags(summary: dict) -> dict[str, str]:
    """``validation.<key>`` tags for the summary keys of ``VALIDATION_TAG_KEYS`` it has."""
    return {f"validation.{key}": str(summary[key]).lower() if isinstance(summary[key], bool)
            else str(summary[key]) for key in VALIDATION_TAG_KEYS if key in summary}


def log_lineage(repo: str | Path = ".", params_file: str | Path | None = "params.yaml",
                validation_report: str | Path | None = None) -> None:
    """Log the run's inputs under ``lineage/`` and tag its validation result.

    ``params_file`` (None: not known) and ``repo/dvc.lock`` as they are now, every input of
    the lock by hash with a copy of those the commit lacks (``record_inputs``), and the
    validation summary (``validation_report/summary.json``) when there is one. Call inside
    the active run.
    """
    import mlflow

    lock = Path(repo) / "dvc.lock"
    if params_file is not None and Path(params_file).is_file():
        mlflow.log_text(Path(params_file).read_text(encoding="utf-8"),
                        f"{LINEAGE_DIR}/{PARAMS_ARTIFACT}")
    if lock.is_file():
        mlflow.log_text(lock.read_text(encoding="utf-8"), f"{LINEAGE_DIR}/{LOCK_ARTIFACT}")
        inputs, to_log = record_inputs(repo)
        mlflow.log_dict(inputs, f"{LINEAGE_DIR}/{INPUTS_ARTIFACT}")
        for path in to_log:
            folder = Path(LINEAGE_DIR, INPUTS_DIR, path).parent.as_posix()
            mlflow.log_artifact(str(Path(repo) / path), artifact_path=folder)
    summary_file = Path(validation_report or ".") / "summary.json"
    summary = None
    if validation_report is not None and summary_file.is_file():
        try:
            summary = read_json(summary_file)
        except PipelineError as exc:  # a record only: a bad summary must not stop training
            logger.warning("validation summary not logged: %s", exc)
    if isinstance(summary, dict):
        mlflow.log_dict(summary, f"{LINEAGE_DIR}/{VALIDATION_ARTIFACT}")
        mlflow.set_tags(validation_tags(summary))


def save_run_info(model_dir: str | Path, run_id: str, experiment_id: str) -> None:
    """Record which MLflow run the later stages (evaluate, register) log into."""
    write_json(Path(model_dir) / RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id})


def resume_run(model_dir: str | Path, params: MlflowParams) -> ActiveRun:
    """Re-open the MLflow run that the train stage started (a context manager)."""
    import mlflow

    configure_mlflow(params)
    info = read_json(Path(model_dir) / RUN_FILE)
    return mlflow.start_run(run_id=info["run_id"])


def run_url(ui_url: str, experiment_id: str, run_id: str) -> str:
    """Where the run is in the MLflow UI."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MetricBuffer:
    """Per-step metrics sent to MLflow in batches: one call every ``every_s`` seconds.

    A call per epoch costs milliseconds (a sqlite transaction), more than a whole epoch of a
    small model; batching keeps tracking under ~1% of training time. ``flush`` at the end (and
    on failure) sends the rest.
    """

    MAX_PER_CALL = 1000  # MLflow's log_batch limit

    def __init__(self, run_id: str, every_s: float = 5.0) -> None:
        self.run_id, self.every_s = run_id, every_s
        self._pending: list = []
        self._last_flush = time.monotonic()

    def add(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step``; send the queue if ``every_s`` has passed."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self._pending += [Metric(key, float(value), now_ms, step)
                          for key, value in metrics.items()]
        if time.monotonic() - self._last_flush >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Send everything queued."""
        from mlflow import MlflowClient

        client = MlflowClient()
        while self._pending:
            chunk, self._pending = (self._pending[:self.MAX_PER_CALL],
                                    self._pending[self.MAX_PER_CALL:])
            client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()
