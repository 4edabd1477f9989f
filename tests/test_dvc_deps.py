"""dvc.yaml's dependencies match the code each stage runs: editing one stage's package re-runs
that stage alone (issue 11).

Real DVC in a temporary git + DVC repo holding a copy of the project. Nothing runs: every output
gets a placeholder file and ``dvc commit -f`` records the current hashes of the code in dvc.lock,
as a finished ``dvc repro`` would. Each test then edits one file, asks DVC which stages have
changed dependencies (``Repo.status()``, what ``dvc status --json`` prints, in this process to
skip DVC's start-up) and restores the file.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, dvc, make_pipeline_repo

DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
STAGES = list(DVC_STAGES)
# Packages whose code a stage can run; flows/ orchestrate and no stage imports them.
CODE_ROOTS = ("stages", "model", "serving")
PROCESS_MODULE = re.compile(r"stages(\.[a-z_]+)+")  # `python -m <it>`: a process a stage runs


def _placeholders(repo: Path) -> None:
    """A small file for every output and dependency the pipeline would have produced."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        paths = [
            entry.def_path
            for stage in dvc_repo.index.stages
            for entry in [*stage.outs, *stage.deps]
        ]
    for name in paths:
        path = repo / name
        if path.exists():
            continue
        if path.suffix:  # a file output (reports/metrics.json) or a file inside one
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"placeholder for {name}\n")
        else:  # a folder output (data/raw, models)
            path.mkdir(parents=True)
            (path / "placeholder.txt").write_text(f"placeholder for {name}\n")


@pytest.fixture(scope="module")
def locked_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project in a temp git + DVC repo whose dvc.lock records the code as it is now."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("dvc-deps") / "repo")
    _placeholders(repo)
    dvc(repo, "commit", "--force", "--quiet")
    assert _changed_stages(repo) == set(), "a fresh dvc.lock should leave nothing changed"
    return repo


