"""Trace a registered model back to everything that made it.

    python -m flows.lineage classifier@champion          # by alias
    python -m flows.lineage classifier/3 --json          # by version, for machines

The chain, read from the MLflow registry and the training run: the model version (aliases,
promotion decision), the MLflow run, the git commit (and whether the tree was dirty), the
params and ``dvc.lock`` as they were at train time (run artifacts under ``lineage/``, written
by ``stages.common.tracking.log_lineage``), every input file the stages read by hash (the
suite, the code; a copy of those the commit lacks), the data versions (``data/*`` outputs of
``dvc.lock``: md5, size, files), the validation result, the Prefect flow run and the test
metrics; and the model's alias history (every move of its aliases: from which version to
which, why, which run or who, when; ``stages.register.registry``). ``flows.reproduce`` rebuilds
the same inputs in a clean workspace; ``flows.rollback`` moves ``champion`` back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from serving.model import COMPACT_PARENT_TAG
from stages.common import tracking
from stages.common.config import MlflowParams, describe_errors, read_yaml
from stages.common.errors import PipelineError
from stages.register import registry

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

DATA_PREFIX = "data/"  # dvc.lock outputs shown as the data versions (raw, validated, features)
METRIC_PREFIX = "test_"  # the evaluate stage logs the test metrics as test_<name>
PARAMS_HIDDEN = ("mlflow", "schedule", "serve")  # sections that do not shape the model
_REF = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))$")


class LineageError(PipelineError):
    """The model, alias or version is unknown, or its run cannot be read."""


@dataclass(frozen=True)
class ModelRef:
    """``<name>@<alias>`` or ``<name>/<version>``: one registered model version."""

    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_model_ref(text: str) -> ModelRef:
    """``classifier@champion`` or ``classifier/3`` -> ModelRef.

    Raises:
        LineageError: neither form.
    """
    match = _REF.match(text.strip())
    if not match:
        raise LineageError(
            f"{text!r}: expected <model>@<alias> (e.g. classifier@champion) "
            "or <model>/<version> (e.g. classifier/3)"
        )
    return ModelRef(match["name"], match["alias"], match["version"])


def data_versions(lock: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``data/*`` outputs of a parsed ``dvc.lock``: stage, path, md5, size, nfiles."""
    versions = []
    for stage, entry in (lock.get("stages") or {}).items():
        for out in (entry or {}).get("outs") or []:
            if str(out.get("path", "")).startswith(DATA_PREFIX):
                versions.append(
                    {
                        "stage": stage,
                        "path": out["path"],
                        "md5": out.get("md5"),
                        "size": out.get("size"),
                        "nfiles": out.get("nfiles"),
                    }
                )
    return versions


def dirty_files(tags: dict[str, str]) -> list[str] | None:
    """The files the run's git tree differed in: [] when clean, None when dirty but unlisted."""
    if tags.get("git.dirty") != "true":
        return []
    listed = tags.get(tracking.DIRTY_FILES_TAG)
    return None if listed is None else [name for name in listed.split(",") if name]


# --- I/O ----------------------------------------------------------------------------------


def resolve_tracking_uri(repo: Path, params_file: Path) -> str:
    """``MLFLOW_TRACKING_URI`` or params ``mlflow.tracking_uri``, a relative sqlite path
    taken relative to ``repo``.

    MLflow's HTTP limits from the same params (``mlflow.request_timeout_s``, ``max_retries``,
    ``backoff_s``) are applied, as for a stage, so a tracking server that is down fails the
    command in seconds, not after minutes of retries.

    Raises:
        LineageError: a sqlite store that does not exist (opening it would create it empty).
    """
    mlflow_params = _mlflow_params(params_file)
    tracking.apply_http_limits(mlflow_params)
    uri = tracking.tracking_uri(mlflow_params)
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db = db if db.is_absolute() else (repo / db).resolve()
        if not db.is_file():
            raise LineageError(
                f"no MLflow store at {db} (tracking URI {uri}); run the "
                "pipeline first, or set MLFLOW_TRACKING_URI / --params"
            )
        uri = f"sqlite:///{db}"
    return uri


