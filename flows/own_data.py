"""Bring your own table: ``make data SRC=path/to/table.csv TARGET=column`` (Parquet too).

One command from a file to a project that ``make run`` trains, registers and promotes on:

1. ingest the file into a temporary folder (ingest's own checks: readable, UTF-8, one header,
   the target column present, rows);
2. copy it under ``ingest.data_root`` (``data/source/``) and profile the suite from that copy
   (``suites/<name>.json``, as ``python -m stages.validate suite`` does); a suite already there
   is kept (it may have been reviewed) unless ``--reprofile`` is given;
3. rehearse validate and features on it in the temporary folder with the new params: the gate
   must pass the table it was profiled from, and the features stage says which columns it
   feeds to the model and which it drops, and why;
4. score the baselines (evaluate's majority class and logistic regression) on the features
   stage's own seeded test split;
5. write ``ingest.source``, ``ingest.target``, ``ingest.format`` (a CSV's ``ingest.delimiter``
   too: the one ingest read it with), ``validate.suite_path`` and
   ``register.model_name`` (a new table is a new model) into ``params.yaml``, comments kept, in
   one atomic rename; settings that name columns the new table lacks are cleared; then
   ``dvc add`` the copied file.

Nothing in the project changes unless every step passes: on an error the copied file and the
suite are put back as they were and ``params.yaml`` is not touched. Orchestration only: the
data work is the stages' own functions.

    python -m flows.own_data SRC --target COLUMN [--delimiter ;] [--reprofile] [--repo PATH]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stages.common import runlock
from stages.common.config import Params, load_params, parse_params
from stages.common.errors import ConfigError, DataError, PipelineError
from stages.common.io import atomic_path, write_text
from stages.common.suite import load_suite
from stages.evaluate import stage as evaluate
from stages.features import stage as features
from stages.ingest import stage as ingest
from stages.validate import stage as validate

logger = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SUITES = "suites"
SUITE_MARGIN = 0.1  # the suite command's default: numeric ranges widened by 10% of the span
SHOWN_METRICS = ("accuracy", "f1_macro", "roc_auc_macro", "log_loss")


@dataclass
class OwnTable:
    """What ``bring_table`` did: the files it wrote, the params it set, what it measured."""

    source: str  # the copy under ingest.data_root, relative to the repo
    suite: str  # the profiled suite, relative to the repo
    target: str
    rows: int
    classes: list[Any]
    split_rows: dict[str, int]
    used: list[str]  # the source columns fed to the model
    dropped: dict[str, str]  # source column -> why the features stage does not use it
    datetimes: dict[str, str | None]  # datetime column -> its text format (None: ISO/typed)
    baselines: dict[str, dict[str, float]]  # evaluate's baselines on the test split
    changed: dict[str, tuple[Any, Any]]  # params key -> (before, after)
    suite_was: str = "new"  # new | kept (the suite already there) | reprofiled (replaced)
    to_commit: list[str] = field(default_factory=list)
    dvc_note: str | None = None  # why the copy is not DVC-tracked, when it is not


def table_format(path: Path, given: str | None = None) -> str:
    """``csv`` or ``parquet``: ``given``, else from the file's suffix."""
    if given:
        return given
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"cannot tell the format from the suffix {path.suffix!r}: name the file "
            f"*.csv or *.parquet, or pass --format",
            file=str(path),
            rule="format",
        )
    return fmt


