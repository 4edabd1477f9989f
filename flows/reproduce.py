"""Re-run the pipeline of a registered model in a clean workspace; compare its test metrics.

    python -m flows.reproduce classifier@champion [--workdir DIR] [--remote NAME|URL] [--stack]

1. ``git clone`` the repo at the run's recorded commit (refused when the tree was dirty in
   code: files other than ``dvc.lock`` / ``params.yaml`` and the input files logged with the
   run, which are restored from it, and the paths ``dvc.yaml`` declares as outputs, metrics or
   plots, which the stages rewrite; ``--allow-dirty`` goes on with a warning);
2. write the run's ``params.yaml``, ``dvc.lock`` and logged inputs (``lineage/`` artifacts:
   e.g. a suite the commit lacks) into it; every input file the re-run stages read must have
   the md5 the run recorded;
3. point its DVC remote at the original repo's default remote, or ``--remote``: a URL, or the
   name of a remote configured in the repo, whose whole config (``endpointurl``, ``region``,
   ...) is copied into the workspace's ``.dvc/config.local`` (credentials from the
   environment, e.g. ``AWS_*``). ``--stack``: the server stack's MLflow server and bucket
   (the remote ``stack``, settings and credentials from ``stack/stack.env``);
4. ``dvc pull`` the ingest stage's outputs: the exact raw data of that run, hashed from its
   bytes (and its cache objects) against the run's ``dvc.lock``: DVC trusts the remote's
   object names, so a corrupt object there stops the reproduction, naming the file;
5. ``dvc repro --force --single-item`` each stage after ingest up to evaluate, in the order
   ``dvc dag`` gives, with the workspace's own MLflow store;
6. compare the workspace's ``reports/metrics.json`` with the registered run's test metrics.

Exit code 0 when every metric is exactly equal, 1 otherwise (or on any error).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flows.lineage import (
    LineageError,
    build_parser,
    lineage_files,
    load_lineage,
    logged_inputs,
    open_client,
)
from stages.common.tracking import FLOW_RUN_ENV, LOCK_ARTIFACT, PARAMS_ARTIFACT

RESTORED_STAGE = "ingest"  # its outputs come from the DVC remote; its source may be gone
FINAL_STAGE = "evaluate"  # writes METRICS_FILE
METRICS_FILE = "reports/metrics.json"
RESTORED_FILES = (PARAMS_ARTIFACT, LOCK_ARTIFACT)  # dirty in these is fine: both are restored
REMOTE_NAME = "origin"
OUTPUT_TAIL = 30  # lines of a failed command's output shown
_VAR = re.compile(r"\$\{([^}]+)\}")  # dvc.yaml's ${section.key} interpolation


class ReproduceError(LineageError):
    """The workspace cannot be built or a stage failed in it."""


# --- pure core ----------------------------------------------------------------------------


def resolve_remote_url(url: str, base: Path) -> str:
    """A DVC remote URL usable from anywhere: a relative local path made absolute."""
    if "://" in url or Path(url).is_absolute():
        return url  # s3://, gs://, https://, ... or already absolute
    return str((base / url).resolve())


def declared_outputs(dvc_yaml: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """Every path ``dvc.yaml`` declares as a stage output, metric or plot (``${...}`` resolved
    from ``params``), and the files of its top-level ``plots`` and ``metrics``."""
    paths: list[str] = []
    for stage in (dvc_yaml.get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            paths += [
                next(iter(item)) if isinstance(item, dict) else item
                for item in (stage or {}).get(key) or []
            ]
    for item in dvc_yaml.get("plots") or []:  # a path, or {title: {y: {path: [...]}}}
        if isinstance(item, str):
            paths.append(item)
        elif isinstance(item, dict):
            for title, spec in item.items():
                y = (spec or {}).get("y") if isinstance(spec, dict) else None
                paths += list(y) if isinstance(y, dict) else [title]
    paths += [m for m in dvc_yaml.get("metrics") or [] if isinstance(m, str)]
    return sorted({_interpolate(str(path), params).strip("/") for path in paths})


def _interpolate(text: str, params: dict[str, Any]) -> str:
    def value(match: re.Match[str]) -> str:
        node: Any = params
        for key in match[1].strip().split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return match[0] if node is None else str(node)

    return _VAR.sub(value, text)


def check_clean(
    dirty: list[str] | None, allow_dirty: bool, restored: Sequence[str] = ()
) -> str | None:
    """None when the recorded tree can be rebuilt from git; else a warning (allow_dirty).

    ``restored``: paths the workspace gets from the run rather than from git (the outputs
    ``declared_outputs`` lists, which the stages rewrite; the inputs logged with the run).

    Raises:
        ReproduceError: the tree differed from the commit and ``allow_dirty`` is False.
    """
    # DVC adds each new output to its folder's .gitignore: ignore rules are not code
    unrestored = (
        None
        if dirty is None
        else [
            f
            for f in dirty
            if f not in RESTORED_FILES
            and Path(f).name != ".gitignore"
            and not any(f == path or f.startswith(f"{path}/") for path in restored)
        ]
    )
    if unrestored == []:
        return None
    what = "files not recorded" if unrestored is None else ", ".join(unrestored)
    message = (
        f"the run was trained on uncommitted changes ({what}): the workspace at its "
        "commit may not be the code that trained it"
    )
    if not allow_dirty:
        raise ReproduceError(message + "; pass --allow-dirty to reproduce anyway")
    return message


def check_inputs(
    workdir: Path, inputs: dict[str, Any] | None, stages: Sequence[str], allow_dirty: bool
) -> list[str]:
    """The input files ``stages`` read, as the run recorded them (``lineage/inputs.json``):
    each must be in ``workdir`` with its recorded md5. Returns warnings (``allow_dirty``).

    Raises:
        ReproduceError: one is missing or differs, naming it, its stages and its md5.
    """
    from stages.common.tracking import file_md5

    problems = []
    for path, entry in (inputs or {}).items():
        if entry.get("md5") is None or not set(entry.get("stages") or []) & set(stages):
            continue  # a folder (DVC hashes it) or read only by the restored stage
        file = workdir / path
        found = file_md5(file) if file.is_file() else None
        if found != entry["md5"]:
            state = "missing" if found is None else f"md5 {found}"
            where = (
                ""
                if entry.get("in_git")
                else " (the copy logged with the run differs: a damaged artifact?)"
                if entry.get("logged")
                else " (the run's commit lacks it, and it was not "
                "logged: too large, or changed after its stage read it)"
            )
            problems.append(
                f"{path}, read by {', '.join(entry['stages'])}: the run read md5 "
                f"{entry['md5']}, the workspace has {state}{where}"
            )
    if problems and not allow_dirty:
        raise ReproduceError(
            "the workspace would not read the run's inputs: "
            + "; ".join(problems)
            + "; pass --allow-dirty to go on anyway"
        )
    return problems


def order_stages_between(dot: str, first: str) -> list[str]:
    """The stages of ``dvc dag --dot <final>`` in run order, without ``first`` and upstream."""
    from flows.pipeline import order_stages

    nodes = [
        line.strip().strip(";").strip('"')
        for line in dot.splitlines()
        if line.strip().startswith('"') and "->" not in line
    ]
    ordered = order_stages(dot, nodes)
    return ordered[ordered.index(first) + 1 :] if first in ordered else ordered


def compare_metrics(recorded: dict[str, float], reproduced: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per recorded metric: both values and whether they are exactly equal."""
    return [
        {
            "metric": name,
            "registered": value,
            "reproduced": reproduced.get(name),
            "match": reproduced.get(name) == value,
        }
        for name, value in recorded.items()
    ]