def open_client(uri: str) -> MlflowClient:
    """A client for ``uri`` (tracking and registry) that leaves MLflow's global URI alone."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def find_version(client: MlflowClient, ref: ModelRef) -> ModelVersion:
    """The registered version ``ref`` names.

    Raises:
        LineageError: unknown model, alias or version; the message lists what exists.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(ref.name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise LineageError(
            f"no registered model {ref.name!r} (registered: {', '.join(names) or 'none'})"
        ) from exc
    if ref.alias is not None:
        if ref.alias not in model.aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items()))
            raise LineageError(
                f"model {ref.name!r} has no alias {ref.alias!r} (aliases: {known or 'none'})"
            )
        return client.get_model_version(ref.name, model.aliases[ref.alias])
    try:
        return client.get_model_version(ref.name, ref.version)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        versions = sorted(
            int(v.version) for v in client.search_model_versions(f"name = '{ref.name}'")
        )
        raise LineageError(
            f"model {ref.name!r} has no version {ref.version} (versions: "
            f"{', '.join(map(str, versions)) or 'none'})"
        ) from exc


def read_artifact_bytes(client: MlflowClient, run_id: str, path: str) -> bytes | None:
    """The bytes of one run artifact, None when the run has no such artifact."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if path not in {a.path for a in client.list_artifacts(run_id, parent or None)}:
        return None
    with tempfile.TemporaryDirectory(prefix="lineage-") as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def read_artifact(client: MlflowClient, run_id: str, path: str) -> str | None:
    """The text of one run artifact, None when the run has no such artifact."""
    data = read_artifact_bytes(client, run_id, path)
    return None if data is None else data.decode("utf-8")


def logged_inputs(
    client: MlflowClient, run_id: str, inputs: dict[str, Any] | None
) -> dict[str, bytes]:
    """``{path: bytes}`` of the input files the run copied under ``lineage/inputs/``.

    Raises:
        LineageError: ``inputs`` (its ``inputs.json``) lists a copy the run does not have.
    """
    files = {}
    for path, entry in (inputs or {}).items():
        if entry.get("logged"):
            name = f"{tracking.LINEAGE_DIR}/{tracking.INPUTS_DIR}/{path}"
            data = read_artifact_bytes(client, run_id, name)
            if data is None:
                raise LineageError(f"run {run_id} lists {path} as logged but has no {name}")
            files[path] = data
    return files


def lineage_files(client: MlflowClient, run_id: str) -> dict[str, str]:
    """``{"params.yaml": text, "dvc.lock": text}`` as the run logged them at train time.

    Raises:
        LineageError: the run has not logged them (it predates lineage recording).
    """
    files = {}
    for name in (tracking.PARAMS_ARTIFACT, tracking.LOCK_ARTIFACT):
        text = read_artifact(client, run_id, f"{tracking.LINEAGE_DIR}/{name}")
        if text is None:
            raise LineageError(
                f"run {run_id} has no {tracking.LINEAGE_DIR}/{name} artifact "
                "(it was trained before lineage was recorded)"
            )
        files[name] = text
    return files


def build_lineage(client: MlflowClient, ref: ModelRef, ui_url: str) -> dict[str, Any]:
    """The whole chain of ``ref`` as plain JSON-able data (see the module docstring)."""
    version = find_version(client, ref)
    run = client.get_run(version.run_id)
    tags, run_id = run.data.tags, run.info.run_id
    lock, params, summary, inputs = (
        read_artifact(client, run_id, f"{tracking.LINEAGE_DIR}/{name}")
        for name in (
            tracking.LOCK_ARTIFACT,
            tracking.PARAMS_ARTIFACT,
            tracking.VALIDATION_ARTIFACT,
            tracking.INPUTS_ARTIFACT,
        )
    )
    return {
        "model": {
            "name": version.name,
            "version": int(version.version),
            "aliases": sorted(version.aliases),
            "source": version.source,
            "decision": version.tags.get("promotion.decision"),
            "reason": version.tags.get("promotion.reason"),
            # a compact model (compress stage): the version it was made from, on the same run
            "compact_of": version.tags.get(COMPACT_PARENT_TAG),
        },
        "run": {
            "id": run_id,
            "experiment_id": run.info.experiment_id,
            "status": run.info.status,
            "device": tags.get("device"),
            "url": tracking.run_url(ui_url, run.info.experiment_id, run_id),
        },
        "git": {
            "commit": tags.get("git.commit"),
            "dirty": tags.get("git.dirty") == "true",
            "dirty_files": dirty_files(tags),
        },
        "params": yaml.safe_load(params) if params else None,
        "params_logged": params is not None,
        "dvc_lock_logged": lock is not None,
        "data": data_versions(yaml.safe_load(lock) or {}) if lock else _data_from_tags(tags),
        "validation": json.loads(summary) if summary else _validation_from_tags(tags),
        # {path: {md5, lock_md5, stages, in_git, logged}}; None for runs from before it
        "inputs": json.loads(inputs) if inputs else None,
        "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
        "metrics": {
            key.removeprefix(METRIC_PREFIX): value
            for key, value in sorted(run.data.metrics.items())
            if key.startswith(METRIC_PREFIX)
        },
        # every recorded move of the model's aliases, oldest first (registry-audit)
        "alias_history": [asdict(move) for move in registry.alias_history(client, version.name)],
    }


def _data_from_tags(tags: dict[str, str]) -> list[dict[str, Any]]:
    # A run from before lineage/ was logged: its dvc.<path>.md5 tags are all there is.
    return [
        {"stage": None, "path": key[4:-4], "md5": value, "size": None, "nfiles": None}
        for key, value in sorted(tags.items())
        if key.startswith(f"dvc.{DATA_PREFIX}") and key.endswith(".md5")
    ]


def _validation_from_tags(tags: dict[str, str]) -> dict[str, str] | None:
    return {
        key.removeprefix("validation."): value
        for key, value in tags.items()
        if key.startswith("validation.")
    } or None


def ui_url_for(uri: str, params_file: Path) -> str:
    """Where the MLflow UI is: the tracking server itself, else ``make ui``'s local port."""
    if uri.startswith(("http://", "https://")):
        return uri
    return f"http://127.0.0.1:{_mlflow_params(params_file).ui_port}"


