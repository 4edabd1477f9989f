"""The tuned values back into ``params.yaml``: comments, order and layout kept.

A ruamel.yaml round trip changes only the lines of the values that changed. Floats are written
so that PyYAML (YAML 1.1, what ``load_params`` uses) reads them back as floats (``1.0e-05``, not
``1e-05``), lists in flow style (``[128, 64]``) as ``params.yaml`` writes them, ``None`` as
``null``. The result is checked like any params load before it atomically replaces the file.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from stages.common.config import parse_params
from stages.common.errors import PipelineError
from stages.common.io import write_text


class ParamsChanged(PipelineError):
    """``params.yaml`` was edited while tuning ran: nothing written (the values are named)."""


def round_trip_yaml() -> Any:
    """A ruamel.yaml loader/dumper that keeps comments, order and flow style."""
    from ruamel.yaml import YAML

    rt = YAML()  # round trip: comments, order and flow style kept
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long commented line
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    rt.representer.add_representer(float, _represent_float)
    return rt


def _represent_float(representer: Any, value: float) -> Any:
    # YAML 1.1 (PyYAML, which loads params.yaml) reads 1e-05 as a string: write 1.0e-05
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if exponent:
        mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
        exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
        text = f"{mantissa}e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _node_value(value: Any) -> Any:
    if isinstance(value, list):
        from ruamel.yaml.comments import CommentedSeq

        seq = CommentedSeq(value)
        seq.fa.set_flow_style()  # [128, 64], as params.yaml writes lists
        return seq
    return value


def write_back(
    params_file: str | Path, family: str, values: Mapping[str, Any], read_text: str | None = None
) -> dict[str, tuple[Any, Any]]:
    """Write ``values`` (dotted train keys) and ``train.model: family`` into ``params_file``.

    Comments, order and layout are kept (ruamel round trip); the file is checked like any
    params load before it is replaced, atomically. Returns ``{key: (old, new)}`` for what
    changed.

    Raises:
        ParamsChanged: the file is not what ``read_text`` says it was when tuning started
            (edited meanwhile: nothing written).
        PipelineError: the result would not load.
    """
    path = Path(params_file)
    text = path.read_text(encoding="utf-8")
    if read_text is not None and text != read_text:
        raise ParamsChanged(
            f"{path} changed while tuning ran: not overwritten; set these train values by "
            f"hand: model: {family}, " + ", ".join(f"{k}: {v}" for k, v in values.items())
        )
    from ruamel.yaml.comments import CommentedMap

    rt = round_trip_yaml()
    doc = rt.load(text)
    train = doc.setdefault("train", CommentedMap())
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in {"model": family, **values}.items():
        node = train
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # a sub-section params.yaml leaves to its defaults
                node[part] = CommentedMap()
            node = node[part]
        old = node.get(leaf)
        if (list(old) if isinstance(old, list) else old) != value:
            changes[key] = (list(old) if isinstance(old, list) else old, value)
            node[leaf] = _node_value(value)
    if not changes:
        return changes
    out = io.StringIO()
    rt.dump(doc, out)
    parse_params(yaml.safe_load(out.getvalue()), source=str(path))  # never write a bad file
    write_text(path, out.getvalue())
    return changes
