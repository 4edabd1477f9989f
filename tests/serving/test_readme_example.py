"""The README's request example, run as written against a served model (issue 9, item 10).

The example is taken from README.md ("Serving", **Call it.**) and run with bash in a folder laid
out like the project (``params.yaml``, ``data/features/test.parquet``, ``.venv``), against a real
service on 127.0.0.1 serving a model of the penguins table, whose target is ``species``, not
``target``. Only the port and the folder of the payload files are changed. The test rows carry
missing values, which must reach the service as JSON ``null`` (never ``NaN``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.conftest import ROOT, write_params
from tests.serving.conftest import CONTRACT_NAME, TABLES, Registry

FORMATS = {
    "split": "dataframe_split",
    "records": "dataframe_records",
    "instances": "instances",
    "inputs": "inputs",
}  # payload file -> its MLflow format key


def readme_request_example() -> str:
    """The bash block that follows **Call it.** in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("**Call it.**") :]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "README.md: no ```bash block after **Call it.**"
    return match[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the service exited: {server.stdout.read()}"
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready after {timeout}s")


@pytest.fixture
def project(tmp_path: Path, tables: dict[str, Any]) -> Path:
    """A folder laid out like the project after `make run` on penguins: params naming the
    target ``species``, the test split (two rows given a missing value), the virtualenv."""
    folder = tmp_path / "project"
    (folder / "data/features").mkdir(parents=True)
    target = TABLES["penguins"][1]
    write_params(folder, {"ingest": {"target": target}, "register": {"model_name": CONTRACT_NAME}})
    test = pd.read_parquet(tables["penguins"].features / "test.parquet")
    assert target == "species" and target in test.columns
    test.loc[test.index[0], "sex"] = None  # real rows, each with a gap the suite allows
    test.loc[test.index[1], "body_mass_g"] = None
    test.to_parquet(folder / "data/features/test.parquet")
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    return folder


@pytest.fixture
def served(project: Path, tables: dict[str, Any], registry: Registry) -> Iterator[str]:
    """A real service on 127.0.0.1 serving the penguins model; yields its URL."""
    port = _free_port()
    # the project is not installed: its packages come from the checkout
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry.uri, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.serve",
            "--params",
            "params.yaml",
            "--port",
            str(port),
            "--model-uri",
            f"models:/{CONTRACT_NAME}/1",
            "--sample-rate",
            "0",
        ],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(stdout: str) -> list[dict[str, Any]]:
    decoder, answers, at = json.JSONDecoder(), [], 0
    while at < len(stdout.rstrip()):
        answer, at = decoder.raw_decode(stdout, at)
        answers.append(answer)
        while at < len(stdout) and stdout[at].isspace():
            at += 1
    return answers


def _no_nan(name: str) -> float:
    raise AssertionError(f"not JSON: {name}")


@pytest.mark.slow
def test_readme_request_example_works_for_any_target(
    project: Path, served: str, tmp_path: Path
) -> None:
    payloads = tmp_path / "payloads"
    payloads.mkdir()
    script = (
        readme_request_example().replace("127.0.0.1:8000", served).replace("/tmp/", f"{payloads}/")
    )
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    for name, key in FORMATS.items():
        text = (payloads / f"{name}.json").read_text()
        body = json.loads(text, parse_constant=_no_nan)  # NaN / Infinity are not JSON
        assert list(body) == [key]
        assert "null" in text and "species" not in text, text
    answers = _answers(result.stdout)
    assert len(answers) == len(FORMATS), result.stdout
    labels = {"Adelie", "Chinstrap", "Gentoo"}
    for answer in answers:
        assert "predictions" in answer, answer
        assert len(answer["predictions"]) == 2
        assert {row["prediction"] for row in answer["predictions"]} <= labels, answer