def _mlflow_params(params_file: Path) -> MlflowParams:
    # Only the mlflow section: lineage must work while other sections change shape.
    raw = read_yaml(params_file, "params file") if params_file.is_file() else {}
    section = (raw or {}).get("mlflow") or {}
    try:
        return MlflowParams.model_validate(section)
    except ValidationError as exc:
        raise LineageError(f"{params_file}: " + "; ".join(describe_errors(exc, "mlflow"))) from exc


# --- rendering ----------------------------------------------------------------------------


def render_text(lineage: dict[str, Any]) -> str:
    """The chain for humans: one block per link, data first-class."""
    model, run, git = lineage["model"], lineage["run"], lineage["git"]
    aliases = ", ".join(model["aliases"]) or "none"
    dirty = git["dirty_files"]
    dirty_text = (
        "no"
        if not git["dirty"]
        else "YES (files not recorded)"
        if dirty is None
        else f"yes: {', '.join(dirty)}"
    )
    decision = (model["decision"] or "not recorded") + (
        f": {model['reason']}" if model["reason"] else ""
    )
    lines = [
        f"Model      {model['name']} version {model['version']} (aliases: {aliases})",
        *textwrap.wrap(
            f"decision {decision}", width=100, initial_indent="  ", subsequent_indent="           "
        ),
        f"MLflow run {run['id']} ({run['status']}, device {run['device'] or '?'})",
        f"  UI       {run['url']}",
        f"Git        commit {git['commit'] or 'unknown'}, dirty: {dirty_text}",
        f"Prefect    flow run {lineage['prefect_flow_run_id'] or 'none (not run by the flow)'}",
        "Data       (dvc.lock at train time"
        + ("" if lineage["dvc_lock_logged"] else ": not logged, from the run tags")
        + ")",
    ]
    for item in lineage["data"]:
        size = "" if item["size"] is None else f"  {item['size']} bytes"
        files = "" if item["nfiles"] is None else f", {item['nfiles']} files"
        lines.append(f"  {item['path']:<18} md5 {item['md5']}{size}{files}")
    lines.append(
        "Inputs     "
        + (
            "(files the stages read, at train time)"
            if lineage["inputs"] is not None
            else "not recorded for this run"
        )
    )
    for path, entry in (lineage["inputs"] or {}).items():
        where = (
            "logged with the run"
            if entry["logged"]
            else "in the commit"
            if entry["in_git"]
            else "NOT in the commit, not logged"
        )
        if entry["md5"] is not None:  # a file (folders: their dvc.lock hash is in the lock)
            lines.append(f"  {path:<32} md5 {entry['md5']}  {where}")
    lines.append("Validation " + _describe_validation(lineage["validation"]))
    lines.append(
        "Params     "
        + ("(params.yaml at train time)" if lineage["params_logged"] else "not logged for this run")
    )
    for section, values in (lineage["params"] or {}).items():
        if section not in PARAMS_HIDDEN and isinstance(values, dict):
            text = ", ".join(f"{k}={v}" for k, v in values.items())
            lines += textwrap.wrap(
                f"{section}: {text}", width=100, initial_indent="  ", subsequent_indent="      "
            )
    lines.append("Test metrics")
    lines += [f"  {name:<10} {value:.6f}" for name, value in lineage["metrics"].items()]
    lines.append(
        f"Aliases    history of {model['name']} (oldest first; make rollback moves champion back)"
        if lineage.get("alias_history")
        else "Aliases    no recorded moves (made before the history was kept)"
    )
    for move in lineage.get("alias_history") or []:
        lines += textwrap.wrap(
            registry.AliasMove(**move).describe(),
            width=100,
            initial_indent="  ",
            subsequent_indent="      ",
        )
    return "\n".join(lines)


