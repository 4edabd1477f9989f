"""Tuning: TPE against random search, the epochs pruning saves, two workers against one, and the
test-split table of the model families, on the bundled tabular and image data.

The data is sklearn's breast_cancer (tabular) and digits (8x8 images as 64 columns), each
written as the validated table and split by the real features stage (``stages.features.stage.
run``: the same split, scaling and preprocessor as ``make run``); the search space, epochs and
patience are the repository's ``params.yaml`` (``tune.space``, ``train``). Four parts::

    make bench-tune
    python -m bench.tune --trials 20 --seeds 3       # the defaults
    python -m bench.tune --quick                      # seconds: the smoke test's settings

1. ``sampler``: TPE against random search at equal trial budgets (``--trials``), one study per
   sampler seed (``--seeds``), in process (Optuna's in-memory storage), pruner off. Each trial
   is what the trial process runs: ``tuning.suggest`` + ``tuning.apply_values`` on the
   ``params.yaml`` space, trained by ``stages.train.trial.fit`` (the stage's training loop) on
   the train split, scored on val. Reported: the best validation loss after N trials (and after
   each k <= N), per seed and paired (TPE / random). Optuna's TPE draws its first 10 trials at
   random (``n_startup_trials``), so it can only differ from random search after trial 10.
2. ``pruning``: the same TPE studies with the median and the Hyperband pruner
   (``tuning.make_pruner``, as ``make tune`` builds them) against no pruner (part 1's TPE
   studies): epochs trained in all, trials pruned, the best value reached.
   The test split is moved out of the features folder while parts 1 and 2 run: the search
   cannot read it.
3. ``parallel``: ``python -m flows.tune --trials N --parallel 2`` against ``--parallel 1`` in a
   fresh clone of the committed project (``git clone`` of HEAD; ``--worktree`` adds the
   working tree's uncommitted files) where ``dvc repro features`` wrote ``data/features``.
   Random sampler and no pruner in the clone's ``params.yaml``: trial i draws the same values
   in both runs (its seed is base seed + i), so both do the same work. Each run gets its own
   study storage and a temporary Prefect server. Reported: the flow's own wall time (its
   summary line: trials, MLflow runs, the write-back) and the command's (with Python and
   Prefect start-up); target >= 1.6x on 2 cores. Then ``tune.executor: dask`` with
   ``--parallel 2`` (a local Dask cluster of two worker processes) against threads with
   ``--parallel 2``: the ratio of their wall times (the cluster's start and stop, and each
   trial's pickling, against a thread pool in the flow's process).
4. ``table``: mlp, gbdt and transformer (and cnn on the images) with params.yaml's values, plus
   the mlp with the best values part 1 found (by validation loss), each trained once with the
   stage's own code (``loop.train_model`` / ``gbdt.fit_gbdt``, in process, no MLflow) and
   scored on the test split through ``model.predictors`` and ``model.metrics``: accuracy,
   f1_macro, log_loss and the training seconds.

Results: ``bench/results/tune.json`` with the machine and its load average before and after.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import RESULTS_DIR, describe_machine, format_table, load_average, write_result

ROOT = Path(__file__).resolve().parents[1]
NAME = "tune"
PARTS = ("sampler", "pruning", "parallel", "table")
DATASETS = ("breast_cancer", "digits")
TUNED = "mlp"  # the family parts 1-3 search (params.yaml's train.model by default)
TABLE_FAMILIES = ("mlp", "gbdt", "transformer")
IMAGE_SHAPE = [1, 8, 8]  # sklearn digits: the cnn reads the 64 columns as one 8x8 channel
PRUNERS = ("median", "hyperband")
PARALLEL_TARGET = 1.6  # two workers against one, on 2 cores (issue 12)
CURVE_AT = (5, 10, 15, 20, 30, 50)  # best-so-far reported after these many trials
_WALL_LINE = re.compile(r"^Wall time: ([0-9.]+) s", re.MULTILINE)


# --- data: the real features stage on the bundled tables ---------------------------------


def dataset_params(raw: dict[str, Any], dataset: str, max_epochs: int | None = None) -> Any:
    """params.yaml's values for ``sklearn:<dataset>`` (digits: ``image_shape`` for the cnn);
    ``max_epochs`` caps ``train.max_epochs`` and ``tune.max_epochs`` (the quick run)."""
    from stages.common.config import parse_params

    raw = {name: dict(section or {}) for name, section in raw.items()}
    raw["ingest"]["source"] = f"sklearn:{dataset}"
    if dataset == "digits":
        raw["train"]["image_shape"] = IMAGE_SHAPE
    if max_epochs is not None:
        raw["train"]["max_epochs"] = min(raw["train"].get("max_epochs", max_epochs), max_epochs)
        raw["tune"]["max_epochs"] = max_epochs
    return parse_params(raw, source=f"params.yaml (sklearn:{dataset})")


def prepare_features(root: Path, dataset: str, params: Any) -> dict[str, Any]:
    """Ingest's table of ``dataset`` as the validated parquet, split by the features stage
    into ``root/features``; returns the folder and the rows per split."""
    from stages.common.io import write_parquet
    from stages.features import stage as features
    from stages.ingest.stage import load_sklearn_dataset

    frame = load_sklearn_dataset(dataset, params.ingest.target)
    write_parquet(root / "validated" / "data.parquet", frame)
    result = features.run(root / "validated", root / "features", params)
    return {
        "features": root / "features",
        "rows": result.meta["n_rows"],
        "n_features": result.meta["n_features"],
        "classes": len(result.meta["classes"]),
    }


class TestSplitAway:
    """Moves ``test.parquet`` out of the features folder while the search runs."""

    def __init__(self, features: Path) -> None:
        self.path, self.away = features / "test.parquet", features.parent / "held-out.parquet"

    def __enter__(self) -> TestSplitAway:
        self.path.rename(self.away)
        return self

    def __exit__(self, *exc: object) -> None:
        self.away.rename(self.path)


# --- parts 1 and 2: in-process studies --------------------------------------------------------


def run_study(
    features: Path, params: Any, sampler: str, pruner: str, seed: int, trials: int
) -> dict[str, Any]:
    """One study of ``trials`` trials on the ``TUNED`` family, as the trial process runs them.

    Returns the best validation loss, its values, the best-so-far after each trial (pruned
    trials count as trials, with no value), epochs trained in all, trials pruned, seconds.
    """
    import optuna

    from stages.train import tuning
    from stages.train.trial import fit

    space = params.tune.space[TUNED]
    cap = params.tune.max_epochs
    max_epochs = min(params.train.max_epochs, cap or 10**9)
    study = optuna.create_study(
        direction="minimize",
        sampler=tuning.make_sampler(sampler, space, seed),
        pruner=tuning.make_pruner(pruner, max_epochs, trials),
    )
    base = params.train.model_copy(update={"model": TUNED})
    epochs: list[int] = []

    def objective(trial: optuna.Trial) -> float:
        train, values = tuning.apply_values(base, tuning.suggest(trial, space), cap)
        trial.set_user_attr(tuning.VALUES_ATTR, values)
        epochs.append(0)

        def on_epoch(row: dict[str, float]) -> None:  # what stages.train.trial reports
            epochs[-1] += 1
            trial.report(float(row["val_loss"]), int(row["epoch"]))
            if trial.should_prune():
                raise optuna.TrialPruned()

        return fit(train, features, params, on_epoch)

    started = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    seconds = time.perf_counter() - started
    best_so_far, best = [], float("inf")
    for trial in study.trials:
        if trial.value is not None:
            best = min(best, trial.value)
        best_so_far.append(best)
    winner = tuning.best_trial(study)
    return {
        "sampler": sampler,
        "pruner": pruner,
        "seed": seed,
        "best": winner.value if winner else None,
        "best_values": winner.user_attrs[tuning.VALUES_ATTR] if winner else None,
        "best_so_far": best_so_far,
        "epochs": sum(epochs),
        "states": tuning.count_states(study),
        "seconds": seconds,
    }


def compare_samplers(studies: Sequence[dict[str, Any]], trials: int) -> dict[str, Any]:
    """TPE against random: best after N per seed, paired ratios, best-so-far medians."""
    tpe, rnd = (
        sorted(
            (s for s in studies if s["sampler"] == kind and s["pruner"] == "none"),
            key=lambda s: s["seed"],
        )
        for kind in ("tpe", "random")
    )
    ratios = [t["best"] / r["best"] for t, r in zip(tpe, rnd, strict=True)]
    return {
        "best": {k: _spread([s["best"] for s in v]) for k, v in (("tpe", tpe), ("random", rnd))},
        "tpe_over_random": _spread(ratios),
        "tpe_better_in": f"{sum(r < 1 for r in ratios)} of {len(ratios)} seeds",
        "best_after": {
            k: {
                str(n): statistics.median(s["best_so_far"][n - 1] for s in v)
                for n in (*[c for c in CURVE_AT if c < trials], trials)
            }
            for k, v in (("tpe", tpe), ("random", rnd))
        },
    }


def compare_pruners(studies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Each pruner against none (same sampler and seeds): epochs, pruned trials, best."""
    none = {s["seed"]: s for s in studies if s["pruner"] == "none" and s["sampler"] == "tpe"}
    out: dict[str, Any] = {
        "none": {
            "epochs": _spread([s["epochs"] for s in none.values()]),
            "best": _spread([s["best"] for s in none.values()]),
        }
    }
    for pruner in PRUNERS:
        runs = [s for s in studies if s["pruner"] == pruner]
        if not runs:
            continue
        out[pruner] = {
            "epochs": _spread([s["epochs"] for s in runs]),
            "epochs_saved": _spread([1 - s["epochs"] / none[s["seed"]]["epochs"] for s in runs]),
            "pruned": _spread([s["states"].get("PRUNED", 0) for s in runs]),
            "best": _spread([s["best"] for s in runs]),
            "best_over_none": _spread([s["best"] / none[s["seed"]]["best"] for s in runs]),
        }
    return out


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- part 3: two workers against one, through flows.tune ----------------------------------


