"""Compress stage: smaller copies of the judged model, each scored against it on the test split
and judged by the compression gate; the best passing one is what register can register.

1. Parent: ``stages.common.judged.judged_model_file`` (the ensemble when the ensemble stage
   built one, else train's model), loaded by ``model.predictors.load_predictor``.
2. Candidates, each method in ``compress.methods`` (a method that does not apply to the
   parent's family is ``skipped``, with the reason): ``prune`` (prune.py), ``quantize``
   (quantize.py), ``distill`` (distill.py). Fitting sees train (and val for early stopping and
   the teacher's val targets); test is only measured.
3. Measure and judge (candidate.py, measure.py, gate.py): metric, file size and latency of the
   parent and each candidate through the same preprocess + predict path; passed or failed, with
   a reason either way (a candidate that cannot be built, loaded or measured is failed, not
   the stage); ``chosen``: the best passing candidate (best metric, then smallest file).
4. Write ``<out>/report.json`` and ``<out>/<method>/<model file>`` as one folder (atomic), after
   logging both to train's MLflow run (``compress.<method>.<number>`` metrics, ``compact/``).

``compress.enabled: false`` writes a report saying so and nothing else (no model is loaded).
Report ``status``: ``built`` (a candidate was chosen), ``none_passed`` or ``disabled``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.artifacts import file_sha256
from stages.common import tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params
from stages.common.errors import DataError
from stages.common.io import atomic_path, read_json, write_json
from stages.common.judged import REPORT_FILE, judged_model_file
from stages.compress.candidate import METHOD_FILES, Parent, candidate
from stages.compress.gate import SKIPPED, choose

if TYPE_CHECKING:
    import argparse

logger = logging.getLogger(__name__)

BUILT, NONE_PASSED, DISABLED = "built", "none_passed", "disabled"  # report status
METRIC_PREFIX = "compress."  # the run's metrics this stage logs
LOGGED = ("size_bytes", "latency_ms_row", "latency_ms_batch64")  # + metric, gate numbers


# --- pure core ----------------------------------------------------------------------------


def skip_reason(method: str, family: str, train_params: dict | None = None) -> str | None:
    """Why ``method`` does not apply to a parent of ``family`` (None: it does); the parent's
    ``train_params`` tell an rnn's cell (onnxruntime has int8 LSTM, not GRU)."""
    from stages.compress.prune import prunable_reason
    from stages.compress.quantize import quantizable_reason

    if method == "prune":
        return prunable_reason(family)
    if method == "quantize":
        return quantizable_reason(family, train_params)
    return None  # distill: any parent can teach (it is only asked for probabilities)


def skipped(reason: str) -> dict[str, Any]:
    return {"status": SKIPPED, "reason": reason, "file": None}


