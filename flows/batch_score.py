"""Batch scoring as a Prefect flow: score a Parquet file or folder with the champion.

The flow only orchestrates: it loads the model once (:func:`open_model`, the same
loading code the service uses), scores each input file as its own task (``serving.batch``,
``batch_size`` rows at a time, each output written atomically), and publishes a
``batch-score-summary`` artifact. Every output row is the input row plus ``prediction``,
``proba_<label>`` and ``model_version``.

Run it from the project root::

    python -m flows.batch_score --input data/incoming --output data/scored
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from serving import batch
from serving.model import LoadedModel, ModelIntegrityError, load_model
from stages.common import tracking
from stages.common.config import Params, load_params

SUMMARY_KEY = "batch-score-summary"


def open_model(
    params: Params, model_uri: str | None = None, variant: str = "pyfunc"
) -> LoadedModel:
    """The model to score with: ``model_uri``, or ``models:/<register.model_name>@<alias>``,
    from the MLflow store in params (``MLFLOW_TRACKING_URI`` overrides).

    Its files are checked against the hashes recorded at registration (signed with the key in
    ``register.signing_key_env``, when set) before it is loaded.

    Raises:
        ModelIntegrityError: the files differ or the signature is missing or wrong.
        ModelLoadError: any other reason it cannot be loaded.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(params.mlflow))
    uri = model_uri or f"models:/{params.register.model_name}@{params.register.alias}"
    return load_model(uri, variant, params.register.signing_key_env)


def _retry_unless_refused(task: Any, task_run: Any, state: Any) -> bool:
    # Registry I/O is retried; a version refused for its files would only be refused again.
    return not isinstance(state.data, ModelIntegrityError)


@task(
    name="load-model",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_unless_refused,
)
def load_scoring_model(params_path: str, model_uri: str | None, variant: str) -> LoadedModel:
    """The champion (or ``model_uri``), loaded once for every file, its files checked against
    the hashes recorded at registration first; retried: registry I/O (not a refused version).
    """
    params = load_params(params_path)
    tracking.apply_http_limits(params.mlflow)  # a server that is down fails in seconds
    return open_model(params, model_uri, variant)


@task(name="score-file", cache_policy=NO_CACHE)
def score_one(model: LoadedModel, src: str, dest: str, batch_size: int) -> int:
    """Score one file; a bad file fails this task with the file and column named."""
    return batch.score_file(model, src, dest, batch_size)


def render_summary(summary: dict[str, Any]) -> str:
    """The summary artifact: model, version, and rows per output file."""
    lines = [
        f"# Batch scoring with {summary['model_name']} v{summary['model_version']}",
        "",
        f"{summary['rows']} row(s) in {len(summary['files'])} file(s).",
        "",
        "| input | output | rows |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {f['input']} | {f['output']} | {f['rows']} |" for f in summary["files"]]
    return "\n".join(lines)


@flow(name="batch-score", description="Score Parquet files with the champion model.")
def batch_score(
    source: str,
    dest: str,
    params_path: str = "params.yaml",
    model_uri: str | None = None,
    variant: str = "pyfunc",
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Score ``source`` (a Parquet file or folder) into ``dest`` with the champion.

    Returns:
        ``{model_name, model_version, rows, files: [{input, output, rows}]}``.
    """
    logger = get_run_logger()
    size = batch_size or load_params(params_path).serve.batch_size
    pairs = batch.plan_outputs(source, dest)
    model = load_scoring_model(params_path, model_uri, variant)
    logger.info("scoring %d file(s) with %s v%s", len(pairs), model.name, model.label)
    files = [
        {"input": str(src), "output": str(out), "rows": score_one(model, str(src), str(out), size)}
        for src, out in pairs
    ]
    summary = {
        "model_name": model.name,
        "model_version": model.version,
        "rows": sum(f["rows"] for f in files),
        "files": files,
    }
    create_markdown_artifact(
        render_summary(summary),
        key=SUMMARY_KEY,
        description="batch scoring: model version and rows per file",
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Score once; exit code 1 if the flow run failed."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.batch_score",
        description="Score a Parquet file or folder with the champion model (Prefect flow).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="Parquet file or folder to score")
    parser.add_argument(
        "--output",
        required=True,
        help="output file (for a file input) or folder (for a folder input)",
    )
    parser.add_argument("--params", default="params.yaml", help="pipeline parameters file")
    parser.add_argument(
        "--model-uri",
        help="score with this model instead of models:/<register.model_name>@<register.alias>",
    )
    parser.add_argument("--variant", default="pyfunc", help="how the model runs (see serving)")
    parser.add_argument(
        "--batch-size", type=int, help="rows per model call (params serve.batch_size)"
    )
    args = parser.parse_args(argv)
    try:
        summary = batch_score(
            args.input, args.output, args.params, args.model_uri, args.variant, args.batch_size
        )
    except Exception as exc:  # the flow run is Failed and Prefect logged the details
        print(f"\nBatch scoring failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"\nScored {summary['rows']} row(s) with {summary['model_name']} "
        f"v{summary['model_version']}: " + ", ".join(f["output"] for f in summary["files"])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
