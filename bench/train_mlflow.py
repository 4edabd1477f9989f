"""MLflow tracking cost: the stage's training with per-epoch MLflow logging on against off.

The store is a real, temporary sqlite MLflow store (never ./mlflow). "on" is what the train
stage does around ``train_model``: a run opened and closed and each epoch's history row logged.
Three ways of logging the rows are timed: ``batched`` (the stage's ``tracking.MetricBuffer``: one
``log_batch`` every few seconds and at the end), ``sync`` (one ``log_metrics`` per epoch) and
``async`` (``log_metrics(..., synchronous=False)`` per epoch, flushed before the run ends). Both
sides write the stage's resume checkpoints. Target (issue 4): on / off <= 1.02 in seconds. Two
sizes: a large table where an epoch takes about half a second, and the pipeline's own size
(breast-cancer-like: 364 train rows x 30 features, 100 epochs) where an epoch takes
milliseconds and any fixed cost per epoch or per run weighs far more.

    python -m bench.train_mlflow
    python -m bench.train_mlflow --cases large --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import common
from bench.train_loop import Case, make_data, prepare_stage, val_rows

NAME = "train_mlflow"
TARGET = 1.02  # max seconds ratio, logging on / off
CALL_SAMPLES = 20  # calls timed per MLflow operation in the per-call costs


@contextmanager
def temporary_store() -> Iterator[str]:
    """A fresh sqlite MLflow store in a temp folder, set as ``MLFLOW_TRACKING_URI``."""
    import mlflow

    from stages.common import tracking
    from stages.common.config import MlflowParams

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            tracking.configure_mlflow(MlflowParams(tracking_uri=uri, experiment="bench"))
            yield uri
        finally:
            # set_tracking_uri is process-global (and sets the env var): point it back, or
            # unset both, so nothing later in this process logs into a deleted store.
            mlflow.set_tracking_uri(previous)


def log_epoch(row: dict[str, float], synchronous: bool = True) -> None:
    """What the train stage logs per epoch: the history row as metrics at step = epoch."""
    import mlflow

    mlflow.log_metrics(
        {k: v for k, v in row.items() if k != "epoch"},
        step=int(row["epoch"]),
        synchronous=synchronous,
    )


def make_cases(args: argparse.Namespace) -> list[Case]:
    """The large-table and pipeline-size cases asked for (MLP, the stage's defaults)."""
    from stages.common.config import TrainParams

    # (train rows, features, classes, epochs); "pipeline" = breast cancer's 569 rows after the
    # features stage's 64/16/20 split
    sizes = {
        "large": (args.rows, 64, 10, args.epochs),
        "pipeline": (364, 30, 2, args.pipeline_epochs),
    }
    cases = []
    for name in args.cases:
        rows, features, classes, epochs = sizes[name]
        params = TrainParams(batch_size=args.batch_size, max_epochs=epochs, patience=epochs)
        cases.append(Case(name, params, features, classes, rows, val_rows(rows)))
    return cases


def make_variants(
    case: Case, data: Any, device: Any, seed: int, resume_root: Path
) -> dict[str, common.Variant]:
    """off, then the same training inside an MLflow run, its epochs logged three ways."""

    def off() -> Callable[[], Any]:
        return prepare_stage(case, data, device, seed, resume_root)

    def batched() -> Callable[[], Any]:
        # The stage's way: rows queued in a tracking.MetricBuffer, one log_batch every few
        # seconds and at the end.
        import mlflow

        from stages.common.tracking import MetricBuffer

        buffers: list[MetricBuffer] = []
        fit = prepare_stage(
            case,
            data,
            device,
            seed,
            resume_root,
            on_epoch=lambda row: buffers[-1].add(
                {k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])
            ),
        )

        def fit_logged() -> None:
            with mlflow.start_run(run_name=f"bench-{case.name}") as run:
                buffers.append(MetricBuffer(run.info.run_id))
                fit()
                buffers[-1].flush()

        return fit_logged

    def per_epoch(synchronous: bool) -> common.Variant:
        def prepare() -> Callable[[], Any]:
            import mlflow

            fit = prepare_stage(
                case,
                data,
                device,
                seed,
                resume_root,
                on_epoch=lambda row: log_epoch(row, synchronous),
            )

            def fit_logged() -> None:
                with mlflow.start_run(run_name=f"bench-{case.name}"):
                    fit()
                    mlflow.flush_async_logging()

            return fit_logged

        return prepare

    return {"off": off, "batched": batched, "sync": per_epoch(True), "async": per_epoch(False)}


