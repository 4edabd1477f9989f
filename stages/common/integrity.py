"""What a stage reads is what dvc.lock says: params read once, inputs checked by hash.

Owner: issue 10 items 3 and 4.

* ``ParamsSnapshot`` (``stages.common.params_snapshot``, re-exported here): params read once;
  a stage refuses to finish when a param it declares changed under it.
* DVC's hashing and ``dvc.lock`` reading live in ``stages.common.dvc_hashes``.
* ``verify_stage_inputs``: under ``dvc repro`` (DVC sets ``DVC_STAGE``), every dependency of the
  stage that another stage writes is hashed (its actual bytes, DVC's algorithm: md5 of a file,
  md5 of the sorted ``[{"md5", "relpath"}]`` JSON of a folder + ``.dir``) and compared with the
  hash that stage's ``outs`` entry of ``dvc.lock`` holds. DVC itself trusts its state database
  and the names of its cache objects, so a flipped byte in a cache object reaches the workspace
  on ``dvc checkout`` / ``dvc pull`` unnoticed; this check stops the next stage that reads it.
* ``python -m flows.verify [--repair]`` (``make verify`` / ``make repair``): checks
  every output ``dvc.lock`` records, in the workspace and in the DVC cache; ``--repair``
  rewrites a corrupt cache object from a good workspace copy or removes it, restores a corrupt
  (or missing) output file from its good cache object, and removes a corrupt output file that
  has none, so that the next ``make run`` (or ``make repro``, ``dvc pull``) re-creates it.
* ``check_before_push``: ``dvc push`` (the flow, ``make repro``) runs only when the cache
  objects of every output ``dvc.lock`` records match their names: a corrupt object is never
  uploaded to the remote.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.dvc_hashes import (
    IntegrityError,
    cache_path,
    dir_hash,
    dvc_root,
    hash_files,
    hash_folder,
    hash_output,
    ignore_patterns,
    list_files,
    lock_outputs,
    md5_file,
    read_dir_object,
    read_lock,
    running_stage,
    stage_deps,
    stage_graph,
    upstream_of,
)
from stages.common.params_snapshot import ParamsSnapshot, snapshot_for

# Re-exported: callers (tracking, train, register) import them from here.
__all__ = [
    "IntegrityError",
    "ParamsSnapshot",
    "Problem",
    "check_before_push",
    "check_cache",
    "check_repo",
    "lock_outputs",
    "produced_outputs",
    "read_lock",
    "repair",
    "running_stage",
    "snapshot_for",
    "stage_graph",
    "upstream_of",
    "verify_stage_inputs",
]

logger = logging.getLogger(__name__)

# `make run` / `make repro`, not a bare `dvc repro`: those take the workspace's run lock.
RERUN = "`make run` or `make repro`"
REPAIR_HINT = (
    "`make repair` (python -m flows.verify --repair: rewrites or removes "
    "corrupt DVC cache objects, restores corrupt output files from good cache "
    f"objects and removes the others), then {RERUN} (re-creates what was removed; "
    "`dvc pull` first to fetch good copies from the remote)"
)


def produced_outputs(model_dir: str | Path, repo: str | Path = ".") -> dict[str, str]:
    """``{path: hash}`` of the outputs a model's runs produced, hashed from disk.

    The stage that wrote ``model_dir`` (train) and the stages between it and the running one
    (``DVC_STAGE``: register; evaluate in between). Each hash must be the one ``dvc.lock``
    records (DVC locked those stages before this one ran). {} outside ``dvc repro`` (a stage
    run by hand: dvc.lock is not about its inputs) or when ``model_dir`` is not an output that
    ``repo/dvc.lock`` records.

    Raises:
        IntegrityError: an output on disk differs from (or is missing for) its dvc.lock entry.
    """
    running = running_stage()
    if running is None:
        return {}
    root = dvc_root(repo)
    lock = read_lock(root)
    outputs = lock_outputs(lock)
    try:
        model = Path(os.path.abspath(model_dir)).relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return {}
    if model not in outputs:
        return {}
    producer = outputs[model][0]
    graph = stage_graph(root, lock)
    stages = {producer} | {
        name for name in upstream_of(graph, running) if producer in upstream_of(graph, name)
    }
    patterns = ignore_patterns(root)
    hashes, problems = {}, []
    for path, (stage, out) in sorted(outputs.items()):
        if stage not in stages:
            continue
        actual = hash_output(root, path, patterns)
        if actual != out["md5"]:
            problems.append(Problem(path, str(out["md5"]), actual, stage))
        hashes[path] = actual
    if problems:
        raise IntegrityError(
            "the model's outputs on disk are not the ones dvc.lock records, so its version "
            "cannot be tagged with their hashes: "
            + "; ".join(p.describe() for p in problems)
            + f". Re-run the pipeline ({RERUN}); if a file is corrupt: {REPAIR_HINT}"
        )
    return hashes


@dataclass
class Problem:
    """One file whose bytes are not the ones dvc.lock (or a cache object's name) says."""

    path: str  # workspace path, or the cache object's path
    expected: str
    actual: str | None  # None: missing
    stage: str  # the stage whose output it is
    cache: bool = False  # a DVC cache object (not the workspace copy)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        found = "is missing" if self.actual is None else f"has md5 {self.actual}"
        what = "DVC cache object" if self.cache else "output"
        note = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (
            f"{self.path} ({what} of stage {self.stage}) {found}, dvc.lock expects "
            f"{self.expected}{note}"
        )


def _expected_files(root: Path, out_path: str, out: dict[str, Any]) -> dict[str, str] | None:
    """``{workspace path: md5}`` the lock expects under ``out_path``; None when not known
    file by file (a folder whose ``.dir`` object is not in the cache, or is corrupt)."""
    md5 = str(out["md5"])
    if not md5.endswith(".dir"):
        return {out_path: md5}
    entries = read_dir_object(root, md5)
    return None if entries is None else {f"{out_path}/{rel}": m for rel, m in entries.items()}


def check_output(
    root: Path,
    out_path: str,
    stage: str,
    out: dict[str, Any],
    only: str | None = None,
    patterns: Sequence[str] = (),
) -> list[Problem]:
    """Problems of one dvc.lock output in the workspace (``only``: just that file inside it)."""
    md5 = str(out["md5"])
    expected = _expected_files(root, out_path, out)
    if expected is None:  # a folder we cannot check file by file: its whole hash
        target = root / out_path
        if only is not None and only != out_path:
            return []  # (its .dir object is missing: a file inside cannot be told)
        actual = dir_hash(hash_folder(target, patterns)) if target.is_dir() else None
        if actual == md5:
            return []
        problem = Problem(out_path, md5, actual, stage)
        problem.notes.append(_cache_state(root, md5))
        return [problem]
    if only is not None and only != out_path:
        expected = {
            path: m for path, m in expected.items() if path == only or path.startswith(f"{only}/")
        }
    present = [path for path in expected if (root / path).is_file()]
    actual = dict(zip(present, hash_files(root / path for path in present), strict=False))
    problems = []
    for path, want in expected.items():
        if actual.get(path) != want:
            problem = Problem(path, want, actual.get(path), stage)
            problem.notes.append(_cache_state(root, want))
            problems.append(problem)
    if md5.endswith(".dir") and only in (None, out_path) and (root / out_path).is_dir():
        extra = sorted(
            set(list_files(root / out_path, patterns))
            - {path.removeprefix(f"{out_path}/") for path in expected}
        )
        problems += [
            Problem(f"{out_path}/{rel}", "(not in the folder)", "present", stage) for rel in extra
        ]
    return problems


def _cache_state(root: Path, md5: str) -> str:
    obj = cache_path(root, md5)
    rel = obj.relative_to(root).as_posix()
    if not obj.is_file():
        return f"cache object {rel} missing"
    actual = md5_file(obj)
    return (
        f"cache object {rel} is good"
        if actual == md5.removesuffix(".dir")
        else f"cache object {rel} is corrupt too (md5 {actual})"
    )


def verify_stage_inputs(stage: str, repo: str | Path = ".") -> None:
    """Check every input ``stage`` reads against the hash dvc.lock holds for it.

    Runs under DVC only (``dvc repro``, ``make run``, ``make repro``, ``flows.reproduce``: DVC
    sets ``DVC_STAGE`` to the stage it runs); a stage started by hand, or in a folder with no
    ``dvc.lock``, checks nothing. The inputs checked are the stage's dependencies that another
    stage writes, against that stage's ``outs`` entry (for a file inside an output folder, its
    entry in the folder's ``.dir`` object). Other dependencies (code, the suite, the source)
    legitimately differ from the lock when the stage re-runs because they changed.

    Raises:
        IntegrityError: a file differs; names it, the expected and actual md5, and the repair.
    """
    if running_stage() != stage or os.environ.get("LOCAL_RANK"):
        return  # not run by DVC (or a torchrun worker: its launcher checked)
    root = dvc_root(repo)
    lock = read_lock(root)
    if not lock:
        return
    outputs = lock_outputs(lock)
    patterns = ignore_patterns(root)
    problems: list[Problem] = []
    for dep in stage_deps(root, stage, lock):
        for out_path, (producer, out) in outputs.items():
            if producer == stage:
                continue
            if dep == out_path or out_path.startswith(f"{dep}/"):
                problems += check_output(root, out_path, producer, out, patterns=patterns)
            elif dep.startswith(f"{out_path}/"):
                problems += check_output(root, out_path, producer, out, only=dep, patterns=patterns)
    if problems:
        raise IntegrityError(
            f"stage {stage} refuses its input: "
            + "; ".join(p.describe() for p in problems)
            + f". The data differs from what DVC recorded (a corrupt file or DVC cache object). "
            f"Repair: {REPAIR_HINT}; it re-runs {stage} (a plain `dvc repro {stage}` does too, "
            "without the run lock)"
        )


# --- whole-repo check and repair ----------------------------------------------------------


def check_cache(root: Path, out_path: str, stage: str, out: dict[str, Any]) -> list[Problem]:
    """Cache objects of one output whose bytes do not match their name (missing ones: fine)."""
    md5 = str(out["md5"])
    names = [md5]
    obj = cache_path(root, md5)
    if md5.endswith(".dir") and obj.is_file():
        entries = read_dir_object(root, md5)
        if entries is not None:
            names += sorted(set(entries.values()))
    present = [name for name in names if cache_path(root, name).is_file()]
    actual = dict(
        zip(present, hash_files(cache_path(root, name) for name in present), strict=False)
    )
    return [
        Problem(
            cache_path(root, name).relative_to(root).as_posix(),
            name.removesuffix(".dir"),
            actual[name],
            stage,
            cache=True,
            notes=[f"an object of {out_path}"],
        )
        for name in present
        if actual[name] != name.removesuffix(".dir")
    ]


def check_repo(
    repo: str | Path = ".", stages: Sequence[str] | None = None, cache: bool = True
) -> list[Problem]:
    """Every output of ``stages`` (all: None) that dvc.lock records, in the workspace and in
    the DVC cache (``cache``): the files whose bytes are not the recorded ones."""
    root = Path(repo)
    lock = read_lock(root)
    patterns = ignore_patterns(root)
    problems: list[Problem] = []
    for out_path, (stage, out) in lock_outputs(lock).items():
        if stages is not None and stage not in stages:
            continue
        if cache:  # first: a corrupt .dir object must not be trusted for the workspace check
            problems += check_cache(root, out_path, stage, out)
        if (root / out_path).exists():
            problems += check_output(root, out_path, stage, out, patterns=patterns)
        elif out.get("cache", True) is not False:
            logger.info("%s (output of %s) is not in the workspace: not checked", out_path, stage)
    return problems


def repair(repo: str | Path, problems: Sequence[Problem]) -> list[str]:
    """Fix ``problems`` (from ``check_repo``); returns one line per action taken.

    A corrupt cache object is rewritten from a workspace file with exactly its bytes, else
    removed. A corrupt (or missing) output file whose cache object is good is restored from it
    (a copy, written atomically); one without a good object is removed. ``make run`` (or ``dvc
    pull``) re-creates what was removed: DVC sees the output missing, and no longer finds the
    bad object by its name. Lines of what still needs a re-run start with ``removed`` or
    ``left``.
    """
    root = Path(repo)
    good = _good_workspace_copies(root, [p.expected for p in problems if p.cache])
    actions = []
    for problem in problems:
        target = root / problem.path
        if problem.cache:
            source = good.get(problem.expected)
            if target.is_file():
                target.chmod(0o644)
                target.unlink()
            if source is not None:
                _copy_atomically(source, target, 0o444)  # read-only, as DVC leaves its objects
                actions.append(
                    f"rewrote corrupt cache object {problem.path} from {source.relative_to(root)}"
                )
            else:
                actions.append(f"removed corrupt cache object {problem.path}")
            continue
        obj = _good_cache_object(root, problem.expected)
        if obj is not None and not target.is_dir():
            mode = target.stat().st_mode & 0o777 if target.is_file() else 0o644
            _copy_atomically(obj, target, mode | 0o200)  # DVC's objects are read-only
            state = "missing" if problem.actual is None else "corrupt"
            actions.append(
                f"restored {state} {problem.path} from its good DVC cache object "
                f"{obj.relative_to(root).as_posix()} (md5 {problem.expected})"
            )
        elif target.is_file():
            target.unlink()
            actions.append(f"removed {problem.path} (not the bytes dvc.lock records)")
        elif target.is_dir():
            actions.append(
                f"left folder {problem.path}: re-create it with {RERUN} (re-runs {problem.stage})"
            )
    return actions


def _good_cache_object(root: Path, md5: str) -> Path | None:
    """The DVC cache object named ``md5`` when its bytes match the name (a file's, not a
    folder's ``.dir``); None when it is missing, corrupt, or ``md5`` is not a file hash."""
    if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
        return None  # a folder's .dir hash, or "(not in the folder)"
    obj = cache_path(root, md5)
    return obj if obj.is_file() and md5_file(obj) == md5 else None


def _copy_atomically(source: Path, target: Path, mode: int) -> None:
    """``target`` gets exactly ``source``'s bytes, or is left as it was (a temp file beside it,
    flushed, then renamed over it)."""
    tmp = target.with_name(f".{target.name}.repair")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        tmp.chmod(mode)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def check_before_push(repo: str | Path = ".") -> None:
    """Refuse a ``dvc push`` that would upload a corrupt cache object to the remote.

    DVC uploads an object by its name without reading it, and a corrupt object survives
    ``dvc repro --force`` (DVC does not rewrite an object whose name exists), so the cache
    objects of every output ``dvc.lock`` records (``push: false`` and ``cache: false`` ones
    left out) are hashed first: one read of the data. Missing objects are DVC's to report.

    Raises:
        IntegrityError: a cache object's bytes do not match its name; names each, and the repair.
    """
    root = Path(repo)
    problems: list[Problem] = []
    for out_path, (stage, out) in lock_outputs(read_lock(root)).items():
        if out.get("cache", True) is not False and out.get("push", True) is not False:
            problems += check_cache(root, out_path, stage, out)
    if problems:
        raise IntegrityError(
            "dvc push refused, nothing uploaded: "
            + "; ".join(p.describe() for p in problems)
            + f". The DVC remote would get the corrupt bytes under the good name. Repair: "
            f"{REPAIR_HINT}, then push again"
        )


def _good_workspace_copies(root: Path, wanted: Sequence[str]) -> dict[str, Path]:
    """``{md5: a workspace output file with exactly those bytes}`` for the ``wanted`` md5s."""
    wanted_set, found = set(wanted), {}
    if not wanted_set:
        return found
    lock = read_lock(root)
    for out_path, (_stage, out) in lock_outputs(lock).items():
        expected = _expected_files(root, out_path, out) or {}
        for path, md5 in expected.items():
            if (
                md5 in wanted_set
                and md5 not in found
                and (root / path).is_file()
                and md5_file(root / path) == md5
            ):
                found[md5] = root / path
    return found
