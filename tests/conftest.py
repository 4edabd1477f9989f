"""Shared fixtures: real MLflow, DVC, git and Prefect, each in a temporary place.

Nothing here is mocked: ``pipeline_repo`` is a real git + DVC repository holding a copy of the
project, and ``mlflow_uri`` a real sqlite MLflow store, both under pytest's tmp_path.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = [
    "stages",
    "model",
    "flows",
    "serving",
    "stack",  # flows/remote.py reads the stack's settings
    "monitoring",  # flows/monitor.py
    "pages",  # the flow writes reports/index.html
    "suites",
    "data/source",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
]

# Small but real settings so the whole pipeline runs in seconds on a 2-core CPU.
TINY_PARAMS = {
    "train": {"max_epochs": 15, "patience": 5},
    # one compress method (the one the default data chooses), fewer latency calls: prune and
    # distill have their own tests (tests/stages/compress/)
    "compress": {"methods": ["quantize"], "row_repeats": 20, "batch_repeats": 5},
}

# Offline, quiet, and never touching the user's ~/.prefect or ./mlflow.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests that need MLflow get their own store
# Bytecode writing on, as with an ordinary `python`: stages, dvc and the flow then write
# __pycache__/ beside the code, which DVC must ignore (.dvcignore) or every stage re-runs.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# `python` in dvc.yaml commands must be this interpreter (the project's virtualenv).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in, section by section."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_params(repo: Path, overrides: dict) -> None:
    """Rewrite ``repo/params.yaml`` with ``overrides`` merged into the project's params."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, overrides)))


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def make_pipeline_repo(dest: Path, overrides: dict | None = None) -> Path:
    """A fresh git + DVC repo at ``dest`` holding the project's stages, flows and graph."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    write_params(dest, deep_merge(TINY_PARAMS, overrides or {}))
    (dest / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    _run(["git", "init", "-q", "-b", "main"], dest)
    _run(["git", "config", "user.email", "test@example.com"], dest)
    _run(["git", "config", "user.name", "test"], dest)
    _run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    _run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    _run(
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(dest / ".dvcstore")], dest
    )
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-q", "-m", "test pipeline"], dest)
    return dest


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real, empty MLflow sqlite store for this test (``MLFLOW_TRACKING_URI`` points at it)."""
    store = tmp_path / "mlflow"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def pipeline_repo(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary git + DVC repo with the project in it; the cwd is moved there."""
    repo = make_pipeline_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    return repo


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real ``dvc`` CLI in ``repo``."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=check
    )


# --- one reproduced pipeline per session, copied by the tests that use it ---------------------


@dataclass(frozen=True)
class Reproduced:
    """A git + DVC repo of the project after one `dvc repro` (TINY params), committed and
    pushed to its DVC remote (``repo/.dvcstore``, configured relative so a copy pushes to its
    own), and the MLflow sqlite store it logged into (artifacts beside the database)."""

    repo: Path
    uri: str  # sqlite:///<base>/mlflow/mlflow.db, outside the repo

    @property
    def base(self) -> Path:
        return self.repo.parent


def _build_reproduced(base: Path) -> Reproduced:
    store = base / "mlflow"
    store.mkdir(parents=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        repo = make_pipeline_repo(base / "repo")
        # DVC takes a relative url from the cwd and stores it relative to .dvc/ (../.dvcstore)
        dvc(repo, "remote", "modify", "local", "url", ".dvcstore")
        _run(["git", "commit", "-q", "-m", "relative DVC remote", ".dvc/config"], repo)
        result = dvc(repo, "repro", check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _run(["git", "add", "-A"], repo)
        _run(["git", "commit", "-q", "-m", "model v1"], repo)
        dvc(repo, "push")
    return Reproduced(repo, uri)


def copy_reproduced(source: Reproduced, dest: Path) -> Reproduced:
    """A copy of ``source`` at ``dest`` (``dest/repo``, ``dest/mlflow``) that shares nothing
    with it: its own git, DVC cache and remote, and an MLflow store whose runs, models and
    artifact locations point into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("repo", "mlflow"):
        shutil.copytree(source.base / name, dest / name, symlinks=True)
    shutil.rmtree(dest / "repo" / ".dvc" / "tmp", ignore_errors=True)  # locks, state: DVC's own
    db = dest / "mlflow" / "mlflow.db"
    old, new = f"{source.base}/", f"{dest}/"
    conn = sqlite3.connect(db)
    try:  # every text column: experiment, run, logged-model and version locations, tags
        tables = [
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        for table in tables:
            for column in conn.execute(f'PRAGMA table_info("{table}")').fetchall():
                if column[2].upper() in ("TEXT", "VARCHAR") or column[2].upper().startswith(
                    "VARCHAR"
                ):
                    conn.execute(
                        f'UPDATE "{table}" SET "{column[1]}" = '
                        f'replace("{column[1]}", ?, ?) WHERE instr("{column[1]}", ?)',
                        (old, new, old),
                    )
        conn.commit()
    finally:
        conn.close()
    return Reproduced(dest / "repo", f"sqlite:///{db}")


@pytest.fixture(scope="session")
def reproduced_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    """The project's pipeline after one real `dvc repro` (TINY params), built once per session.

    Read-only: a test that runs anything in it or changes it works on a copy
    (``copy_reproduced``, or the ``reproduced`` fixture).
    """
    return _build_reproduced(tmp_path_factory.mktemp("reproduced"))


@pytest.fixture
def reproduced(
    reproduced_pipeline: Reproduced, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Reproduced:
    """A private copy of ``reproduced_pipeline`` under tmp_path; ``MLFLOW_TRACKING_URI`` points
    at the copy's store."""
    copy = copy_reproduced(reproduced_pipeline, tmp_path / "reproduced")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", copy.uri)
    return copy


# What stages.common.tracking.apply_http_limits (configure_mlflow) puts in os.environ.
_MLFLOW_HTTP_ENV = ("MLFLOW_HTTP_REQUEST_", "PIPELINE_MLFLOW_HTTP_LIMITS")


_MLFLOW_HTTP_ENV_AT_START = {
    key: value for key, value in os.environ.items() if key.startswith(_MLFLOW_HTTP_ENV)
}


@pytest.fixture(autouse=True)
def _mlflow_http_limits_restored():
    """configure_mlflow sets MLflow's HTTP limits in os.environ, for a stage process and the
    processes it starts; a test that calls it in pytest's process must not pass them on to the
    tests (and subprocesses) after it."""

    # Reset to the session's start before and after each test: a session-scoped fixture that
    # ran configure_mlflow during this test's set-up must not pass them on either.
    def reset() -> None:
        for key in [key for key in os.environ if key.startswith(_MLFLOW_HTTP_ENV)]:
            del os.environ[key]
        os.environ.update(_MLFLOW_HTTP_ENV_AT_START)

    reset()
    yield
    reset()


@pytest.fixture(scope="session", autouse=True)
def _repo_stores_untouched():
    """Tests use temporary stores only: fail the session if one wrote into the project's."""
    watched = [ROOT / "mlruns", ROOT / "mlflow" / "mlflow.db", ROOT / "mlflow" / "artifacts"]
    before = {path: path.exists() and path.stat().st_mtime for path in watched}
    yield
    touched = [
        str(path) for path in watched if path.exists() and (path.stat().st_mtime != before[path])
    ]
    assert not touched, f"a test wrote into the project's own MLflow store: {touched}"