def _changed_stages(repo: Path) -> set[str]:
    """Stages ``dvc status`` reports with changed dependencies (ingest is always changed: it
    asks its source for new rows; that alone does not count)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:  # what `dvc status --json` prints, without a new process
        status = dvc_repo.status()
    return {
        stage.rsplit(":", 1)[-1]  # "<path to>/dvc.yaml:train" seen from another folder
        for stage, changes in status.items()
        if any(isinstance(change, dict) and "changed deps" in change for change in changes)
    }


@pytest.fixture
def edit(locked_repo: Path) -> Iterator:
    """Append a comment line to a file of the repo; the file is restored after the test."""
    originals: dict[Path, str] = {}

    def _edit(name: str) -> None:
        path = locked_repo / name
        originals[path] = path.read_text()
        path.write_text(originals[path] + "\n# an edit\n")

    yield _edit
    for path, text in originals.items():  # a file left edited would show in the next test's set
        path.write_text(text)


def test_every_stage_has_its_own_package() -> None:
    packages = {p.parent.name for p in (ROOT / "stages").glob("*/stage.py")}
    assert packages == set(STAGES), "one stages/<name>/ package per dvc.yaml stage"


@pytest.mark.parametrize("stage", STAGES)
def test_editing_a_stage_package_reruns_that_stage_alone(
    locked_repo: Path, edit, stage: str
) -> None:
    edit(f"stages/{stage}/stage.py")
    # the ensemble's members process saves members with train's own checkpoint builder
    also = {"ensemble"} if stage == "train" else set()
    assert _changed_stages(locked_repo) == {stage} | also


def test_editing_shared_stage_code_reruns_every_stage(locked_repo: Path, edit) -> None:
    edit("stages/common/config.py")
    assert _changed_stages(locked_repo) == set(STAGES)


def test_editing_the_network_reruns_the_stages_that_use_it(locked_repo: Path, edit) -> None:
    edit("model/nets.py")  # features fits the preprocessor only: it never imports the network
    assert _changed_stages(locked_repo) == {
        "train",
        "ensemble",  # trains its extra members with train's code
        "evaluate",
        "export",
        "compress",
        "register",
    }


def test_editing_the_pyfunc_retrains_nothing(locked_repo: Path, edit) -> None:
    # Serving-side model code: register ships it; export reaches it through model.variants.
    edit("model/servable.py")
    assert _changed_stages(locked_repo) == {"export", "register"}


def test_editing_the_service_reruns_no_stage_before_register(locked_repo: Path, edit) -> None:
    # register's pre-promotion check calls the model as the service does
    edit("serving/payloads.py")
    changed = _changed_stages(locked_repo)
    assert "register" in changed
    assert not changed & {"ingest", "validate", "features", "train", "evaluate"}


def test_editing_tuning_code_reruns_no_stage(locked_repo: Path, edit) -> None:
    # make tune's code sits in stages/train beside the stage's; dvc.yaml lists the stage's files.
    # The ensemble stage reads a study's best trials (ensemble.members.tune_top_k) through
    # tuning.py and the space it names: those two re-run it, and nothing else.
    names = {"trial.py", *(path.name for path in (ROOT / "stages/train").glob("tun*.py"))}
    assert {"trial.py", "tuning.py", "tune_space.py"} < names
    for name in sorted(names - {"tuning.py", "tune_space.py"}):
        edit(f"stages/train/{name}")
    assert _changed_stages(locked_repo) == set()
    edit("stages/train/tuning.py")
    assert _changed_stages(locked_repo) == {"ensemble"}


def test_editing_the_training_loop_reruns_train(locked_repo: Path, edit) -> None:
    edit("stages/train/loop.py")  # one of the files train lists one by one
    assert _changed_stages(locked_repo) == {"train", "ensemble"}  # ensemble members train with it


def test_editing_a_flow_reruns_no_stage(locked_repo: Path, edit) -> None:
    edit("flows/pipeline.py")  # orchestration: it decides what runs, not what a stage computes
    assert _changed_stages(locked_repo) == set()


def test_bytecode_changes_nothing_dvc_hashes(locked_repo: Path) -> None:
    compiled = subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "stages", "model", "serving", "flows"],
        cwd=locked_repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert list((locked_repo / "stages" / "common").glob("__pycache__/*.pyc"))
    assert _changed_stages(locked_repo) == set()

    # Without .dvcignore the same bytecode would re-run every stage: the check above can fail.
    dvcignore = locked_repo / ".dvcignore"
    kept = dvcignore.read_text()
    dvcignore.write_text("")
    try:
        assert _changed_stages(locked_repo) == set(STAGES)
    finally:
        dvcignore.write_text(kept)
    assert _changed_stages(locked_repo) == set()


# --- dvc.yaml's code deps against the code each stage imports (AST, nothing is imported) ---


def _module_file(name: str) -> Path | None:
    """The file Python runs for module ``name`` of this project, or None (third-party, a name)."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imported_files(path: Path) -> set[Path]:
    """Project files that importing ``path`` can run: every import in it (module level and inside
    functions), each with its parent packages' ``__init__.py``."""
    module = path.relative_to(ROOT).with_suffix("").parts
    package = module[:-1]  # stages/train/x.py and stages/train/__init__.py: stages.train
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to this file's package
                parts = package[: len(package) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # a submodule, or a name
    # A process the stage starts (``python -m stages.train.members``) runs that module's code:
    # its name as a string constant counts as an import.
    names |= {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and PROCESS_MODULE.fullmatch(node.value)
    }
    files: set[Path] = set()
    for name in names:
        parts = name.split(".")
        if parts[0] not in CODE_ROOTS:
            continue
        for end in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, ...
            found = _module_file(".".join(parts[:end]))
            if found:
                files.add(found)
    return files


def _code_closure(stage: str) -> set[str]:
    """Every project file the stage's process can import: its package (or, when dvc.yaml lists
    the package file by file, what ``python -m stages.<stage>`` runs) and stages/common, and
    what they import under model/, serving/ and the package, transitively."""
    package = f"stages/{stage}"
    roots = [package] if package in _code_deps(stage) else [f"{package}/__main__.py"]
    todo = [
        f
        for root in (*roots, "stages/common")
        for f in ([ROOT / root] if root.endswith(".py") else (ROOT / root).rglob("*.py"))
    ]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(_imported_files(path))
    seen.discard(ROOT / "stages" / "__init__.py")  # a docstring only (checked below)
    return {path.relative_to(ROOT).as_posix() for path in seen}


def _code_deps(stage: str) -> list[str]:
    return [dep.rstrip("/") for dep in DVC_STAGES[stage]["deps"] if dep.split("/")[0] in CODE_ROOTS]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(f"{dep}/") for dep in deps)


def test_the_stages_package_init_runs_no_code() -> None:
    # No stage lists stages/__init__.py although every stage imports it: it must stay a docstring.
    body = ast.parse((ROOT / "stages" / "__init__.py").read_text()).body
    assert len(body) == 1 and isinstance(body[0], ast.Expr), "stages/__init__.py: a docstring only"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_depends_on_every_file_it_imports(stage: str) -> None:
    deps = _code_deps(stage)
    missing = sorted(path for path in _code_closure(stage) if not _covered(path, deps))
    assert not missing, f"dvc.yaml stage {stage}: add to deps (the stage imports them): {missing}"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_lists_no_model_file_it_does_not_import(stage: str) -> None:
    # A listed file the stage never imports would re-run it for nothing when edited.
    closure = _code_closure(stage)
    extra = [dep for dep in _code_deps(stage) if dep.endswith(".py") and dep not in closure]
    assert not extra, f"dvc.yaml stage {stage}: the stage does not import {extra}"
