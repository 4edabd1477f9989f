"""Load a logged pyfunc with the code it shipped, in a process that runs other code under the
same package names.

A registered model ships its code (``code/``: the ``model`` package today, ``stages`` for
versions registered before the ``model`` package existed) and MLflow puts that folder first on
``sys.path`` when it loads the model. Python resolves an import from ``sys.modules`` first,
though: in the register stage, which has imported this checkout's ``stages`` and ``model``, the
champion's own modules would never be found (``No module named 'stages.common.servable'`` for an
older version) or, worse, this checkout's code would run in its place.

:func:`load_pyfunc` hides the process's modules of those package names while MLflow loads the
model, then puts them back; the model's modules that shadow nothing stay importable, so a lazy
import inside the model's ``predict`` still finds its own code.

Hiding is not thread-safe (request threads import ``model.*`` lazily during a hot swap), so
serving passes ``keep=SERVING_KEEP``: it hides only the legacy ``stages``, runs ``model`` as is.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CODE_DIR = "code"  # where MLflow stores a model's code_paths
# What a serving process never hides: its request threads import these lazily while it loads.
SERVING_KEEP = ("model",)


def shipped_packages(model_dir: str | Path) -> set[str]:
    """Top-level module names in the model's ``code/`` folder (empty when it ships none)."""
    code = Path(model_dir) / CODE_DIR
    if not code.is_dir():
        return set()
    return {p.stem for p in code.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}


def _top(name: str) -> str:
    return name.partition(".")[0]


@contextmanager
def own_code(model_dir: str | Path, keep: Collection[str] = ()) -> Iterator[None]:
    """While inside, imports of the model's package names resolve to the model's ``code/``.

    ``keep``: top-level names never hidden (this process's own modules serve the model).
    """
    names = shipped_packages(model_dir) - set(keep)
    hidden = {key: sys.modules.pop(key) for key in list(sys.modules) if _top(key) in names}
    path_before = list(sys.path)
    try:
        yield
    finally:
        loaded = {key: sys.modules.pop(key) for key in list(sys.modules) if _top(key) in names}
        sys.modules.update(hidden)
        # The model's own modules stay where they shadow nothing of this process's.
        sys.modules.update({key: mod for key, mod in loaded.items() if key not in hidden})
        sys.path[:] = path_before


def load_pyfunc(model_dir: str | Path, keep: Collection[str] = ()) -> Any:
    """``mlflow.pyfunc.load_model`` of a local model folder, run with the code it shipped
    (except the packages in ``keep``, see :func:`own_code`)."""
    import mlflow.pyfunc

    with own_code(model_dir, keep):
        return mlflow.pyfunc.load_model(str(model_dir))
