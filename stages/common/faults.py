"""Faults outside the pipeline's control (a store down or read-only, a full disk) as one line.

Owner: issue 10 item 7. ``describe_fault(exc)`` returns one line naming the store or path and
the fix, or None for an exception it does not know (which then propagates as a traceback).
"""

from __future__ import annotations


def describe_fault(exc: BaseException) -> str | None:
    """One line naming the store or path and the fix, or None when ``exc`` is not a known fault."""
    return None
