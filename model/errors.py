"""Errors raised on purpose, by the model and the pipeline: each names what is wrong and where.

``stages.common.errors`` re-exports these and adds the pipeline's own (gates).
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: a stage stops with a clear message and a non-zero exit code."""


class ConfigError(PipelineError):
    """An invalid value in ``params.yaml`` (or a schema file)."""


class DataError(PipelineError):
    """Bad input data: names the file, the column and the rule that failed."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        rule: str | None = None,
    ) -> None:
        self.file, self.column, self.rule = file, column, rule
        where = ", ".join(
            f"{key}={value}"
            for key, value in (("file", file), ("column", column), ("rule", rule))
            if value is not None
        )
        super().__init__(f"{message} [{where}]" if where else message)