def model_name_for(path: Path) -> str:
    """The registered model name for a table: its file stem, in characters MLflow accepts."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem).strip("-.").lower() or "table"


def bring_table(
    src: str | Path,
    target: str,
    repo: str | Path = ".",
    fmt: str | None = None,
    delimiter: str = ",",
    reprofile: bool = False,
) -> OwnTable:
    """Make ``repo`` train on the table ``src`` with label column ``target`` (module doc).

    ``delimiter`` separates a CSV's fields; ``reprofile`` replaces a suite already there.
    In a DVC project it holds the workspace's run lock (``stages.common.runlock``) while it
    reads and rewrites params.yaml and the data root: a pipeline run in progress makes it
    refuse, and no run starts while it writes.

    Raises:
        DataError: a missing or unreadable file, an unknown target column, data the gate or
            the features stage refuses (nothing in ``repo`` changed).
        ConfigError: ``repo/params.yaml`` is invalid.
        RunLockBusy: a pipeline run holds the workspace (nothing in ``repo`` changed).
    """
    repo = Path(os.path.abspath(repo))
    if not (repo / ".dvc").is_dir():  # no pipeline can run there, so none can hold it
        return _bring_table(src, target, repo, fmt, delimiter, reprofile)
    with runlock.run_lock(repo, command=f"make data {shlex.join([str(src), '--target', target])}"):
        return _bring_table(src, target, repo, fmt, delimiter, reprofile)


def _bring_table(
    src: str | Path, target: str, repo: Path, fmt: str | None, delimiter: str, reprofile: bool
) -> OwnTable:
    src = Path(src)
    if not src.is_file():
        raise DataError(
            "file not found (make data SRC=path/to/table.csv TARGET=column)",
            file=str(src),
            rule="exists",
        )
    fmt = table_format(src, fmt)
    params_path = repo / "params.yaml"
    params = load_params(params_path)
    dest = _data_root(repo, params) / src.name
    suite = repo / SUITES / f"{model_name_for(src)}.json"
    existed = suite.is_file()
    kept = existed and not reprofile
    # ingest's settings for the table, as written to params.yaml: make run reads it as ingest
    # does here (a Parquet file's ingest.delimiter is left as it is)
    settings = {"target": target, "format": fmt} | (
        {"delimiter": delimiter} if fmt == "csv" else {}
    )
    with tempfile.TemporaryDirectory(prefix="make-data-") as tmp_dir:
        tmp = Path(tmp_dir)
        rows = _ingest(
            src, params.ingest.model_copy(update=settings), params.base.batch_rows, tmp / "raw"
        )
        copying = not (dest.exists() and dest.resolve() == src.resolve())
        with _put_back_on_error([dest, suite] if copying else [suite]):
            if copying:
                with atomic_path(dest) as copy:
                    shutil.copyfile(src, copy)
            if not kept:
                validate.write_suite(
                    _shown(dest),
                    _shown(suite),
                    target,
                    SUITE_MARGIN,
                    params.base.batch_rows,
                    delimiter=delimiter,
                )
            elif (was := load_suite(suite).target) != target:
                raise DataError(
                    f"the suite there was profiled for target {was!r}, not "
                    f"{target!r}: REPROFILE=1 (--reprofile) profiles it again",
                    file=str(suite),
                    rule="suite_target",
                )
            else:  # on stderr above any error of the rehearsal: the kept suite may refuse it
                logger.warning(
                    "keeping %s (already there, maybe reviewed): the table must "
                    "pass it; REPROFILE=1 (--reprofile) profiles it again",
                    suite,
                )
            columns = list(load_suite(suite).columns)
            text, changed = edit_params(
                params_path.read_text(encoding="utf-8"),
                {
                    "ingest.source": dest.relative_to(repo).as_posix(),
                    **{f"ingest.{key}": value for key, value in settings.items()},
                    "validate.suite_path": suite.relative_to(repo).as_posix(),
                    "register.model_name": model_name_for(src),
                },
                columns,
            )
            new = parse_params(_plain_yaml(text), source=str(params_path))
            built = _rehearse(tmp, new, suite)
            write_text(params_path, text)  # atomic: temp file + rename
    result = OwnTable(
        source=dest.relative_to(repo).as_posix(),
        suite=suite.relative_to(repo).as_posix(),
        target=target,
        rows=rows,
        changed=changed,
        **built,
        suite_was="kept" if kept else "reprofiled" if existed else "new",
    )
    result.to_commit, result.dvc_note = _track(repo, dest, result)
    return result


def _data_root(repo: Path, params: Params) -> Path:
    """``ingest.data_root`` as an absolute path inside ``repo`` (the copy is DVC-tracked there)."""
    root = Path(os.path.normpath(repo / params.ingest.data_root))
    if not root.is_relative_to(repo):
        raise ConfigError(
            f"{repo / 'params.yaml'}: ingest.data_root "
            f"{params.ingest.data_root!r} lies outside the project {repo}: make "
            "data copies the table under it and DVC-tracks it there; set "
            "ingest.data_root to a folder inside the project (e.g. data/source)"
        )
    return root


def _ingest(src: Path, settings: Any, batch_rows: int, out: Path) -> int:
    """Ingest's own reader and checks on ``src`` with ``settings``, into ``out``; row count.

    Its errors name ``src`` as given (the data root is where it really lies: links followed).
    """
    settings = settings.model_copy(
        update={
            "source": str(src),
            "data_root": str(src.resolve().parent),
            "table": None,
            "query": None,
            "watermark": None,
        }
    )
    return ingest.run(settings, out, batch_rows).total_rows


def _rehearse(tmp: Path, params: Params, suite: Path) -> dict[str, Any]:
    """Validate and features on the ingested copy with the new params; the baselines."""
    trial = replace(
        params,
        validate=params.validate.model_copy(update={"suite_path": str(suite)}),
        mlflow=params.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{tmp}/mlflow.db"}),
    )
    validate.run(tmp / "raw", tmp / "validated", tmp / "quarantine", tmp / "report", trial)
    built = features.run(tmp / "validated", tmp / "features", trial)
    meta, specs = built.meta, load_suite(suite).columns
    _, x_test, y_test = evaluate.load_split(tmp / "features", "test")
    baselines = evaluate.score_baselines(tmp / "features", x_test, y_test, trial)
    used = [name for name in specs if name in set(meta["feature_columns"])]
    return {
        "classes": list(meta["classes"]),
        "split_rows": dict(meta["n_rows"]),
        "used": used,
        "dropped": dropped_columns(meta, [n for n in specs if n != meta["target"]]),
        "datetimes": {name: spec.format for name, spec in specs.items() if spec.kind == "datetime"},
        "baselines": baselines,
    }


def dropped_columns(meta: dict[str, Any], columns: Sequence[str]) -> dict[str, str]:
    """Why each source column the features stage does not feed to the model is left out.

    ``meta``: the features stage's meta.json (its ``dropped`` list: column, rule, reason);
    ``columns``: the source columns but the target.
    """
    used = set(meta["feature_columns"])
    reasons = {
        item["column"]: f"{item['reason']} [rule={item['rule']}]"
        for item in meta.get("dropped", [])
    }
    return {
        name: reasons.get(name, "not used by the features stage")
        for name in columns
        if name not in used
    }


def edit_params(
    text: str, values: dict[str, Any], columns: Sequence[str]
) -> tuple[str, dict[str, tuple[Any, Any]]]:
    """``params.yaml`` text with ``values`` (``section.key``) set, comments and layout kept.

    Settings naming columns that ``columns`` (the new table's) lacks are cleared:
    ``ingest.watermark``, entries of ``features.drop_columns`` and of ``validate.rules``; SQL's
    ``ingest.table``/``ingest.query`` too (the source is a file now).

    Returns:
        The new text and ``{section.key: (before, after)}`` for every value that changed.
    """
    yaml = _round_trip_yaml()
    doc = yaml.load(text) or {}
    tidied = (
        "ingest.table",
        "ingest.query",
        "ingest.watermark",
        "features.drop_columns",
        "validate.rules",
    )
    for key in values:
        section = key.split(".")[0]
        if doc.get(section) is None:  # absent, or `section:` with no value
            doc[section] = {}
        elif not isinstance(doc[section], dict):
            raise ConfigError(
                f"params.yaml: {section} is {_copy(doc[section])!r}, not a "
                f"mapping of settings: make data sets {key} there"
            )
    before = {key: _value(doc, key) for key in (*values, *tidied)}
    for key, value in values.items():
        section, name = key.split(".")
        doc[section][name] = value
    ingest_section = doc["ingest"]
    for name in ("table", "query"):
        if ingest_section.get(name) is not None:
            ingest_section[name] = None
    if ingest_section.get("watermark") not in (None, *columns):
        ingest_section["watermark"] = None
    dropped = (doc.get("features") or {}).get("drop_columns") or []
    for name in [name for name in dropped if name not in columns]:
        dropped.remove(name)
    rules = (doc.get("validate") or {}).get("rules") or {}
    for name in [name for name in rules if name not in columns]:
        del rules[name]
    out = io.StringIO()
    yaml.dump(doc, out)
    changed = {key: (old, _value(doc, key)) for key, old in before.items()}
    return out.getvalue(), {key: pair for key, pair in changed.items() if pair[0] != pair[1]}


def _value(doc: dict, key: str) -> Any:
    # ``section.name`` of a ruamel document as plain Python values (None when absent).
    section, name = key.split(".")
    return _copy((doc.get(section) or {}).get(name))


def _round_trip_yaml() -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, key order, flow style and quotes are kept
    yaml.preserve_quotes = True
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )  # `null`, as the file writes it, not an empty value
    return yaml


def _plain_yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text) or {}


def _copy(value: Any) -> Any:
    # Plain Python values of ruamel's commented containers, to compare before and after.
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _shown(path: Path) -> str:
    # Relative to the working directory when under it: the suite records the command it took.
    return os.path.relpath(path) if path.resolve().is_relative_to(Path.cwd()) else str(path)


@contextmanager
def _put_back_on_error(paths: Sequence[Path]) -> Iterator[None]:
    """Restore ``paths`` (or remove those that did not exist) if the block raises."""
    with tempfile.TemporaryDirectory(prefix="make-data-backup-") as backup:
        saved = {}
        for index, path in enumerate(paths):
            if path.is_file():
                saved[path] = Path(backup) / str(index)
                shutil.copy2(path, saved[path])
        try:
            yield
        except BaseException:
            for path in paths:
                if path in saved:
                    with atomic_path(path) as restored:
                        shutil.copy2(saved[path], restored)
                else:
                    path.unlink(missing_ok=True)
            raise


def _track(repo: Path, dest: Path, result: OwnTable) -> tuple[list[str], str | None]:
    """``dvc add`` the copied table; the paths to commit, and why it is not tracked if not."""
    source = dest.relative_to(repo).as_posix()
    paths = ["params.yaml", result.suite]
    if not (repo / ".dvc").is_dir():
        return [*paths, source], "not a DVC repository: commit the file to git"
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "add", "-q", source],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["dvc add failed"]
        return [*paths, source], f"dvc add {source} failed ({why[0]}): commit the file to git"
    ignore = (dest.parent / ".gitignore").relative_to(repo).as_posix()
    return [*paths, f"{source}.dvc", ignore], None


# ------------------------------------------------------------------------------- the report


def render_report(result: OwnTable) -> str:
    """What ``make data`` prints: the table, the columns, the baselines, what to commit."""
    suite = {
        "new": "profiled from the file: review it, it is the gate",
        "kept": "already there, kept: the table passes it (REPROFILE=1 profiles it again)",
        "reprofiled": f"profiled again, replacing the one there: `git diff {result.suite}` "
        "shows what changed; review it, it is the gate",
    }[result.suite_was]
    lines = [
        (
            f"make data: {result.source} ({result.rows} rows), target {result.target!r}: "
            f"{len(result.classes)} classes {result.classes}"
        ),
        f"  suite     {result.suite} ({suite})",
    ]
    lines += [
        f"  params    {key}: {before!r} -> {after!r}"
        for key, (before, after) in result.changed.items()
    ]
    lines.append(
        f"  features  {len(result.used)} column(s) fed to the model: " + ", ".join(result.used)
    )
    lines += [
        f"  dates     {name}: format {fmt or 'ISO 8601'}, "
        + ("dropped" if name in result.dropped else "calendar features")
        for name, fmt in result.datetimes.items()
    ]
    lines += [f"  dropped   {name}: {why}" for name, why in result.dropped.items()]
    split = ", ".join(f"{name} {n}" for name, n in result.split_rows.items())
    lines.append(f"  baselines on the features stage's seeded test split ({split} rows):")
    for name, metrics in result.baselines.items():
        lines.append(
            f"    {name:<10}"
            + "  ".join(
                f"{metric} {metrics[metric]:.3f}" for metric in SHOWN_METRICS if metric in metrics
            )
        )
    lines.append(
        "  the model gate (register) compares the network with these baselines: see "
        "README, Use your own data"
    )
    if result.dvc_note:
        lines.append(f"  note      {result.dvc_note}")
    paths = " ".join(shlex.quote(path) for path in result.to_commit)
    message = shlex.quote(f"Train on {Path(result.source).name} (target {result.target})")
    lines += ["Next:", f"  git add {paths}", f"  git commit -m {message} -- {paths}", "  make run"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.own_data SRC --target COLUMN``: exit 1 with one clear line on error."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.own_data",
        description="Bring your own table: copy SRC under ingest.data_root, profile its suite, "
        "point params.yaml at both, print the baselines and the dropped columns. "
        "Then `make run`.",
    )
    parser.add_argument("src", help="a CSV or Parquet file")
    parser.add_argument("--target", required=True, help="the label column")
    parser.add_argument("--repo", default=".", help="project checkout holding params.yaml")
    parser.add_argument(
        "--format",
        choices=sorted(set(FORMATS.values())),
        default=None,
        help="the file's format (default: from its suffix)",
    )
    parser.add_argument(
        "--delimiter",
        default=",",
        type=lambda v: "\t" if v == "\\t" else v,
        help="a CSV's field separator, written to ingest.delimiter (default ,)",
    )
    parser.add_argument(
        "--reprofile",
        action="store_true",
        help="profile suites/<name>.json again even if it exists (default: keep)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        result = bring_table(
            args.src, args.target, args.repo, args.format, args.delimiter, args.reprofile
        )
    except PipelineError as exc:
        hint = (
            " (make data: DELIM=';' or python -m flows.own_data --delimiter ';')"
            if getattr(exc, "rule", None) == "delimiter"
            else ""
        )
        print(
            f"make data failed: {exc}{hint}\n(params.yaml, suites/ and the data root "
            "are as they were)",
            file=sys.stderr,
        )
        return 1
    print(render_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
