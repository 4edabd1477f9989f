"""The compact model's own MLflow run: a child of the parent model's run (train's, which
register resumes), named ``compact``.

Why not the parent's run itself: MLflow logs a logged model's ``model_config`` as run params
and copies the run's params onto each new LoggedModel, so the compact logged there would
either fail to log its own hashes ("Changing param values is not allowed": the parent's
``artifact_sha256/...`` are there) or claim the parent's files and train params. In a child run
its params are its own.

What the child carries, so that ``make lineage`` / ``reproduce`` of the compact version tell
the truth (they read the version's run): the parent run's lineage tags (``git.``, ``dvc.``,
``prefect.``, ``validation.``, ``device``), a copy of its ``lineage/`` artifacts (params,
dvc.lock, inputs: the compact was made in the same pipeline run, from the same inputs), and
the compact's own test metrics as ``test_<metric>`` (what evaluate logs for the parent), from
the compress stage's report. ``mlflow.parentRunId`` names the parent run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from model.metrics import METRIC_NAMES
from stages.common.tracking import LINEAGE_DIR

if TYPE_CHECKING:
    from mlflow import MlflowClient

COPIED_PREFIXES = ("git.", "dvc.", "prefect.", "validation.")  # the parent run's lineage tags
COPIED_KEYS = ("device",)
PARENT_RUN_KEY = "mlflow.parentRunId"  # set by MLflow on a nested run
TEST_METRIC = "test_{}"  # as the evaluate stage logs the parent's test metrics


@contextmanager
def compact_run(client: MlflowClient, run_name: str, metrics: dict[str, Any]) -> Iterator[str]:
    """A child run of the active run, with its lineage (see the module doc), active inside the
    block; yields its id. Ends FINISHED (FAILED when the block raises; the parent stays active).

    Raises:
        RuntimeError: no active run (register logs inside the parent's run).
    """
    import mlflow

    active = mlflow.active_run()
    if active is None:
        raise RuntimeError("compact_run needs the parent model's run active (resume_run)")
    parent = client.get_run(active.info.run_id)
    tags = {
        key: value
        for key, value in parent.data.tags.items()
        if key.startswith(COPIED_PREFIXES) or key in COPIED_KEYS
    }
    with mlflow.start_run(
        run_name=run_name,
        nested=True,
        experiment_id=parent.info.experiment_id,
        tags=tags,
    ) as child:
        _copy_lineage(client, parent.info.run_id)
        scores = {
            TEST_METRIC.format(name): float(metrics[name])
            for name in METRIC_NAMES
            if isinstance(metrics.get(name), (int, float))
        }
        if scores:
            mlflow.log_metrics(scores)
        yield child.info.run_id


def _copy_lineage(client: MlflowClient, parent_run: str) -> None:
    # The parent's lineage/ folder, as it logged it (nothing when it logged none).
    import mlflow

    if not any(a.path == LINEAGE_DIR for a in client.list_artifacts(parent_run)):
        return
    with tempfile.TemporaryDirectory(prefix="compact-lineage-") as tmp:
        folder = client.download_artifacts(parent_run, LINEAGE_DIR, tmp)
        mlflow.log_artifacts(folder, LINEAGE_DIR)


def recorded_run(client: MlflowClient, version: Any, run_id: str) -> str:
    """The run whose version ``version`` register may record hashes of: its own (child) run
    when that is a child of ``run_id`` (or ``run_id`` itself: a compact logged before child
    runs), else ``run_id`` (another run's version: left as it is)."""
    own = version.run_id
    if not own:
        return run_id
    if own == run_id or client.get_run(own).data.tags.get(PARENT_RUN_KEY) == run_id:
        return str(own)
    return run_id