def measure_call_costs() -> dict[str, float]:
    """Milliseconds per MLflow operation: a run opened + closed, one epoch row logged."""
    import mlflow

    def _time(fn: Callable[[], Any], n: int = CALL_SAMPLES) -> float:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    def _open_close_run() -> None:
        with mlflow.start_run():
            pass

    row = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.5, "val_accuracy": 0.5}
    costs = {"start_end_run_ms": _time(_open_close_run, 5)}
    with mlflow.start_run():
        costs["log_epoch_sync_ms"] = _time(lambda: log_epoch(row, True))
        costs["log_epoch_async_call_ms"] = _time(lambda: log_epoch(row, False))
    return costs


def measure_case(case: Case, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Time off/sync/async for one case; paired on/off ratios against the target."""
    data = make_data(case, device, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as resume_root:
        variants = make_variants(case, data, device, args.seed, Path(resume_root))
        seconds = common.measure_interleaved(
            variants, args.repeats, args.warmup, device, args.clock
        )
    epochs = case.params.max_epochs
    result: dict[str, Any] = {
        "case": case.name,
        "n_train": case.n_train,
        "n_features": case.n_features,
        "batch_size": case.params.batch_size,
        "epochs": epochs,
        "seconds": {name: common.summarize(values) for name, values in seconds.items()},
        "ms_per_epoch_off": 1e3 * statistics.median(seconds["off"]) / epochs,
        "ratios": {},
    }
    for name in ("batched", "sync", "async"):
        ratio = common.ratio_stats(seconds[name], seconds["off"])
        result["ratios"][f"{name}/off"] = {
            **ratio,
            "target": TARGET,
            "met": ratio["median"] <= TARGET,
        }
    return result


def format_report(cases: Sequence[dict[str, Any]], costs: dict[str, float]) -> str:
    """Seconds per variant and the on/off ratios, then the per-call costs."""
    rows = []
    for case in cases:
        for name, secs in case["seconds"].items():
            rows.append(
                [
                    case["case"],
                    name,
                    f"{secs['median']:.3f} s",
                    f"{secs['spread']:.1%}",
                    f"{secs['min']:.3f} s",
                    "",
                ]
            )
        for key, ratio in case["ratios"].items():
            verdict = "met" if ratio["met"] else "NOT met"
            rows.append(
                [
                    case["case"],
                    key,
                    f"{ratio['median']:.3f}",
                    f"{ratio['min']:.3f}..{ratio['max']:.3f}",
                    f"{ratio['of_min']:.3f}",
                    f"<= {TARGET} {verdict}",
                ]
            )
    table = common.format_table(
        ["case", "variant / ratio", "median", "spread", "best run", "target (on the median)"], rows
    )
    return table + "\n\nper call: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items())


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_mlflow",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--cases", nargs="+", default=["large", "pipeline"], choices=["large", "pipeline"]
    )
    parser.add_argument("--rows", type=int, default=50_000, help="rows of the large case")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the large case")
    parser.add_argument(
        "--pipeline-epochs",
        type=int,
        default=100,
        help="epochs of the pipeline-size case (train.max_epochs default)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="the stage's default")
    common.add_common_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write ``<results-dir>/train_mlflow.json``."""
    args = build_parser().parse_args(argv)
    device = common.prepare_run(args)
    load_before = common.load_average()
    with temporary_store():
        cases = [measure_case(case, args, device) for case in make_cases(args)]
        costs = measure_call_costs()
    payload = {
        "machine": common.describe_machine(device),
        "load_before": load_before,
        "load_after": common.load_average(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "clock": args.clock,
        "threads": args.threads,
        "store": "sqlite (temporary)",
        "per_call": costs,
        "cases": cases,
    }
    path = common.write_result(NAME, payload, args.results_dir)
    print(format_report(cases, costs))
    print(
        f"\nmachine: {payload['machine']['cpu']} ({payload['machine']['cpu_count']} cores), "
        f"device {device}; load {load_before} -> {payload['load_after']}; wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
