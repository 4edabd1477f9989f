"""What a stage reads is what dvc.lock says: params read once, inputs checked by hash.

Owner: issue 10 items 3 and 4.

* ``ParamsSnapshot``: the params file's bytes as a stage read them at start. The stage parses,
  logs and (through DVC) locks those bytes; ``check_unchanged`` refuses to finish when the file
  changed under the stage in a value the stage declares in ``dvc.yaml``, so that DVC never
  writes a ``dvc.lock`` whose params differ from the ones the outputs were made with.
* ``verify_stage_inputs``: under ``dvc repro`` (DVC sets ``DVC_STAGE``), every dependency of the
  stage that another stage writes is hashed (its actual bytes, DVC's algorithm: md5 of a file,
  md5 of the sorted ``[{"md5", "relpath"}]`` JSON of a folder + ``.dir``) and compared with the
  hash that stage's ``outs`` entry of ``dvc.lock`` holds. DVC itself trusts its state database
  and the names of its cache objects, so a flipped byte in a cache object reaches the workspace
  on ``dvc checkout`` / ``dvc pull`` unnoticed; this check stops the next stage that reads it.
* ``python -m stages.common.integrity [--repair]`` (``make verify`` / ``make repair``): checks
  every output ``dvc.lock`` records, in the workspace and in the DVC cache; ``--repair``
  rewrites a corrupt cache object from a good workspace copy or removes it, and removes corrupt
  output files, so that the next ``dvc repro`` (or ``dvc pull``) re-creates them.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stages.common.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from stages.common.config import Params

logger = logging.getLogger(__name__)

LOCK_FILE, DVC_YAML, DVCIGNORE = "dvc.lock", "dvc.yaml", ".dvcignore"
CACHE_DIR = Path(".dvc", "cache", "files", "md5")  # DVC 3 cache layout: <2 hex>/<30 hex>
STAGE_ENV, ROOT_ENV = "DVC_STAGE", "DVC_ROOT"  # set by DVC for every stage command it runs
REPAIR_HINT = ("`make repair` (python -m stages.common.integrity --repair: rewrites or removes "
               "corrupt DVC cache objects and removes corrupt output files), then `dvc repro` "
               "(re-creates them; `dvc pull` first to fetch good copies from the remote)")
_CHUNK = 1 << 20
_THREADS = max(1, min(4, os.cpu_count() or 1))


def _yaml(text: str) -> Any:
    # libyaml when present: dvc.lock is read on every stage start
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


class IntegrityError(PipelineError):
    """A file differs from the hash dvc.lock records for it, or params changed mid-run."""


# --- params read once ---------------------------------------------------------------------

_current: ParamsSnapshot | None = None  # the snapshot the running stage took (run_main)


@dataclass(frozen=True)
class ParamsSnapshot:
    """The params file's bytes as the stage read them at start."""

    path: Path
    data: bytes | None

    @classmethod
    def take(cls, path: str | Path) -> ParamsSnapshot:
        global _current
        path = Path(path)
        snapshot = cls(path, path.read_bytes() if path.is_file() else None)
        _current = snapshot
        return snapshot

    @property
    def text(self) -> str | None:
        """The snapshot as text (what a stage logs as its params), None when there was none."""
        return None if self.data is None else self.data.decode("utf-8")

    def load(self) -> Params:
        """The params parsed from the snapshot's bytes (as ``config.load_params`` checks them)."""
        from stages.common.config import parse_params

        if self.data is None:
            raise ConfigError(f"{self.path}: params file not found")
        try:
            raw = yaml.safe_load(self.data.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: not valid YAML: {exc}") from exc
        return parse_params(raw or {}, source=str(self.path))

    def check_unchanged(self, stage: str) -> None:
        """Raise IntegrityError when the params file changed while ``stage`` ran.

        A change outside the params ``dvc.yaml`` declares for the stage (e.g. ``serve.port``
        while train runs) is logged and allowed: DVC locks only the declared ones.
        """
        now = self.path.read_bytes() if self.path.is_file() else None
        if now == self.data:
            return
        changed = _changed_declared_params(self, now, stage)
        if changed == []:
            logger.warning("%s changed while stage %s ran, but not in the params it depends on "
                           "(dvc.yaml): its outputs stand", self.path, stage)
            return
        what = f" ({', '.join(changed)})" if changed else ""
        raise IntegrityError(
            f"{self.path} changed while stage {stage} ran{what}: the stage used and logged the "
            f"params as they were at its start, but dvc.lock would record the new ones, so it "
            f"refuses to finish (its outputs are not recorded). Re-run it with the file as it "
            f"is now: `dvc repro {stage}` (or `make run`)")


def snapshot_for(path: str | Path) -> ParamsSnapshot:
    """The snapshot the running stage took of ``path`` (run_main), else a new one."""
    if _current is not None and _same_file(_current.path, Path(path)):
        return _current
    return ParamsSnapshot.take(path)


def _same_file(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _changed_declared_params(snapshot: ParamsSnapshot, now: bytes | None,
                             stage: str) -> list[str] | None:
    """The declared params of ``stage`` whose value changed; None when that cannot be told."""
    root = Path(os.environ.get(ROOT_ENV) or ".")
    if now is None or snapshot.data is None or snapshot.path.name != "params.yaml" \
            or not _same_file(snapshot.path.parent, root):
        return None
    try:
        spec = _yaml((root / DVC_YAML).read_text(encoding="utf-8")) or {}
        declared = ((spec.get("stages") or {}).get(_stage_name(stage)) or {}).get("params")
        before, after = yaml.safe_load(snapshot.data), yaml.safe_load(now)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(declared, list) or not isinstance(before, dict) \
            or not isinstance(after, dict):
        return None
    keys: list[str] = []
    for item in declared:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, dict) and set(item) == {"params.yaml"}:
            keys += [str(key) for key in item["params.yaml"] or []]
        else:
            return None  # another params file, or a form this check does not know
    missing = object()
    return [key for key in keys
            if _lookup(before, key, missing) != _lookup(after, key, missing)]


def _lookup(tree: Any, dotted: str, default: Any) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


# --- DVC's hashes of the actual bytes -----------------------------------------------------


def md5_file(path: str | Path) -> str:
    """The md5 of a file's bytes: what dvc.lock records for a file (``hash: md5``)."""
    digest = hashlib.md5()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _ignore_patterns(root: Path) -> list[str]:
    file = root / DVCIGNORE
    if not file.is_file():
        return []
    lines = file.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(relparts: Sequence[str], is_dir: bool, patterns: Sequence[str]) -> bool:
    # The .dvcignore forms this project uses: `name/` (a folder anywhere), `*.pyc` (a name).
    name = relparts[-1]
    for pattern in patterns:
        if pattern.endswith("/"):
            if is_dir and fnmatch.fnmatchcase(name, pattern[:-1].lstrip("/")):
                return True
        elif "/" not in pattern and fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def list_files(folder: Path, patterns: Sequence[str] = ()) -> list[str]:
    """The files DVC hashes in ``folder`` (posix relpaths, sorted; .dvcignore'd ones out)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder).parts
        dirnames[:] = [d for d in dirnames if not _ignored((*rel, d), True, patterns)]
        found += ["/".join((*rel, name)) for name in filenames
                  if not _ignored((*rel, name), False, patterns)]
    return sorted(found)


def hash_files(paths: Iterable[Path]) -> list[str]:
    """md5 of each file, a few at a time (hashlib releases the GIL on large buffers)."""
    paths = list(paths)
    if len(paths) < 2:
        return [md5_file(path) for path in paths]
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(md5_file, paths))


def dir_object(entries: dict[str, str]) -> bytes:
    """The bytes of DVC's ``.dir`` object for ``{relpath: md5}`` (dvc_data Tree.as_bytes)."""
    listing = [{"md5": md5, "relpath": rel} for rel, md5 in sorted(entries.items())]
    return json.dumps(listing, sort_keys=True).encode("utf-8")


def dir_hash(entries: dict[str, str]) -> str:
    """DVC's hash of a folder with ``{relpath: md5}``: md5 of its ``.dir`` object + ``.dir``."""
    return hashlib.md5(dir_object(entries)).hexdigest() + ".dir"


def hash_folder(folder: Path, patterns: Sequence[str] = ()) -> dict[str, str]:
    """``{relpath: md5}`` of the files DVC would hash in ``folder``."""
    names = list_files(folder, patterns)
    return dict(zip(names, hash_files(folder / name for name in names)))


def cache_path(root: Path, md5: str) -> Path:
    """Where DVC keeps the object ``md5`` (``<hex>`` or ``<hex>.dir``) in ``root``'s cache."""
    return root / CACHE_DIR / md5[:2] / md5[2:]


def read_dir_object(root: Path, md5: str) -> dict[str, str] | None:
    """``{relpath: md5}`` of a cached ``.dir`` object whose bytes match its name, else None."""
    obj = cache_path(root, md5)
    if not obj.is_file() or md5_file(obj) != md5.removesuffix(".dir"):
        return None
    try:
        return {item["relpath"]: item["md5"] for item in json.loads(obj.read_bytes())}
    except (ValueError, KeyError, TypeError):
        return None


# --- dvc.lock -----------------------------------------------------------------------------


def read_lock(root: Path) -> dict[str, Any]:
    """The parsed ``root/dvc.lock`` ({} when there is none or it cannot be read)."""
    file = root / LOCK_FILE
    if not file.is_file():
        return {}
    try:
        lock = _yaml(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return lock if isinstance(lock, dict) else {}


def lock_outputs(lock: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{path: (stage, outs entry)}`` of every output that dvc.lock records with an md5."""
    outputs = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in (entry or {}).get("outs") or []:
            if isinstance(out, dict) and out.get("path") and out.get("md5"):
                outputs[str(out["path"]).strip("/")] = (stage, out)
    return outputs


def _stage_name(addressing: str) -> str:
    # DVC_STAGE is the stage's address: `train`, or `dvc.yaml:train` from another folder.
    return addressing.rsplit(":", 1)[-1]


def stage_deps(root: Path, stage: str, lock: dict[str, Any]) -> list[str]:
    """The dependency paths of ``stage``: dvc.yaml's (``${...}`` ones left out) and dvc.lock's."""
    paths: list[str] = []
    try:
        spec = _yaml((root / DVC_YAML).read_text(encoding="utf-8")) or {}
        deps = ((spec.get("stages") or {}).get(stage) or {}).get("deps") or []
        paths += [str(dep) for dep in deps if isinstance(dep, str) and "${" not in dep]
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    entry = (lock.get("stages") or {}).get(stage) or {}
    paths += [str(dep["path"]) for dep in entry.get("deps") or [] if isinstance(dep, dict)]
    return sorted({path.strip("/") for path in paths})


def stage_graph(root: Path, lock: dict[str, Any]) -> dict[str, set[str]]:
    """``{stage: the stages whose recorded outputs it depends on}`` (dvc.yaml + dvc.lock)."""
    outputs = lock_outputs(lock)
    try:
        spec = _yaml((root / DVC_YAML).read_text(encoding="utf-8")) or {}
        names = list(spec.get("stages") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        names = []
    names += [name for name in (lock.get("stages") or {}) if name not in names]
    graph = {}
    for name in names:
        deps = stage_deps(root, name, lock)
        graph[name] = {producer for out, (producer, _) in outputs.items() if producer != name
                       and any(dep == out or dep.startswith(f"{out}/")
                               or out.startswith(f"{dep}/") for dep in deps)}
    return graph


def upstream_of(graph: dict[str, set[str]], stage: str) -> set[str]:
    """Every stage ``stage`` depends on, directly or not (itself excluded)."""
    seen: set[str] = set()
    todo = list(graph.get(stage, ()))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph.get(name, ())
    return seen


def hash_output(root: Path, out_path: str, patterns: Sequence[str] = ()) -> str | None:
    """DVC's hash of the output as it is on disk (a file's md5, a folder's ``.dir`` hash)."""
    target = root / out_path
    if target.is_file():
        return md5_file(target)
    if target.is_dir():
        return dir_hash(hash_folder(target, patterns))
    return None


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
    root = _dvc_root(repo)
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
    stages = {producer} | {name for name in upstream_of(graph, running)
                           if producer in upstream_of(graph, name)}
    patterns = _ignore_patterns(root)
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
            "cannot be tagged with their hashes: " + "; ".join(p.describe() for p in problems)
            + f". Re-run the pipeline (`dvc repro`); if a file is corrupt: {REPAIR_HINT}")
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
        return (f"{self.path} ({what} of stage {self.stage}) {found}, dvc.lock expects "
                f"{self.expected}{note}")


def _expected_files(root: Path, out_path: str, out: dict[str, Any]) -> dict[str, str] | None:
    """``{workspace path: md5}`` the lock expects under ``out_path``; None when not known
    file by file (a folder whose ``.dir`` object is not in the cache, or is corrupt)."""
    md5 = str(out["md5"])
    if not md5.endswith(".dir"):
        return {out_path: md5}
    entries = read_dir_object(root, md5)
    return None if entries is None else {f"{out_path}/{rel}": m for rel, m in entries.items()}


def check_output(root: Path, out_path: str, stage: str, out: dict[str, Any],
                 only: str | None = None, patterns: Sequence[str] = ()) -> list[Problem]:
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
        expected = {path: m for path, m in expected.items()
                    if path == only or path.startswith(f"{only}/")}
    present = [path for path in expected if (root / path).is_file()]
    actual = dict(zip(present, hash_files(root / path for path in present)))
    problems = []
    for path, want in expected.items():
        if actual.get(path) != want:
            problem = Problem(path, want, actual.get(path), stage)
            problem.notes.append(_cache_state(root, want))
            problems.append(problem)
    if md5.endswith(".dir") and only in (None, out_path) and (root / out_path).is_dir():
        extra = sorted(set(list_files(root / out_path, patterns))
                       - {path.removeprefix(f"{out_path}/") for path in expected})
        problems += [Problem(f"{out_path}/{rel}", "(not in the folder)", "present", stage)
                     for rel in extra]
    return problems


def _cache_state(root: Path, md5: str) -> str:
    obj = cache_path(root, md5)
    rel = obj.relative_to(root).as_posix()
    if not obj.is_file():
        return f"cache object {rel} missing"
    actual = md5_file(obj)
    return (f"cache object {rel} is good" if actual == md5.removesuffix(".dir")
            else f"cache object {rel} is corrupt too (md5 {actual})")


def running_stage() -> str | None:
    """The stage DVC is running in this process (``DVC_STAGE``), None outside ``dvc repro``."""
    running = os.environ.get(STAGE_ENV)
    return _stage_name(running) if running else None


def _dvc_root(repo: str | Path) -> Path:
    return Path(os.environ.get(ROOT_ENV) or repo)


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
    root = _dvc_root(repo)
    lock = read_lock(root)
    if not lock:
        return
    outputs = lock_outputs(lock)
    patterns = _ignore_patterns(root)
    problems: list[Problem] = []
    for dep in stage_deps(root, stage, lock):
        for out_path, (producer, out) in outputs.items():
            if producer == stage:
                continue
            if dep == out_path or out_path.startswith(f"{dep}/"):
                problems += check_output(root, out_path, producer, out, patterns=patterns)
            elif dep.startswith(f"{out_path}/"):
                problems += check_output(root, out_path, producer, out, only=dep,
                                         patterns=patterns)
    if problems:
        raise IntegrityError(
            f"stage {stage} refuses its input: " + "; ".join(p.describe() for p in problems)
            + f". The data differs from what DVC recorded (a corrupt file or DVC cache object). "
            f"Repair: {REPAIR_HINT.replace('`dvc repro`', f'`dvc repro {stage}`')}")


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
    actual = dict(zip(present, hash_files(cache_path(root, name) for name in present)))
    return [Problem(cache_path(root, name).relative_to(root).as_posix(), name.removesuffix(".dir"),
                    actual[name], stage, cache=True, notes=[f"an object of {out_path}"])
            for name in present if actual[name] != name.removesuffix(".dir")]


def check_repo(repo: str | Path = ".", stages: Sequence[str] | None = None,
               cache: bool = True) -> list[Problem]:
    """Every output of ``stages`` (all: None) that dvc.lock records, in the workspace and in
    the DVC cache (``cache``): the files whose bytes are not the recorded ones."""
    root = Path(repo)
    lock = read_lock(root)
    patterns = _ignore_patterns(root)
    problems: list[Problem] = []
    for out_path, (stage, out) in lock_outputs(lock).items():
        if stages is not None and stage not in stages:
            continue
        if cache:  # first: a corrupt .dir object must not be trusted for the workspace check
            problems += check_cache(root, out_path, stage, out)
        if (root / out_path).exists():
            problems += check_output(root, out_path, stage, out, patterns=patterns)
        elif out.get("cache", True) is not False:
            logger.info("%s (output of %s) is not in the workspace: not checked", out_path,
                        stage)
    return problems


def repair(repo: str | Path, problems: Sequence[Problem]) -> list[str]:
    """Fix ``problems`` (from ``check_repo``); returns one line per action taken.

    A corrupt cache object is rewritten from a workspace file with exactly its bytes, else
    removed; a corrupt output file is removed. ``dvc repro`` (or ``dvc pull``) re-creates what
    was removed: DVC sees the output missing, and no longer finds the bad object by its name.
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
                tmp = target.with_name(f".{target.name}.repair")
                tmp.write_bytes(source.read_bytes())
                tmp.chmod(0o444)  # as DVC leaves its objects
                os.replace(tmp, target)
                actions.append(f"rewrote corrupt cache object {problem.path} from "
                               f"{source.relative_to(root)}")
            else:
                actions.append(f"removed corrupt cache object {problem.path}")
        elif target.is_file():
            target.unlink()
            actions.append(f"removed {problem.path} (not the bytes dvc.lock records)")
        elif target.is_dir():
            actions.append(f"left folder {problem.path}: re-create it with `dvc repro "
                           f"{problem.stage}`")
    return actions


def _good_workspace_copies(root: Path, wanted: Sequence[str]) -> dict[str, Path]:
    """``{md5: a workspace output file with exactly those bytes}`` for the ``wanted`` md5s."""
    wanted_set, found = set(wanted), {}
    if not wanted_set:
        return found
    lock = read_lock(root)
    for out_path, (_stage, out) in lock_outputs(lock).items():
        expected = _expected_files(root, out_path, out) or {}
        for path, md5 in expected.items():
            if md5 in wanted_set and md5 not in found and (root / path).is_file() \
                    and md5_file(root / path) == md5:
                found[md5] = root / path
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.common.integrity [--repo DIR] [--repair]``."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.common.integrity",
        description="Check every output dvc.lock records, in the workspace and in the DVC cache, "
                    "against its recorded md5 (the actual bytes). --repair rewrites a corrupt "
                    "cache object from a good workspace copy or removes it, and removes corrupt "
                    "output files; then `dvc repro` re-creates them.")
    parser.add_argument("--repo", default=".", help="the DVC project root")
    parser.add_argument("--repair", action="store_true", help="fix what is found (see above)")
    parser.add_argument("--stage", action="append", default=None,
                        help="check only this stage's outputs (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    root = Path(args.repo)
    if not (root / LOCK_FILE).is_file():
        print(f"{root / LOCK_FILE}: not found; nothing to check", file=sys.stderr)
        return 0
    problems = check_repo(root, args.stage)
    if not problems:
        outputs = [path for path, (stage, _) in lock_outputs(read_lock(root)).items()
                   if args.stage is None or stage in args.stage]
        absent = [path for path in outputs if not (root / path).exists()]
        print(f"{len(outputs) - len(absent)} of the {len(outputs)} outputs dvc.lock records are "
              "in the workspace, each with its recorded md5 (their DVC cache objects too)"
              + (f"; not in the workspace: {', '.join(absent)} (`dvc pull` or `dvc repro` "
                 "restores them)" if absent else ""))
        return 0
    for problem in problems:
        print(f"CORRUPT {problem.describe()}", file=sys.stderr)
    if not args.repair:
        print(f"{len(problems)} file(s) differ from dvc.lock. Repair: {REPAIR_HINT}",
              file=sys.stderr)
        return 1
    for action in repair(root, problems):
        print(action)
    stages = sorted({p.stage for p in problems})
    print(f"now run `dvc repro` (re-runs or restores {', '.join(stages)}); `dvc pull` first if "
          "the DVC remote holds good copies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