def render_table(rows: list[dict[str, Any]], version: int) -> str:
    """The comparison as an aligned text table (full float precision)."""
    header = ("metric", f"registered v{version}", "reproduced", "match")
    body = [
        (r["metric"], repr(r["registered"]), repr(r["reproduced"]), "yes" if r["match"] else "NO")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
        for row in [header, *body]
    )


# --- I/O ----------------------------------------------------------------------------------


class Workspace:
    """A clean checkout where the pipeline re-runs with its own MLflow store."""

    def __init__(self, path: Path, verbose: bool = False) -> None:
        self.path, self.verbose = path, verbose
        self.env = dict(os.environ)
        # This interpreter's `python` runs the dvc.yaml commands; MLflow stays in the workspace.
        self.env["PATH"] = os.pathsep.join(
            [str(Path(sys.executable).parent), self.env.get("PATH", "")]
        )
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", FLOW_RUN_ENV):
            self.env.pop(name, None)
        self.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow' / 'mlflow.db'}"

    def run(self, *args: str, cwd: Path | None = None) -> str:
        """Run a command; its output on failure (ReproduceError), or streamed with verbose."""
        proc = subprocess.Popen(
            args,
            cwd=cwd or self.path,
            env=self.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip("\n"))
            if self.verbose:
                print(f"    {line.rstrip()}", file=sys.stderr)
        if proc.wait() != 0:
            tail = "\n".join(lines[-OUTPUT_TAIL:])
            raise ReproduceError(
                f"`{' '.join(args[2:] if args[0] == sys.executable else args)}`"
                f" failed (exit {proc.returncode}):\n{tail}"
            )
        return "\n".join(lines)

    def dvc(self, *args: str) -> str:
        """``dvc <args>`` in the workspace."""
        return self.run(sys.executable, "-m", "dvc", *args)