def run_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``compress.<parent|method>.<name>``: the numbers the MLflow run gets."""
    metric = report["metric"]
    out = {f"{METRIC_PREFIX}parent.{metric}": report["parent"]["metrics"][metric]}
    out |= {f"{METRIC_PREFIX}parent.{key}": float(report["parent"][key]) for key in LOGGED}
    for method, c in report["candidates"].items():
        if c["status"] == SKIPPED or "metrics" not in c:
            continue
        at = f"{METRIC_PREFIX}{method}."
        out |= {
            f"{at}{metric}": c["metrics"][metric],
            f"{at}passed": float(c["status"] == "passed"),
        }
        out |= {
            f"{at}{key}": float(c[key])
            for key in (*LOGGED, "relative_drop", "speedup", "size_ratio")
        }
    return out


# --- I/O ----------------------------------------------------------------------------------


def _load_parent(parent_path: Path, data: Any) -> Any:
    from model.predictors import load_predictor

    parent = load_predictor(parent_path).to("cpu")
    classes = len(data.preprocessor.classes)
    if parent.n_classes != classes:
        raise DataError(
            f"the model predicts {parent.n_classes} classes, the preprocessor gives {classes}: "
            "retrain after the features change",
            file=str(parent_path),
            rule="model_matches_features",
        )
    return parent


def _compress(
    features_dir: Path, parent_path: Path, out_dir: Path, tmp: Path, params: Params
) -> dict[str, Any]:
    """Every candidate in ``tmp`` (the folder that becomes ``out_dir``); returns the report."""
    from stages.compress.fit import one_torch_thread

    with one_torch_thread():
        return _compress_all(features_dir, parent_path, out_dir, tmp, params)


def _compress_all(
    features_dir: Path, parent_path: Path, out_dir: Path, tmp: Path, params: Params
) -> dict[str, Any]:
    from stages.compress.data import load_data
    from stages.compress.measure import measure

    cp = params.compress
    data = load_data(features_dir)
    model = _load_parent(parent_path, data)
    repeats = (cp.row_repeats, cp.batch_repeats)
    parent = Parent(parent_path, model, measure(model, parent_path, data.test, repeats))
    candidates = {}
    for method in cp.methods:
        train_params = model.meta.get("train_params")
        if (reason := skip_reason(method, model.family, train_params)) is not None:
            candidates[method] = skipped(reason)
        else:
            shown = f"{out_dir.name}/{method}/{METHOD_FILES[method]}"
            candidates[method] = candidate(method, parent, data, params, tmp, shown)
        logger.info(
            "compress: %s %s: %s", method, *map(candidates[method].get, ("status", "reason"))
        )
    chosen = choose(candidates, cp.metric)
    if chosen is None:
        reason = "no candidate passed the compression gate: nothing compact to register"
    else:
        reason = f"{chosen} chosen: {candidates[chosen]['reason']}"
    return {
        "status": BUILT if chosen else NONE_PASSED,
        "reason": reason,
        "metric": cp.metric,
        "gate": {
            "max_relative_drop": cp.max_relative_drop,
            "min_speedup": cp.min_speedup,
            "min_size_ratio": cp.min_size_ratio,
        },
        "parent": parent.measured.record(),
        "candidates": candidates,
        "chosen": chosen,
        "chosen_file": candidates[chosen]["file"] if chosen else None,
    }


def run(
    features_dir: str | Path,
    model_dir: str | Path,
    ensemble_dir: str | Path | None,
    out_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    """Compress the judged model; write and log the report and the candidates' files.

    Returns:
        The report (``out_dir/report.json``). Candidate files are named in it relative to the
        folder holding ``out_dir`` (``compact/quantize/model.int8.onnx`` in the pipeline).
    """
    import mlflow

    features_dir, model_dir, out_dir = Path(features_dir), Path(model_dir), Path(out_dir)
    parent_path = judged_model_file(model_dir, ensemble_dir)
    run_id = read_json(model_dir / tracking.RUN_FILE)["run_id"]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        if not params.compress.enabled:
            record = {
                "status": DISABLED,
                "reason": "compress.enabled is false: no compact models (none is registered)",
                "parent": {"file": str(parent_path), "sha256": file_sha256(parent_path)},
                "candidates": {},
                "chosen": None,
                "chosen_file": None,
            }
        else:
            record = _compress(features_dir, parent_path, out_dir, tmp, params)
        record = {"run_id": run_id, **record}
        write_json(tmp / REPORT_FILE, record)
        if params.compress.enabled:
            with tracking.resume_run(model_dir, params.mlflow):
                mlflow.log_metrics(run_metrics(record))
                mlflow.set_tag("compress.chosen", record["chosen"] or "none")
                mlflow.log_artifacts(str(tmp), artifact_path=out_dir.name)
    logger.info("compress: %s", record["reason"])
    return record


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stages.compress --features DIR --model DIR --ensemble DIR --out DIR``."""
    parser = build_parser("compress", "Prune, quantize and distill the judged model; gate them.")
    parser.add_argument("--features", required=True, help="features dir (splits, preprocessor)")
    parser.add_argument("--model", required=True, help="train's model dir (model file, run.json)")
    parser.add_argument(
        "--ensemble", default=None, help="ensemble stage's dir (its model when it built one)"
    )
    parser.add_argument("--out", required=True, help="compact dir (report.json + model files)")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.features, args.model, args.ensemble, args.out, params)

    return run_main("compress", parser, body, argv)
