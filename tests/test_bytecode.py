"""Bytecode never changes what DVC hashes (issue 9, item 4).

Ordinary Python writes ``__pycache__/`` beside every module it imports. Code folders such as
``stages/common`` are stage dependencies, so without ``.dvcignore`` the first import after a
run "modifies" them and the next ``dvc repro`` re-runs every stage. This test imports every
module of the project with bytecode writing on, after a real ``dvc repro``, and asks DVC.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import Reproduced, dvc

pytestmark = pytest.mark.slow

# Imports every module of the packages dvc.yaml depends on, as running the stages, the flow and
# the service would (stdout: how many).
IMPORT_ALL = """
import importlib, pkgutil, sys
assert not sys.dont_write_bytecode
names = []
for package in ("stages", "model", "flows", "serving"):
    module = importlib.import_module(package)
    names += [package] + [info.name for info in
                          pkgutil.walk_packages(module.__path__, prefix=package + ".")
                          if not info.name.endswith(".__main__")]  # a CLI: it would run
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def _bytecode_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # what a user's shell has
    return env


def test_dvc_ignores_the_bytecode_python_writes(reproduced: Reproduced) -> None:
    repo = reproduced.repo  # a copy of the session's `dvc repro`, its bytecode removed
    for cache in list(repo.rglob("__pycache__")):
        shutil.rmtree(cache)

    imported = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        cwd=repo,
        env=_bytecode_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert imported.returncode == 0, imported.stderr
    assert int(imported.stdout) > 10
    assert list((repo / "stages/common/__pycache__").glob("*.pyc")), "no bytecode was written"

    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")  # every stage
    assert status == {"ingest": ["always changed"]}, status
    again = dvc(repo, "repro", "features")
    for stage in ("validate", "features"):
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout, again.stdout