def read_default_remote(repo: Path) -> str:
    """The URL of ``repo``'s default DVC remote, as DVC resolves it (local paths absolute)."""
    return read_remote_config(repo)["url"]


def read_remote_config(repo: Path, name: str | None = None) -> dict[str, Any]:
    """The whole config of ``repo``'s DVC remote ``name`` (None: the default one) as DVC merges
    it from ``.dvc/config`` and ``.dvc/config.local``: ``url`` (local paths absolute) and the
    rest (``endpointurl``, ``region``, ...), values as ``dvc remote modify`` takes them.

    Raises:
        ReproduceError: no such remote (names the configured ones), or no default remote.
    """
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        config = dvc_repo.config
        remotes = config["remote"]
        if name is None:
            name = config["core"].get("remote")
            if not name or name not in remotes:
                raise ReproduceError(f"{repo} has no default DVC remote; pass --remote NAME|URL")
        elif name not in remotes:
            raise ReproduceError(
                f"{repo} has no DVC remote {name!r} (configured: "
                f"{', '.join(sorted(remotes)) or 'none'}); `make up` adds the stack's"
            )
        remote = dict(remotes[name])
    remote["url"] = resolve_remote_url(str(remote["url"]), repo / ".dvc")
    return {key: str(v).lower() if isinstance(v, bool) else v for key, v in remote.items()}


def is_remote_name(repo: Path, remote: str) -> bool:
    """Whether ``--remote`` names a DVC remote configured in ``repo`` (else it is a URL or a
    path, as before remotes could be named)."""
    if "://" in remote or "/" in remote or remote.startswith("."):
        return False
    try:
        read_remote_config(repo, remote)
    except ReproduceError:
        return False
    return True


def write_remote_config(workdir: Path, remote: dict[str, Any]) -> None:
    """Make ``remote`` (a whole remote config) the workspace's default DVC remote, in its
    ``.dvc/config.local`` (git-ignored: credentials in it stay out of any commit)."""
    from dvc.config import Config

    config = Config(dvc_dir=str(workdir / ".dvc"))
    with config.edit("local") as conf:
        conf["remote"][REMOTE_NAME] = dict(remote)
        conf["core"]["remote"] = REMOTE_NAME


def git_toplevel(repo: Path) -> Path:
    """The root of the git checkout holding ``repo``."""
    result = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ReproduceError(f"{repo} is not a git checkout: {result.stderr.strip()}")
    return Path(result.stdout.strip())


