"""DVC's hashes of the actual bytes, and what dvc.lock records (no DVC import: stages start fast).

* md5 of a file (``hash: md5``), and of a folder: md5 of the sorted ``[{"md5", "relpath"}]``
  JSON of its files (``.dvcignore``'d ones left out) + ``.dir``, as dvc_data computes it;
* where DVC 3 keeps an object in its cache, and the ``{relpath: md5}`` of a ``.dir`` object;
* ``dvc.lock``: its outputs, each stage's dependencies, the graph of stages between them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from stages.common.errors import PipelineError

LOCK_FILE, DVC_YAML, DVCIGNORE = "dvc.lock", "dvc.yaml", ".dvcignore"
CACHE_DIR = Path(".dvc", "cache", "files", "md5")  # DVC 3 cache layout: <2 hex>/<30 hex>
STAGE_ENV, ROOT_ENV = "DVC_STAGE", "DVC_ROOT"  # set by DVC for every stage command it runs
_CHUNK = 1 << 20
_THREADS = max(1, min(4, os.cpu_count() or 1))


def load_yaml(text: str) -> Any:
    # libyaml when present: dvc.lock is read on every stage start
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


class IntegrityError(PipelineError):
    """A file differs from the hash dvc.lock records for it, or params changed mid-run."""


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


def ignore_patterns(root: Path) -> list[str]:
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
        found += [
            "/".join((*rel, name))
            for name in filenames
            if not _ignored((*rel, name), False, patterns)
        ]
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
    return dict(zip(names, hash_files(folder / name for name in names), strict=False))


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
        lock = load_yaml(file.read_text(encoding="utf-8")) or {}
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


def stage_name(addressing: str) -> str:
    # DVC_STAGE is the stage's address: `train`, or `dvc.yaml:train` from another folder.
    return addressing.rsplit(":", 1)[-1]


def stage_deps(root: Path, stage: str, lock: dict[str, Any]) -> list[str]:
    """The dependency paths of ``stage``: dvc.yaml's (``${...}`` ones left out) and dvc.lock's."""
    paths: list[str] = []
    try:
        spec = load_yaml((root / DVC_YAML).read_text(encoding="utf-8")) or {}
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
        spec = load_yaml((root / DVC_YAML).read_text(encoding="utf-8")) or {}
        names = list(spec.get("stages") or {})
    except (OSError, yaml.YAMLError, AttributeError):
        names = []
    names += [name for name in (lock.get("stages") or {}) if name not in names]
    graph = {}
    for name in names:
        deps = stage_deps(root, name, lock)
        graph[name] = {
            producer
            for out, (producer, _) in outputs.items()
            if producer != name
            and any(
                dep == out or dep.startswith(f"{out}/") or out.startswith(f"{dep}/") for dep in deps
            )
        }
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


def running_stage() -> str | None:
    """The stage DVC is running in this process (``DVC_STAGE``), None outside ``dvc repro``."""
    running = os.environ.get(STAGE_ENV)
    return stage_name(running) if running else None


def dvc_root(repo: str | Path) -> Path:
    return Path(os.environ.get(ROOT_ENV) or repo)
