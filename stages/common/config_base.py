"""The base of the typed config: a strict model and reading/describing errors.

Split out of :mod:`stages.common.config` so that the section modules can share it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from stages.common.errors import ConfigError


class StrictModel(BaseModel):
    """Frozen, and an unknown key is an error (a typo in a YAML file never passes silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def read_yaml(path: str | Path, what: str, hint: str = "") -> Any:
    """Read a YAML config file; a missing or malformed file raises ConfigError naming it."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {what} not found{hint}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """``section.field: message`` for each problem pydantic found."""
    return [
        f"{'.'.join([p for p in [prefix] if p] + [str(part) for part in err['loc']]) or '(top)'}"
        f": {_message(err)}"
        for err in exc.errors()
    ]


def _message(err: Any) -> str:
    # our validators' ValueError text as written, without pydantic's "Value error, " in front
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return err["msg"]
