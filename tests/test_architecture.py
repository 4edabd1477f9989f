"""What may import what (ARCHITECTURE.md), checked on the real code.

The rules are import-linter contracts in ``pyproject.toml`` ([tool.importlinter]); this test runs
``lint-imports`` as ``make lint`` does and fails with its report. A second group of tests breaks
each rule in a temporary copy of the code, so a contract that silently stopped checking (a
renamed package, a typo in a module name) fails here too.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
PACKAGES = ("stages", "model", "serving", "flows", "stack", "monitoring", "pages")
# flows/ orchestrate: the work (and its heavy imports) lives in stages/ and model/.
NOT_IN_FLOWS = {"pandas", "torch", "numpy"}


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_import_contracts_are_kept() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _stage_names(root: Path) -> list[str]:
    return sorted(
        p.parent.name for p in (root / "stages").glob("*/__init__.py") if p.parent.name != "common"
    )


@pytest.fixture
def code_copy(tmp_path: Path) -> Path:
    """The project's packages and pyproject.toml in a temporary folder, to break on purpose."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("model/nets.py", "import stages.common.config", "model/ (what a registered model ships)"),
        ("serving/app.py", "import stages.common.io", "serving/ imports model/ only"),
        ("stages/common/io.py", "import flows.pipeline", "Stages import nothing from flows/"),
        ("stages/common/io.py", "import serving.app", "stages.common imports neither"),
        ("stages/common/io.py", "import stages.train.stage", "No stage imports another stage"),
        ("stack/settings.py", "import flows.pipeline", "stack/ (the servers: make up"),
        ("stages/common/io.py", "import stack.settings", "Stages and the model import nothing"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    code_copy: Path, module: str, bad_import: str, contract: str
) -> None:
    _append(code_copy / module, bad_import)
    result = _lint_imports(code_copy)
    assert result.returncode != 0, result.stdout
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def test_every_stage_importing_another_breaks_the_contract(code_copy: Path) -> None:
    stages = _stage_names(code_copy)
    assert {"ingest", "validate", "features", "train", "evaluate", "register"} <= set(stages)
    # Each stage imports the next one in the list (the last one the first): every stage breaks it.
    for importer, imported in zip(stages, stages[1:] + stages[:1], strict=True):
        _append(code_copy / "stages" / importer / "stage.py", f"import stages.{imported}.stage")
    result = _lint_imports(code_copy)
    assert result.returncode != 0, result.stdout
    for importer, imported in zip(stages, stages[1:] + stages[:1], strict=True):
        assert f"stages.{importer}.stage -> stages.{imported}.stage" in result.stdout, importer


def test_a_new_stage_folder_must_be_declared(code_copy: Path) -> None:
    # exhaustive = true: a package under stages/ the contract does not name breaks it, so a new
    # stage cannot slip past the independence rule.
    (code_copy / "stages" / "tune").mkdir()
    (code_copy / "stages" / "tune" / "__init__.py").write_text('"""A new stage."""\n')
    result = _lint_imports(code_copy)
    assert result.returncode != 0, result.stdout
    assert "tune" in result.stdout, result.stdout


def test_a_stage_named_in_the_contract_must_exist(code_copy: Path) -> None:
    # No layer is optional: a stage package that went missing (export included) breaks the
    # contract rather than leaving it checking one stage fewer.
    shutil.rmtree(code_copy / "stages" / "export")
    result = _lint_imports(code_copy)
    assert result.returncode != 0, result.stdout
    assert "stages.export does not exist" in result.stdout + result.stderr, result.stdout


def _imported_roots(tree: ast.AST) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(tree):  # module level and inside functions alike
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_flows_only_orchestrate() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            _imported_roots(ast.parse(path.read_text())) & NOT_IN_FLOWS
        )
        for path in sorted((ROOT / "flows").rglob("*.py"))
    }
    assert not {path: names for path, names in offenders.items() if names}, (
        "flows/ orchestrate: move data and tensor work into a stage or model/"
    )