def _describe_validation(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "not recorded"
    shown = {key: summary[key] for key in tracking.VALIDATION_TAG_KEYS if key in summary}
    failed = summary.get("failed")
    if isinstance(failed, list):
        shown["failed checks"] = len(failed)
    return ", ".join(f"{key}={value}" for key, value in shown.items()) or json.dumps(summary)


# --- CLI ----------------------------------------------------------------------------------


def build_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The options ``lineage`` and ``reproduce`` share: the model, ``--repo``, ``--params``."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", help="<model>@<alias> (classifier@champion) or <model>/<version> (classifier/3)"
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=Path("."),
        help="the project checkout (git + DVC) the model was trained in "
        "(default: the current directory)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="params file whose mlflow.tracking_uri names the MLflow store; "
        "env MLFLOW_TRACKING_URI overrides it (default: REPO/params.yaml)",
    )
    return parser


def load_lineage(args: argparse.Namespace) -> dict[str, Any]:
    """The lineage of ``args.model`` from the store that ``args`` name."""
    ref = parse_model_ref(args.model)
    params_file = args.params or args.repo / "params.yaml"
    uri = resolve_tracking_uri(args.repo, params_file)
    lineage = build_lineage(open_client(uri), ref, ui_url_for(uri, params_file))
    lineage["tracking_uri"] = uri
    return lineage


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.lineage <model>@<alias>|<model>/<version> [--json]``."""
    parser = build_parser(
        "python -m flows.lineage",
        "Print what made a registered model: the data versions and their hashes (dvc.lock at "
        "train time),\nthe validation result, the git commit, the params, the MLflow run, the "
        "Prefect flow run\nand the test metrics.",
        "examples:\n  python -m flows.lineage classifier@champion\n"
        "  python -m flows.lineage classifier/3 --json\n"
        "  make lineage MODEL=classifier@challenger\n\n"
        "Re-run the same data, code and params: python -m flows.reproduce <model>",
    )
    parser.add_argument("--json", action="store_true", help="print the chain as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # small files
    try:
        lineage = load_lineage(args)
    except PipelineError as exc:
        print(f"lineage: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(lineage, indent=2, default=str) if args.json else render_text(lineage))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
