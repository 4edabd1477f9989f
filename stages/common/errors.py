"""Errors the pipeline raises on purpose: each one names what is wrong and where.

The base classes live in ``model.errors`` (the served model raises them too); this module
is where pipeline code imports them from.
"""

from __future__ import annotations

from model.errors import ConfigError, DataError, PipelineError

__all__ = ["ConfigError", "DataError", "GateError", "PipelineError"]


class GateError(PipelineError):
    """A quality gate (data validation or model thresholds) refused to let the run go on."""