def prepare_workdir(workdir: Path | None, label: str) -> Path:
    """An empty folder for the workspace (a new temporary one when ``workdir`` is None)."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=f"reproduce-{label}-"))
    workdir = workdir.resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise ReproduceError(f"--workdir {workdir} is not empty; name a new or empty folder")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def _step(text: str) -> float:
    print(f"==> {text}", file=sys.stderr, flush=True)
    return time.monotonic()


def _done(started: float) -> None:
    print(f"    done in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)


def read_dvc_yaml(repo: Path, commit: str) -> dict[str, Any]:
    """``dvc.yaml`` as committed at ``commit`` ({} when git cannot show it)."""
    result = subprocess.run(
        ["git", "show", f"{commit}:./dvc.yaml"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    return (yaml.safe_load(result.stdout) or {}) if result.returncode == 0 else {}


def restore_inputs(workdir: Path, inputs: dict[str, bytes]) -> list[str]:
    """Write the input files the run logged where the checkout lacks them or differs."""
    written = []
    for path, data in inputs.items():
        file = workdir / path
        if not file.is_file() or file.read_bytes() != data:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)
            written.append(path)
    return written


def check_pulled(workdir: Path, remote_url: str) -> None:
    """What ``dvc pull`` brought must be the bytes the run's dvc.lock records (DVC trusts the
    remote's object names): every output of the restored stage and its cache objects.

    Raises:
        ReproduceError: a file differs; names it, both hashes and the remote object to fix.
    """
    from stages.common.integrity import check_repo

    problems = check_repo(workdir, [RESTORED_STAGE])
    if not problems:
        return
    # DVC 3's remote layout, as its cache's: files/md5/<2 hex>/<the rest>
    names = {
        "/".join(Path(p.path).parts[-2:]) if p.cache else f"{p.expected[:2]}/{p.expected[2:]}"
        for p in problems
        if not p.expected.startswith("(")
    }
    objects = sorted(f"{remote_url.rstrip('/')}/files/md5/{name}" for name in names)
    raise ReproduceError(
        f"the data pulled from the DVC remote {remote_url} is not what the run recorded: "
        + "; ".join(p.describe() for p in problems)
        + f". The remote holds a corrupt object ({', '.join(objects)}): replace it from a "
        "workspace whose copy is good (there: `make verify`, then remove the remote object and "
        "`dvc push`), then reproduce again"
    )


def reproduce(
    lineage: dict[str, Any],
    files: dict[str, str],
    repo: Path,
    workdir: Path,
    remote: str | None,
    allow_dirty: bool,
    verbose: bool,
    inputs: dict[str, bytes] | None = None,
) -> list[dict[str, Any]]:
    """Build the workspace, re-run the stages, return the metric comparison rows.

    ``inputs``: the input files the run logged (``flows.lineage.logged_inputs``).
    """
    git, run = lineage["git"], lineage["run"]
    inputs = inputs or {}
    outputs = declared_outputs(
        read_dvc_yaml(repo, git["commit"] or "HEAD"),
        yaml.safe_load(files.get(PARAMS_ARTIFACT) or "") or {},
    )
    if warning := check_clean(git["dirty_files"], allow_dirty, [*outputs, *inputs]):
        print(f"WARNING: {warning}", file=sys.stderr)
    if run["device"] not in (None, "cpu"):
        print(
            f"WARNING: the run trained on {run['device']}; bit-equal metrics are only "
            "expected between CPU runs",
            file=sys.stderr,
        )
    ws = Workspace(workdir, verbose)
    source = git_toplevel(repo)
    if remote and not is_remote_name(repo, remote):
        remote_config = {"url": resolve_remote_url(remote, Path.cwd())}
    else:  # the default remote, or one named: its whole config (endpointurl, region, ...)
        remote_config = read_remote_config(repo, remote)
    remote_url = remote_config["url"]

    started = _step(f"git clone {source} at {git['commit'][:12]} -> {workdir}")
    ws.run("git", "clone", "--quiet", "--no-checkout", str(source), str(workdir), cwd=source)
    try:
        ws.run("git", "-c", "advice.detachedHead=false", "checkout", "--quiet", git["commit"])
    except ReproduceError as exc:
        raise ReproduceError(f"commit {git['commit']} is not in {source}: {exc}") from exc
    for name, text in files.items():
        (workdir / name).write_text(text, encoding="utf-8")
    written = restore_inputs(workdir, inputs)
    write_remote_config(workdir, remote_config)
    _done(started)
    print(
        f"    {', '.join([*files, *written])} of run {run['id']} written; DVC remote {remote_url}",
        file=sys.stderr,
    )
    raw = ", ".join(
        f"{d['path']} {d['md5']}" for d in lineage["data"] if d["stage"] == RESTORED_STAGE
    )
    started = _step(f"dvc pull {RESTORED_STAGE}: {raw or 'its outputs'}")
    try:
        ws.dvc("pull", RESTORED_STAGE)
    except ReproduceError as exc:
        raise ReproduceError(
            f"the run's data is not in the DVC remote {remote_url} (was "
            f"`dvc push` run after it trained?): {exc}"
        ) from exc
    check_pulled(workdir, remote_url)
    _done(started)
    stages = order_stages_between(ws.dvc("dag", "--dot", FINAL_STAGE), RESTORED_STAGE)
    for problem in check_inputs(workdir, lineage.get("inputs"), stages, allow_dirty):
        print(f"WARNING: {problem}", file=sys.stderr)
    for index, stage in enumerate(stages, start=1):
        started = _step(
            f"stage {index}/{len(stages)}: {stage} (dvc repro --force --single-item {stage})"
        )
        ws.dvc("repro", "--force", "--single-item", stage)
        _done(started)
    reproduced = json.loads((workdir / METRICS_FILE).read_text(encoding="utf-8"))
    return compare_metrics(lineage["metrics"], reproduced)


def use_stack(repo: Path) -> str:
    """Point this process (and the workspace's dvc) at the stack of ``repo``: its MLflow server
    and the bucket's credentials (``StackSettings.client_env``). Returns the stack's DVC remote.

    Raises:
        ReproduceError: the stack's settings are invalid (names the setting and the file).
    """
    from stack.settings import DVC_REMOTE, StackError, load_settings

    try:
        settings = load_settings(repo)
    except StackError as exc:
        raise ReproduceError(f"--stack: {exc}") from exc
    os.environ.update(settings.client_env())
    return DVC_REMOTE


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.reproduce <model>@<alias>|<model>/<version> [--workdir DIR]``."""
    parser = build_parser(
        "python -m flows.reproduce",
        "Rebuild a registered model in a clean workspace: git clone at its commit, its params.yaml "
        "and dvc.lock,\nits raw data pulled from the DVC remote, then validate -> features -> "
        "train -> evaluate re-run\n(dvc repro --force) with the workspace's own MLflow store. "
        "Compares the test metrics with the\nregistered run's: exit code 0 when all are exactly "
        "equal, 1 otherwise.",
        "examples:\n  python -m flows.reproduce classifier@champion\n"
        "  python -m flows.reproduce classifier/3 --workdir /tmp/repro-v3\n"
        "  make reproduce MODEL=classifier/3 WORKDIR=/tmp/repro-v3",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="new or empty folder for the workspace (default: a new temporary folder)",
    )
    parser.add_argument(
        "--remote",
        default=None,
        help="DVC remote holding the data: the name of one configured in REPO (its whole "
        "config is copied: url, endpointurl, region, ...; e.g. stack) or a URL, e.g. "
        "s3://bucket/dvc (default: REPO's default remote)",
    )
    parser.add_argument(
        "--stack",
        action="store_true",
        help="the model and its data are on the server stack (`make up`): read the registry "
        "from its MLflow server and pull from its bucket (the DVC remote 'stack', unless "
        "--remote names another), with the settings and credentials of stack/stack.env",
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="go on, with a warning, when the run was trained on uncommitted code changes",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show the output of git, dvc and the stages as they run",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files
    try:
        if args.stack:
            args.remote = args.remote or use_stack(args.repo.resolve())
        lineage = load_lineage(args)
        model = lineage["model"]
        if parent := model.get("compact_of"):  # its metrics are the compact file's, not a run's
            raise LineageError(
                f"{model['name']} v{model['version']} is a compact copy of v{parent} (the compress "
                f"stage made it from that model); reproduce v{parent}: make reproduce "
                f"MODEL={model['name']}/{parent}"
            )
        client = open_client(lineage["tracking_uri"])
        files = lineage_files(client, lineage["run"]["id"])
        inputs = logged_inputs(client, lineage["run"]["id"], lineage["inputs"])
        workdir = prepare_workdir(args.workdir, f"{model['name']}-v{model['version']}")
        print(
            f"reproducing {model['name']} v{model['version']} (run {lineage['run']['id']}) "
            f"in {workdir}",
            file=sys.stderr,
        )
        rows = reproduce(
            lineage,
            files,
            args.repo.resolve(),
            workdir,
            args.remote,
            args.allow_dirty,
            args.verbose,
            inputs,
        )
    except LineageError as exc:
        print(f"reproduce: {exc}", file=sys.stderr)
        return 1
    print(render_table(rows, model["version"]))
    matched = all(row["match"] for row in rows) and bool(rows)
    print(
        f"\n{'All' if matched else 'NOT all'} {len(rows)} test metrics of {model['name']} "
        f"v{model['version']} {'match exactly' if matched else 'match'}; workspace: {workdir}"
    )
    return 0 if matched else 1


if __name__ == "__main__":
    raise SystemExit(main())
