"""What a stage reads is what dvc.lock says: params read once, inputs checked by hash.

Owner: issue 10 items 3 and 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ParamsSnapshot:
    """The params file's bytes as the stage read them at start."""

    path: Path
    data: bytes | None

    @classmethod
    def take(cls, path: str | Path) -> ParamsSnapshot:
        path = Path(path)
        return cls(path, path.read_bytes() if path.is_file() else None)

    def check_unchanged(self, stage: str) -> None:
        """Raise PipelineError when the params file changed while ``stage`` ran."""


def verify_stage_inputs(stage: str, repo: str | Path = ".") -> None:
    """Check every input ``stage`` reads against the hash dvc.lock holds for it."""
