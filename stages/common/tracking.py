"""MLflow set-up and lineage: every run records its exact data, code and params."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from stages.common.config import MlflowParams
from stages.common.errors import PipelineError
from stages.common.io import read_json, write_json

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mlflow import ActiveRun

logger = logging.getLogger(__name__)

FLOW_RUN_ENV = "PIPELINE_FLOW_RUN_ID"  # set by the Prefect flow for the stages it runs
# why the flow runs (its `reason` parameter: the monitor's retraining event), for the same stages;
# metadata only: DVC never sees it, so it changes no stage's hash
REASON_ENV, REASON_TAG = "PIPELINE_REASON", "pipeline.reason"
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


# MLflow's HTTP limits (mlflow/environment_variables.py) <- params.mlflow fields. Its defaults
# (7 retries, backoff 2, 120 s per request) made a stage wait ~4.5 min for a server that was down.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "request_timeout_s",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "max_retries",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "backoff_s",
}
# Which values apply_http_limits put in the environment; processes it starts inherit it, so
# that a value the user set (which wins) is told from one inherited from params.
HTTP_LIMITS_MARKER = "PIPELINE_MLFLOW_HTTP_LIMITS"


def apply_http_limits(params: MlflowParams) -> None:
    """Bound how long MLflow waits for a tracking server: params ``mlflow.request_timeout_s``,
    ``max_retries`` and ``backoff_s``; an ``MLFLOW_HTTP_REQUEST_*`` variable the user set wins."""
    marker = os.environ.get(HTTP_LIMITS_MARKER, "")
    ours = dict(item.split("=", 1) for item in marker.split(",") if "=" in item)
    for env, field in HTTP_LIMITS.items():
        current = os.environ.get(env)
        if current is None or current == ours.get(env):
            os.environ[env] = ours[env] = str(getattr(params, field))
    os.environ[HTTP_LIMITS_MARKER] = ",".join(f"{k}={v}" for k, v in ours.items())


def check_tracking_store(params: MlflowParams, repo: str | Path = ".") -> None:
    """Refuse early when the tracking store cannot be used; a pre-flight check, before ingest.

    An ``http(s)`` URI gets one GET of ``<uri>/health`` bounded by ``request_timeout_s`` (any
    HTTP answer below 500 counts as up); a ``sqlite:///`` or ``file:`` store needs its folder
    to be writable (or creatable), relative paths taken from ``repo``. Other schemes pass.

    Raises:
        PipelineError: one line naming the URI, what is wrong and the fix.
    """
    import urllib.error
    import urllib.request

    uri = tracking_uri(params)
    fix = "start it or point MLFLOW_TRACKING_URI / params mlflow.tracking_uri at one that runs"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(
                uri.rstrip("/") + "/health", timeout=params.request_timeout_s
            ):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return  # it answers (a proxy or an auth layer may refuse /health)
            problem = f"answers HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            problem = f"is unreachable ({reason})"
        raise PipelineError(
            f"the MLflow tracking server {uri} {problem}; {fix}; nothing ran "
            f"(checked within params mlflow.request_timeout_s = "
            f"{params.request_timeout_s} s)"
        )
    if uri.startswith("sqlite:///"):
        target = Path(repo) / uri.removeprefix("sqlite:///")  # the database file
    elif uri.startswith("file:") or "://" not in uri:
        target = Path(repo) / uri.removeprefix("file://").removeprefix("file:")  # a folder
    else:
        return
    folder = target if target.is_dir() else target.parent  # SQLite writes its journal there
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the folder a new store would be created in
    if problem := _cannot_write(target, folder):
        raise PipelineError(
            f"the MLflow tracking store {uri} cannot be written: {problem}; "
            "make it writable or point MLFLOW_TRACKING_URI / params "
            "mlflow.tracking_uri at a writable store; nothing ran"
        )


def _cannot_write(target: Path, folder: Path) -> str | None:
    """Why ``target`` (an existing file, or one to create in ``folder``) cannot be written.

    Tried for real (root ignores permission bits): a write lock on the database taken and
    released through SQLite, and a temporary file created and removed in ``folder``.
    """
    import tempfile

    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return f"{folder.resolve()} is on a read-only mount"
    try:
        if target.is_file():
            _sqlite_write_probe(target)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"{exc.filename or folder.resolve()}: {exc.strerror or exc}"
    except sqlite3.Error as exc:
        return f"{target.resolve()}: {exc}"
    return None


def _sqlite_write_probe(db: Path) -> None:
    # A write lock taken and released through SQLite itself, never a plain open(): closing any
    # other descriptor of the file drops every POSIX lock this process holds on it, so an
    # MLflow engine kept open in this process (the flow's page and monitor clients) would then
    # miss the stages' writes and read stale pages ("database disk image is malformed").
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=rw", uri=True, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.rollback()
    finally:
        conn.close()


def configure_mlflow(params: MlflowParams) -> str:
    """Point MLflow at the store, create the experiment if needed; return its id.

    A server that is down fails here, within the bounds of ``apply_http_limits``; a store that
    cannot be written (read-only, full) fails here too. ``stages.common.faults`` words both.
    """
    import mlflow

    from stages.common import faults

    apply_http_limits(params)
    faults.quiet_mlflow_store_errors()
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
    # Opening the file for writing here (creating it when new) also fails at once, with
    # SQLite's reason, where MLflow would retry creating its engine for ~100 s (a read-only or
    # missing folder) or fail at the stage's first write.
    conn = sqlite3.connect(db, timeout=30)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")  # a write lock: refused on a read-only file or mount
        conn.rollback()
    finally:
        conn.close()


def _git(repo: str | Path, *args: str) -> str:
    # The output of a git command, "" when it fails (not a repo, no commit, unknown path).
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def git_state(repo: str | Path = ".") -> dict[str, str]:
    """The git commit and whether the work tree has uncommitted changes."""
    commit = _git(repo, "rev-parse", "HEAD") or "unknown"
    dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def git_dirty_files(repo: str | Path = ".") -> list[str]:
    """The tracked files whose content differs from HEAD (empty when clean or not a repo)."""
    result = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
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
        entry = {
            "lock_md5": item["md5"],
            "stages": item["stages"],
            "md5": None,
            "in_git": False,
            "logged": False,
        }
        if file.is_file():
            entry["md5"] = file_md5(file)
            committed = _in_git(repo, path)
            entry["in_git"] = bool(committed)
            entry["logged"] = (
                not committed
                and entry["md5"] == item["md5"]
                and file.stat().st_size <= MAX_LOGGED_INPUT_BYTES
            )
            if entry["logged"]:
                to_log.append(path)
            elif committed is None:  # (a changed tracked file shows in git.dirty_files)
                logger.warning(
                    "%s, which %s read, is not in git and not logged (changed since "
                    "or over %d bytes): a reproduction cannot restore it",
                    path,
                    ", ".join(item["stages"]),
                    MAX_LOGGED_INPUT_BYTES,
                )
        record[path] = entry
    return record, to_log


def lineage_tags(repo: str | Path = ".", stage: str | None = None) -> dict[str, str]:
    """Tags that tie a run to its code, data versions and the Prefect run that made it.

    ``stage`` (default: the one DVC runs, ``DVC_STAGE``): only the outputs of the stages it
    depends on are tagged (``dvc.<path>.md5``), which DVC locked before it started; its own
    outputs and those of later stages would be the previous run's (register tags the produced
    ones: ``integrity.produced_outputs``). Without a stage, every output of ``dvc.lock``.
    """
    from stages.common import integrity

    repo = Path(repo)
    hashes = dvc_lock_hashes(repo / "dvc.lock")
    stage = stage or integrity.running_stage()
    if stage is not None and hashes:
        lock = integrity.read_lock(repo)
        inputs = integrity.upstream_of(integrity.stage_graph(repo, lock), stage)
        hashes = {
            f"dvc.{path}.md5": out["md5"]
            for path, (producer, out) in integrity.lock_outputs(lock).items()
            if producer in inputs
        }
    tags = {**git_state(repo), **hashes}
    if tags["git.dirty"] == "true":
        # `dvc repro` rewrites dvc.lock before train runs, so the tree is dirty on every run
        # after the first; the list lets `reproduce` tell that (the lock is logged) from code.
        tags[DIRTY_FILES_TAG] = _cut(",".join(git_dirty_files(repo)))
    if flow_run_id := os.environ.get(FLOW_RUN_ENV):
        tags["prefect.flow_run_id"] = flow_run_id
    if reason := os.environ.get(REASON_ENV):
        tags[REASON_TAG] = _cut(reason)
    return tags


def produced_output_tags(model_dir: str | Path, repo: str | Path = ".") -> dict[str, str]:
    """``dvc.<path>.md5`` tags of the outputs the model's runs produced (train's, evaluate's),
    hashed from the files on disk and checked against dvc.lock (``integrity.produced_outputs``;
    {} outside a DVC pipeline). Register sets them on the run and its version."""
    from stages.common import integrity

    return {
        f"dvc.{path}.md5": md5 for path, md5 in integrity.produced_outputs(model_dir, repo).items()
    }


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."


def validation_tags(summary: dict) -> dict[str, str]:
    """``validation.<key>`` tags for the summary keys of ``VALIDATION_TAG_KEYS`` it has."""
    return {
        f"validation.{key}": str(summary[key]).lower()
        if isinstance(summary[key], bool)
        else str(summary[key])
        for key in VALIDATION_TAG_KEYS
        if key in summary
    }


def log_lineage(
    repo: str | Path = ".",
    params_file: str | Path | None = "params.yaml",
    validation_report: str | Path | None = None,
    params_text: str | None = None,
) -> None:
    """Log the run's inputs under ``lineage/`` and tag its validation result.

    ``params_text``: the params the stage read (``integrity.ParamsSnapshot.text``), else
    ``params_file`` as it is now (None: not known); ``repo/dvc.lock`` as it is now, every input of
    the lock by hash with a copy of those the commit lacks (``record_inputs``), and the
    validation summary (``validation_report/summary.json``) when there is one. Call inside
    the active run.
    """
    import mlflow

    lock = Path(repo) / "dvc.lock"
    if params_text is None and params_file is not None and Path(params_file).is_file():
        params_text = Path(params_file).read_text(encoding="utf-8")
    if params_text is not None:
        mlflow.log_text(params_text, f"{LINEAGE_DIR}/{PARAMS_ARTIFACT}")
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


@contextmanager
def resume_run(model_dir: str | Path, params: MlflowParams) -> Iterator[ActiveRun]:
    """Re-open the MLflow run that the train stage started, for a ``with`` block.

    The run ends FINISHED, or FAILED when the block raises, and a logged model the block left
    PENDING is marked FAILED (``end_run``): no fault leaves the run RUNNING. A model an earlier
    attempt could not mark (its disk was full) is marked FAILED before the run re-opens.
    """
    import mlflow

    configure_mlflow(params)
    info = read_json(Path(model_dir) / RUN_FILE)
    fail_pending_models(info["run_id"])
    active = mlflow.start_run(run_id=info["run_id"])
    try:
        yield active
    except BaseException as exc:
        end_run("FAILED", exc)
        raise
    end_run("FINISHED")


def end_run(status: str = "FINISHED", error: BaseException | None = None) -> None:
    """End the active MLflow run with ``status``; nothing is left RUNNING or PENDING.

    With ``error`` (the run failed), the run's logged models still PENDING are marked FAILED
    first; on a full disk their partial artifacts are removed to make room for the status
    writes. This never raises while ``error`` is being handled (a status it cannot write is
    logged with the recovery). Without ``error``, a failure to end the run marks it FAILED
    if it can, and raises.
    """
    import mlflow

    active = mlflow.active_run()
    if active is None:
        return
    run_id = active.info.run_id
    if error is not None:
        _fail_leftovers(run_id, error)
    try:
        mlflow.end_run(status)  # takes the run off MLflow's stack even if the write fails
    except Exception as exc:
        if error is None:
            _fail_leftovers(run_id, exc)
            _terminate_quietly(run_id, "FAILED", exc)
            raise
        _warn_left(run_id, status, exc)


def fail_pending_models(run_id: str, free_space: bool = False) -> list[str]:
    """Mark the logged models of ``run_id`` still PENDING as FAILED; return their ids.

    A model stays PENDING when the process logging it failed before it could say so (a full
    disk, a kill). With ``free_space``, its partial artifacts (useless: no one can load them)
    are removed first when they are local.
    """
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    pending = [m for m in models if m.status == LoggedModelStatus.PENDING]
    for model in pending:
        if free_space:
            _remove_local_artifacts(model.artifact_location)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        logger.info(
            "logged model %s of run %s was left PENDING: marked FAILED", model.model_id, run_id
        )
    return [m.model_id for m in pending]


def _fail_leftovers(run_id: str, error: BaseException) -> None:
    from stages.common import faults

    try:
        fail_pending_models(run_id, free_space=faults.is_disk_full(error))
    except Exception as exc:  # noqa: BLE001 - never hide the run's own error
        _warn_left(run_id, "FAILED (its PENDING logged models too)", exc)


def _terminate_quietly(run_id: str, status: str, error: BaseException) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient().set_terminated(run_id, status)
    except Exception:  # noqa: BLE001 - the caller raises ``error``
        _warn_left(run_id, status, error)


def _warn_left(run_id: str, status: str, exc: BaseException) -> None:
    logger.warning(
        "MLflow run %s could not be marked %s (%s); once the store can be written "
        "again, running the stage again marks it",
        run_id,
        status,
        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
    )


def _remove_local_artifacts(location: str | None) -> None:
    import shutil
    from urllib.parse import unquote, urlparse

    if location and location.startswith("file:"):
        shutil.rmtree(unquote(urlparse(location).path), ignore_errors=True)
    elif location and "://" not in location:
        shutil.rmtree(location, ignore_errors=True)


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
        self._pending += [Metric(key, float(value), now_ms, step) for key, value in metrics.items()]
        if time.monotonic() - self._last_flush >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Send everything queued."""
        from mlflow import MlflowClient

        client = MlflowClient()
        while self._pending:
            chunk, self._pending = (
                self._pending[: self.MAX_PER_CALL],
                self._pending[self.MAX_PER_CALL :],
            )
            client.log_batch(self.run_id, metrics=chunk)
        self._last_flush = time.monotonic()