def make_workspace(dest: Path, worktree: bool, max_epochs: int | None = None) -> dict[str, Any]:
    """A fresh clone of HEAD at ``dest`` (``worktree``: plus the working tree's uncommitted
    and untracked files); its params.yaml set to random search without pruning; then
    ``dvc repro features``. Returns the commit and the files copied over it."""
    from bench.feedback import clone_workspace, pipeline_env, run_step

    commit = clone_workspace(dest)
    copied: list[str] = []
    if worktree:
        listed = subprocess.run(
            ["git", "ls-files", "-m", "-o", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        for name in listed:
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
                copied.append(name)
    params_file = dest / "params.yaml"
    raw = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    raw["tune"].update(sampler="random", pruner="none")
    if max_epochs is not None:
        raw["tune"]["max_epochs"] = max_epochs
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    env = pipeline_env(dest)
    seconds, _, _ = run_step(
        [sys.executable, "-m", "dvc", "repro", "features"], dest, env, dest.parent / "repro.log"
    )
    return {"commit": commit, "worktree_files": copied, "repro_features_s": seconds}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flow_wall_seconds(output: str) -> float:
    """The flow's own wall time from its printed summary (``Wall time: 12.3 s``)."""
    found = _WALL_LINE.findall(output)
    if not found:
        raise ValueError("no 'Wall time: ... s' line in the flow's output")
    return float(found[-1])


def run_tune_flow(
    repo: Path, trials: int, parallel: int, index: int, executor: str = "threads"
) -> dict[str, float]:
    """``python -m flows.tune --trials N --parallel K`` in ``repo`` on a study store of its own,
    params.yaml restored first (the flow writes the best values back), with ``tune.executor``
    ``executor``."""
    from bench.feedback import pipeline_env, run_step

    params_file, pristine = repo / "params.yaml", repo.parent / "params.pristine.yaml"
    if not pristine.exists():
        shutil.copy(params_file, pristine)
    shutil.copy(pristine, params_file)
    if executor != "threads":
        raw = yaml.safe_load(params_file.read_text(encoding="utf-8"))
        raw["tune"]["executor"] = executor
        params_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    name = f"{index}-p{parallel}" + ("" if executor == "threads" else f"-{executor}")
    env = pipeline_env(repo)
    env["TUNE_STORAGE"] = f"sqlite:///{repo.parent / f'studies-{name}.db'}"
    cmd = [sys.executable, "-m", "flows.tune", "--repo", ".", "--trials", str(trials)]
    cmd += ["--parallel", str(parallel), "--prefect-port", str(_free_port())]
    seconds, lines, cpu = run_step(cmd, repo, env, repo.parent / f"tune-{name}.log")
    return {
        "command_s": seconds,
        "flow_s": flow_wall_seconds("\n".join(text for _, text in lines)),
        "cpu_s": cpu,
    }


def measure_parallel(
    work: Path, trials: int, repeats: int, worktree: bool, max_epochs: int | None = None
) -> dict[str, Any]:
    """``--parallel 1``, ``--parallel 2`` and Dask with two workers, alternated (1 2 dask, then
    dask 2 1, ...)."""
    repo = work / "repo"
    workspace = make_workspace(repo, worktree, max_epochs)
    runs: dict[str, list[dict[str, float]]] = {"1": [], "2": [], "dask2": []}
    for index in range(repeats):
        for key in ("1", "2", "dask2") if index % 2 == 0 else ("dask2", "2", "1"):
            executor = "dask" if key == "dask2" else "threads"
            runs[key].append(run_tune_flow(repo, trials, int(key[-1]), index, executor))

    def ratios(slow: str, fast: str, key: str) -> list[float]:
        return [a[key] / b[key] for a, b in zip(runs[slow], runs[fast], strict=True)]

    speedup = {key: ratios("1", "2", key) for key in ("flow_s", "command_s")}
    flow_speedup = statistics.median(speedup["flow_s"])
    return {
        **workspace,
        "trials": trials,
        "runs": runs,
        "speedup_flow": _spread(speedup["flow_s"]),
        "speedup_command": _spread(speedup["command_s"]),
        # above 1: Dask's two workers take longer than two threads
        "dask_over_threads_flow": _spread(ratios("dask2", "2", "flow_s")),
        "dask_over_threads_command": _spread(ratios("dask2", "2", "command_s")),
        "target": f">= {PARALLEL_TARGET}x (flow wall time)",
        "met": flow_speedup >= PARALLEL_TARGET,
    }


# --- part 4: the test-split table --------------------------------------------------------------


def fit_and_score(features: Path, params: Any, train: Any) -> dict[str, Any]:
    """Train ``train`` once with the stage's code (train + val splits), then score the test
    split through ``model.predictors`` as evaluate does: metrics and training seconds."""
    from model.files import PREPROCESSOR_FILE
    from model.metrics import compute_metrics
    from model.preprocess import load_preprocessor
    from stages.common.io import read_parquet

    preprocessor = load_preprocessor(features / PREPROCESSOR_FILE)
    splits = {name: read_parquet(features / f"{name}.parquet") for name in ("train", "val")}
    n_features, n_classes = preprocessor.n_features, len(preprocessor.classes)
    meta = {"train_params": train.model_dump(mode="json"), "n_features": n_features}
    meta["n_classes"] = n_classes
    started = time.perf_counter()
    if train.model == "gbdt":
        predictor, epochs = _fit_gbdt(splits, preprocessor, train, params.base.seed, meta)
    else:
        predictor, epochs = _fit_network(splits, preprocessor, train, params, meta)
    seconds = time.perf_counter() - started
    test = read_parquet(features / "test.parquet")
    y_test = preprocessor.encode_labels(test[preprocessor.target])
    X_test = predictor.features(preprocessor, test)  # gbdt: its tree view, as evaluate does
    metrics = compute_metrics(y_test, predictor.predict_proba(X_test))
    keep = ("accuracy", "f1_macro", "log_loss")
    return {**{k: metrics[k] for k in keep}, "train_s": seconds, "epochs": epochs}


def _fit_gbdt(splits: dict, preprocessor: Any, train: Any, seed: int, meta: dict) -> tuple:
    from model.gbdt import NATIVE_INPUTS
    from model.predictors import Predictor
    from stages.train.gbdt import fit_gbdt_splits

    result = fit_gbdt_splits(splits, preprocessor, train, seed)  # as the stage fits it
    meta = {**meta, "inputs": NATIVE_INPUTS}
    return Predictor("gbdt", meta, estimator=result.estimator), len(result.history)


def _fit_network(splits: dict, preprocessor: Any, train: Any, params: Any, meta: dict) -> tuple:
    from model.nets import build_network, select_device
    from model.predictors import Predictor
    from stages.train.batches import make_train_data
    from stages.train.loop import seed_torch, train_model

    device = select_device(params.base.device)
    seed_torch(params.base.seed, device)
    data = make_train_data(splits, preprocessor, device)
    network = build_network(train, meta["n_features"], meta["n_classes"]).to(device)
    result = train_model(network, data, train, device, params.base.seed)
    network.load_state_dict(result.state_dict)  # the best epoch's weights, as train saves
    return Predictor(train.model, meta, module=network).to(device), len(result.history)


def score_families(
    features: Path, params: Any, dataset: str, tuned: dict[str, Any] | None, families: Sequence
) -> list[dict[str, Any]]:
    """One row per family (and the tuned mlp) on ``dataset``'s test split."""
    from stages.train import tuning

    cases: list[tuple[str, Any]] = [
        (family, params.train.model_copy(update={"model": family})) for family in families
    ]
    if dataset == "digits":
        cases.append(("cnn", params.train.model_copy(update={"model": "cnn"})))
    if tuned:
        base = params.train.model_copy(update={"model": TUNED})
        cases.append((f"{TUNED} (tuned)", tuning.apply_values(base, tuned)[0]))
    rows = []
    for label, train in cases:
        rows.append({"dataset": dataset, "model": label, **fit_and_score(features, params, train)})
    return rows


# --- the run -----------------------------------------------------------------------------------


def run_dataset(
    work: Path, raw: dict, dataset: str, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    """Parts 1, 2 and 4 on one dataset."""
    params = dataset_params(raw, dataset, args.max_epochs)
    data = prepare_features(work / dataset, dataset, params)
    features = data.pop("features")
    seeds = [params.base.seed + i for i in range(args.seeds)]
    studies: list[dict[str, Any]] = []
    out: dict[str, Any] = {"data": data, "seeds": seeds}
    with TestSplitAway(features):  # the search reads train and val only
        if {"sampler", "pruning", "table"} & set(args.parts):
            for seed in seeds:
                for sampler in ("tpe", "random") if "sampler" in args.parts else ("tpe",):
                    studies.append(run_study(features, params, sampler, "none", seed, args.trials))
                    log(_study_line(dataset, studies[-1]))
        if "pruning" in args.parts:
            for seed in seeds:
                for pruner in PRUNERS:
                    studies.append(run_study(features, params, "tpe", pruner, seed, args.trials))
                    log(_study_line(dataset, studies[-1]))
    out["studies"] = studies
    if "sampler" in args.parts:
        out["sampler"] = compare_samplers(studies, args.trials)
    if "pruning" in args.parts:
        out["pruning"] = compare_pruners(studies)
    if "table" in args.parts:
        complete = [s for s in studies if s["best"] is not None and s["pruner"] == "none"]
        tuned = min(complete, key=lambda s: s["best"])["best_values"] if complete else None
        out["tuned_values"] = tuned
        out["table"] = score_families(features, params, dataset, tuned, args.families)
        for row in out["table"]:
            log(f"{dataset} {row['model']}: f1_macro {row['f1_macro']:.4f}, {row['train_s']:.1f} s")
    return out


def _study_line(dataset: str, study: dict[str, Any]) -> str:
    return (
        f"{dataset} {study['sampler']}/{study['pruner']} seed {study['seed']}: best "
        f"{study['best']:.4f}, {study['epochs']} epochs, {study['states']}, "
        f"{study['seconds']:.1f} s"
    )


def print_report(result: dict[str, Any]) -> None:
    for dataset, out in result["datasets"].items():
        if "sampler" in out:
            s = out["sampler"]
            rows = [
                [kind, s["best"][kind]["median"], s["best"][kind]["min"], s["best"][kind]["max"]]
                + [s["best_after"][kind][k] for k in s["best_after"][kind]]
                for kind in ("tpe", "random")
            ]
            after = [f"after {k}" for k in s["best_after"]["tpe"]]
            print(f"\n{dataset}: best val loss after {result['trials']} trials")
            print(format_table(["sampler", "median", "min", "max", *after], rows))
            print(f"TPE / random: {s['tpe_over_random']} (TPE better in {s['tpe_better_in']})")
        if "pruning" in out:
            p = out["pruning"]
            rows = [["none", p["none"]["epochs"]["median"], "", 0, p["none"]["best"]["median"], ""]]
            rows += [
                [name, v["epochs"]["median"], v["epochs_saved"]["median"], v["pruned"]["median"]]
                + [v["best"]["median"], v["best_over_none"]["median"]]
                for name, v in p.items()
                if name != "none"
            ]
            print(f"\n{dataset}: TPE with pruning (medians over seeds)")
            header = ["pruner", "epochs", "saved", "pruned", "best", "best/none"]
            print(format_table(header, rows))
    table = [row for out in result["datasets"].values() for row in out.get("table", [])]
    if table:
        print("\nTest split (trained once, params.yaml values; tuned: part 1's best)")
        keys = ["dataset", "model", "accuracy", "f1_macro", "log_loss", "train_s", "epochs"]
        print(format_table(keys, [[row[k] for k in keys] for row in table]))
    if par := result.get("parallel"):
        print(f"\nflows.tune, {par['trials']} trials: --parallel 2 vs 1")
        print(
            f"flow wall time speed-up {par['speedup_flow']['median']:.2f}x, command "
            f"{par['speedup_command']['median']:.2f}x (target {par['target']}: "
            f"{'met' if par['met'] else 'missed'})"
        )
        if "dask_over_threads_flow" in par:
            print(
                f"tune.executor dask, 2 workers / threads, --parallel 2: flow wall time "
                f"{par['dask_over_threads_flow']['median']:.2f}x, command "
                f"{par['dask_over_threads_command']['median']:.2f}x"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tune",
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--trials", type=int, default=20, help="trials per study (parts 1, 2)")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds per comparison")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--families", nargs="+", default=list(TABLE_FAMILIES), help="table rows")
    parser.add_argument("--parallel-trials", type=int, default=8, help="trials per flows.tune")
    parser.add_argument("--parallel-repeats", type=int, default=1, help="runs of each worker count")
    parser.add_argument("--max-epochs", type=int, help="cap train.max_epochs (default: params)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument(
        "--worktree", action="store_true", help="part 3: add the uncommitted files to the clone"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings (the smoke test)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.seeds, args.max_epochs = 3, 1, args.max_epochs or 3
        args.parallel_trials, args.parallel_repeats = 2, 1
    _quiet()
    import torch

    threads = torch.get_num_threads()  # restored at the end (the smoke test runs in pytest)
    torch.set_num_threads(args.threads)
    machine = describe_machine()  # torch_threads: this process's (each trial process: its own)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    started, load_before = time.perf_counter(), load_average()
    result: dict[str, Any] = {"trials": args.trials, "seeds": args.seeds, "family": TUNED}
    try:
        result["datasets"] = {
            dataset: run_dataset(work, raw, dataset, args, _log) for dataset in args.datasets
        }
        if "parallel" in args.parts:
            result["parallel"] = measure_parallel(
                work / "parallel",
                args.parallel_trials,
                args.parallel_repeats,
                args.worktree,
                args.max_epochs,
            )
    finally:
        torch.set_num_threads(threads)
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result.update(
        machine=machine,
        load_average={"before": load_before, "after": load_average()},
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        seconds=time.perf_counter() - started,
    )
    path = write_result(NAME, result, args.results_dir)
    print_report(result)
    print(f"\nwrote {path} ({result['seconds']:.0f} s; load {result['load_average']})")
    return 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _quiet() -> None:
    import logging
    import warnings

    import optuna

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


if __name__ == "__main__":
    raise SystemExit(main())
