"""Params read once: the params file's bytes as a stage read them at its start.

The stage parses, logs and (through DVC) locks those bytes; ``check_unchanged`` refuses to
finish when the file changed under the stage in a value the stage declares in ``dvc.yaml``,
so that DVC never writes a ``dvc.lock`` whose params differ from the ones the outputs were
made with.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stages.common.dvc_hashes import DVC_YAML, ROOT_ENV, IntegrityError, load_yaml, stage_name
from stages.common.errors import ConfigError

if TYPE_CHECKING:
    from stages.common.config import Params

logger = logging.getLogger(__name__)

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
            logger.warning(
                "%s changed while stage %s ran, but not in the params it depends on "
                "(dvc.yaml): its outputs stand",
                self.path,
                stage,
            )
            return
        what = f" ({', '.join(changed)})" if changed else ""
        raise IntegrityError(
            f"{self.path} changed while stage {stage} ran{what}: the stage used and logged the "
            f"params as they were at its start, but dvc.lock would record the new ones, so it "
            f"refuses to finish (its outputs are not recorded). Re-run it with the file as it "
            f"is now: `dvc repro {stage}` (or `make run`)"
        )


def snapshot_for(path: str | Path) -> ParamsSnapshot:
    """The snapshot the running stage took of ``path`` (run_main), else a new one."""
    if _current is not None and _same_file(_current.path, Path(path)):
        return _current
    return ParamsSnapshot.take(path)


def _same_file(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _changed_declared_params(
    snapshot: ParamsSnapshot, now: bytes | None, stage: str
) -> list[str] | None:
    """The declared params of ``stage`` whose value changed; None when that cannot be told."""
    root = Path(os.environ.get(ROOT_ENV) or ".")
    if (
        now is None
        or snapshot.data is None
        or snapshot.path.name != "params.yaml"
        or not _same_file(snapshot.path.parent, root)
    ):
        return None
    try:
        spec = load_yaml((root / DVC_YAML).read_text(encoding="utf-8")) or {}
        declared = ((spec.get("stages") or {}).get(stage_name(stage)) or {}).get("params")
        before, after = yaml.safe_load(snapshot.data), yaml.safe_load(now)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, AttributeError):
        return None
    if (
        not isinstance(declared, list)
        or not isinstance(before, dict)
        or not isinstance(after, dict)
    ):
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
    return [key for key in keys if _lookup(before, key, missing) != _lookup(after, key, missing)]


def _lookup(tree: Any, dotted: str, default: Any) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def reset() -> None:
    """Forget the running stage's snapshot (run_main, when the stage is done)."""
    global _current
    _current = None
