"""One pipeline run per workspace at a time; stage processes die with their parent.

Owner: issue 10 item 5 (and item 8: temp folders a killed run left).
"""

from __future__ import annotations


def die_with_parent() -> None:
    """Have the kernel stop this process when its parent dies (Linux), so none runs orphaned."""


def remove_stale_temp_dirs(stage: str, repo: str = ".") -> None:
    """Remove the temp folders a killed run of ``stage`` left (``data/.validated.*``...)."""
