"""``stack_repo``: a whole stack (PostgreSQL, SeaweedFS, MLflow and Prefect servers, a worker)
up in a temporary checkout with free ports, down again after the module, even on failure."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack.harness import (
    StackHandle,
    install_stack_package,
    require_postgres,
    stack_env,
    start_stack,
    stop_stack,
)


def make_stack_repo() -> Path:
    """A temporary DVC checkout holding the ``stack`` package (under /tmp: PostgreSQL's user
    must reach it when we are root)."""
    repo = Path(tempfile.mkdtemp(prefix="stack-repo-"))
    repo.chmod(0o755)
    install_stack_package(repo)
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run([str(dvc), "init", "--no-scm", "-q"], cwd=repo, check=True)
    return repo


@pytest.fixture(scope="module")
def stack_repo() -> Iterator[StackHandle]:
    require_postgres()
    repo = make_stack_repo()
    env = stack_env()
    try:
        settings = start_stack(repo, env)
        yield StackHandle(repo=repo, env=env, settings=settings)
    finally:
        stop_stack(repo, env, purge=True)
        shutil.rmtree(repo, ignore_errors=True)
