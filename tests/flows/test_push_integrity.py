"""``dvc push`` never uploads a corrupt DVC cache object (issue 10 item 4, review #11).

DVC uploads an object by its name without reading it, and ``dvc repro --force`` does not rewrite
an object whose name exists, so a flipped byte in the cache would poison the remote. Both pushes
(``flows.repro``, the Prefect flow's ``dvc-push`` task) check the objects first. Real DVC, a
real local remote, a real flipped byte.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import verify
from stages.common import integrity
from tests.conftest import ROOT

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
WRITE = (
    "import pathlib; pathlib.Path('data').mkdir(exist_ok=True); "
    "pathlib.Path('data/a.txt').write_text('a' * 1000); "
    "pathlib.Path('data/b.txt').write_text('b' * 1000)"
)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True, check=True
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A DVC repo (no git) whose one stage wrote ``data/`` (a folder: a .dir object and two
    file objects in the cache); nothing pushed yet."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _dvc(repo, "init", "-q", "--no-scm")
    _dvc(repo, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    (repo / "write.py").write_text(WRITE)
    (repo / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: python write.py\n    deps:\n"
        "      - write.py\n    outs:\n      - data\n"
    )
    _dvc(repo, "repro")
    return repo


def _flip_cached(repo: Path, text: str) -> Path:
    md5 = hashlib.md5(text.encode()).hexdigest()
    obj = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    stat = obj.stat()  # bit rot: size and mtime kept (DVC re-checks an object whose mtime moved)
    obj.chmod(0o644)
    data = bytearray(obj.read_bytes())
    data[10] ^= 0x01
    obj.write_bytes(bytes(data))
    obj.chmod(stat.st_mode)
    os.utime(obj, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return obj


def _remote_files(tmp_path: Path) -> list[Path]:
    remote = tmp_path / "remote"
    return [path for path in remote.rglob("*") if path.is_file()] if remote.exists() else []


@pytest.mark.slow
def test_make_repro_refuses_to_push_a_corrupt_cache_object(repo: Path, tmp_path: Path) -> None:
    obj = _flip_cached(repo, "b" * 1000)
    run = subprocess.run(
        [PY, "-m", "flows.repro", "--repo", str(repo)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    refused = [line for line in run.stderr.splitlines() if "dvc push refused" in line]
    assert len(refused) == 1 and "Traceback" not in run.stderr, run.stderr
    rel = obj.relative_to(repo).as_posix()
    assert f"{rel} (DVC cache object of stage make)" in refused[0]
    assert "an object of data" in refused[0] and "make repair" in refused[0]
    assert _remote_files(tmp_path) == []  # nothing uploaded, the good objects neither

    # once repaired (the object rewritten from the good workspace copy), the push goes through
    assert verify.main(["--repo", str(repo), "--repair"]) == 0
    run = subprocess.run(
        [PY, "-m", "flows.repro", "--repo", str(repo)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(_remote_files(tmp_path)) == 3  # data's .dir object and its two files


@pytest.mark.slow
def test_the_flow_push_task_refuses_a_corrupt_object_without_retrying(
    repo: Path, tmp_path: Path, prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import flow

    from flows.pipeline import push_data

    @flow
    def push_only(path: str) -> None:
        push_data.with_options(retry_delay_seconds=0)(path)

    _flip_cached(repo, "a" * 1000)
    checks = []
    check = integrity.check_before_push

    def counted(path: str) -> None:
        checks.append(path)
        check(path)

    monkeypatch.setattr(integrity, "check_before_push", counted)
    with pytest.raises(integrity.IntegrityError, match="dvc push refused, nothing uploaded"):
        push_only(str(repo))
    assert len(checks) == 1  # a refusal is not retried
    assert _remote_files(tmp_path) == []
