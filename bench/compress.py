"""Compression and ensembles: what the compress stage's candidates keep and gain against their
parent, whether an ensemble beats its best member, and a student distilled from the ensemble.

The data is the bundled tables (sklearn:breast_cancer with an mlp; sklearn:digits as 8x8 images
with a cnn, and with an mlp), written as the validated table and split by the real features
stage, then trained by the real train stage (MLflow in a temporary store), all with
``params.yaml``'s values. Per case, three parts, each through the stage's own ``run``::

    make bench-compress
    python -m bench.compress --quick --cases breast_cancer/mlp   # seconds: the smoke test's

1. ``compress``: ``stages.compress.stage.run`` on train's model (the ensemble disabled): per
   method (prune, quantize, distill) its accuracy and macro-F1 on the test split, file size,
   median single-row and batch-64 latency, each as a ratio against the parent measured by the
   stage in the same run (speedup, size ratio, relative drop), and the gate's verdict.
2. ``ensemble``: ``stages.ensemble.stage.run`` once (the first fusion method: it trains the
   extra members, more seeds and families, in its members process), then ``stage.build`` for
   each other method on the same members (unpacked from the first zip, as the stage's tests
   do): only the fusion differs. The test split is moved out of the features folder while
   this runs: the members and the fusion cannot read it. Then every ensemble file is loaded by
   ``model.predictors.load_predictor`` and scored on test (``member_probas`` and
   ``predict_proba``, ``model.metrics``): ``beats_best_member`` = the ensemble's macro-F1 above
   the best member's on test (the best chosen by looking at test: the hardest baseline). The
   member that val would pick (lowest val log loss) is recorded beside it.
3. ``distill``: ``stages.compress.stage.run`` with that ensemble (``--distill-parent``) as the
   parent: prune and quantize are skipped for an ensemble; the student against the ensemble.

Results: ``bench/results/compress.json`` with the machine and its load average before and after;
markdown tables printed for the README.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from bench.common import RESULTS_DIR, describe_machine, load_average, write_result
from bench.tune import TestSplitAway, dataset_params, prepare_features

ROOT = Path(__file__).resolve().parents[1]
NAME = "compress"
# case -> (dataset, train.model, extra member families: cheap ones that differ from train's)
CASES = {
    "breast_cancer/mlp": ("breast_cancer", "mlp", ["gbdt", "transformer"]),
    "digits/cnn": ("digits", "cnn", ["gbdt", "mlp"]),
    "digits/mlp": ("digits", "mlp", ["gbdt", "cnn"]),
}
FUSIONS = ("mean", "vote", "weighted", "caruana", "stacking")  # the first trains the members
# (mean: it keeps every member in its file; caruana leaves the ones it never picks out)
KEEP = ("accuracy", "f1_macro", "log_loss")
QUICK_COMPRESS = {"row_repeats": 5, "batch_repeats": 3, "finetune_epochs": 2, "distill_epochs": 3}


def case_params(raw: dict, case: str, args: argparse.Namespace, **ensemble: Any) -> Any:
    """params.yaml for ``case``; ``ensemble`` settings (enabled when given)."""
    dataset, model, families = CASES[case]
    raw = copy.deepcopy(raw)
    raw["train"]["model"] = model
    for setting in args.set:  # section.key=value (a YAML value), e.g. compress.distill_epochs=200
        name, value = setting.split("=", 1)
        section, key = name.split(".", 1)
        raw[section] = {**raw[section], key: yaml.safe_load(value)}
    if args.quick:
        raw["compress"] = {**raw["compress"], **QUICK_COMPRESS}
    if ensemble:
        members = {"seeds": args.seeds, "families": args.families or families, "tune_top_k": 0}
        raw["ensemble"] = {**raw["ensemble"], "enabled": True, "members": members, **ensemble}
    return dataset_params(raw, dataset, args.max_epochs)


# --- part 1 and 3: the compress stage --------------------------------------------------------


def compress(features: Path, models: Path, ensemble: Path, out: Path, params: Any) -> dict:
    """The stage's report (run_id and temp paths dropped) and its wall seconds."""
    from stages.compress import stage

    started = time.perf_counter()
    report = stage.run(features, models, ensemble, out, params)
    report = {k: v for k, v in report.items() if k != "run_id"}
    report["parent"]["file"] = Path(report["parent"]["file"]).name
    return {**report, "seconds": time.perf_counter() - started}


# --- part 2: the ensemble stage, every fusion on the same members ----------------------------


def unpack_members(zip_path: Path, report: dict, into: Path) -> list[dict[str, Any]]:
    """The members of a built ensemble as ``stage.build`` takes them (files unpacked)."""
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(into)
    members = json.loads((into / "ensemble.json").read_text(encoding="utf-8"))["members"]
    out = []
    for member, entry in zip(members, report["members"], strict=True):
        file = into / "members" / member["name"] / Path(member["file"]).name
        out.append({**member, "file": str(file), "seed": entry["seed"]})
        out[-1]["overrides"] = entry["overrides"]
    return out


def build_ensembles(
    raw: dict, case: str, args: argparse.Namespace, features: Path, models: Path, root: Path
) -> tuple[dict[str, dict], dict[str, float]]:
    """Each fusion's report (ensemble folder ``root/<method>``) and the seconds each took."""
    from stages.ensemble import stage

    reports, seconds = {}, {}
    first, *rest = args.fusions
    with TestSplitAway(features):  # nothing here can read the test split
        started = time.perf_counter()
        reports[first] = stage.run(
            features, models, root / first, case_params(raw, case, args, method=first)
        )
        seconds[first] = time.perf_counter() - started
        members = unpack_members(
            root / first / "model.ensemble.zip", reports[first], root / "members"
        )
        for method in rest:
            started = time.perf_counter()
            params = case_params(raw, case, args, method=method)
            reports[method] = stage.build(
                features, models, root / method, params, copy.deepcopy(members)
            )
            seconds[method] = time.perf_counter() - started
    return reports, seconds


def score_ensembles(features: Path, root: Path, reports: dict[str, dict]) -> dict[str, Any]:
    """Members and every fused ensemble on the test split; the ensemble against its members."""
    from model.files import ENSEMBLE_FILE, PREPROCESSOR_FILE
    from model.metrics import compute_metrics
    from model.predictors import load_predictor
    from model.preprocess import load_preprocessor
    from stages.common.io import read_parquet

    preprocessor = load_preprocessor(features / PREPROCESSOR_FILE)
    test = read_parquet(features / "test.parquet")
    y = preprocessor.encode_labels(test[preprocessor.target])
    members: list[dict[str, Any]] = []
    fusions: dict[str, Any] = {}
    for method, report in reports.items():
        ensemble = load_predictor(root / method / ENSEMBLE_FILE).to("cpu")
        X = ensemble.features(preprocessor, test)
        scored = [compute_metrics(y, p) for p in ensemble.member_probas(X)]
        if not members:
            for entry, metrics in zip(report["members"], scored, strict=True):
                members.append(
                    {k: entry[k] for k in ("name", "source", "family")}
                    | {f"test_{k}": metrics[k] for k in KEEP}
                    | {"test_errors": errors(metrics, len(y))}
                    | {f"val_{k}": entry[f"val_{k}"] for k in KEEP}
                )
        metrics = compute_metrics(y, ensemble.predict_proba(X))
        metrics["errors"] = errors(metrics, len(y))
        fusions[method] = compare(metrics, members, report)
    return {"test_rows": len(y), "members": members, "fusions": fusions}


def errors(metrics: dict[str, float], rows: int) -> int:
    """Misclassified test rows (a macro-F1 gap of 0.0001 can be the same count)."""
    return round((1.0 - metrics["accuracy"]) * rows)


def compare(metrics: dict, members: list[dict], report: dict) -> dict[str, Any]:
    """One fused ensemble on test against its best member (by test F1) and val's pick."""
    best = max(members, key=lambda m: m["test_f1_macro"])
    best_loss = min(m["test_log_loss"] for m in members)
    val_pick = min(members, key=lambda m: m["val_log_loss"])
    delta = metrics["f1_macro"] - best["test_f1_macro"]
    if delta > 0:
        why = None
    elif best["test_f1_macro"] >= 1.0:
        why = f"the best member ({best['name']}) is already perfect on test"
    elif delta == 0:
        why = f"a tie with {best['name']}"
    else:
        why = f"{best['name']} alone is better on test"
    return {
        **{f"test_{k}": metrics[k] for k in KEEP},
        "test_errors": metrics["errors"],
        **{f"val_{k}": report[f"val_{k}"] for k in KEEP},
        "weights": report["weights"],
        "best_member": best["name"],
        "best_member_f1_macro": best["test_f1_macro"],
        "best_member_errors": best["test_errors"],
        "f1_minus_best_member": delta,
        "beats_best_member": delta > 0,
        "why_not": why,
        "log_loss_minus_best_member": metrics["log_loss"] - best_loss,
        "val_pick": val_pick["name"],
        "f1_minus_val_pick": metrics["f1_macro"] - val_pick["test_f1_macro"],
    }


# --- one case ------------------------------------------------------------------------------


def run_case(
    work: Path, raw: dict, case: str, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    from stages.common.io import write_json
    from stages.ensemble.report import disabled_report
    from stages.train import stage as train

    load_before = load_average()
    root = work / case.replace("/", "-")
    params = case_params(raw, case, args)
    data = prepare_features(root, CASES[case][0], params)
    features, models = data.pop("features"), root / "models"
    started = time.perf_counter()
    train.run(features, root / "no-report", models, root / "history.csv", params,
              resume_dir=root / "resume", resume=False)  # fmt: skip
    out: dict[str, Any] = {"data": data, "train_s": time.perf_counter() - started}
    write_json(root / "ensemble-off" / "report.json", disabled_report())
    out["compress"] = compress(features, models, root / "ensemble-off", root / "compact", params)
    log(f"{case}: compress {out['compress']['status']} ({out['compress']['seconds']:.1f} s)")
    reports, seconds = build_ensembles(raw, case, args, features, models, root / "ensemble")
    out["ensemble"] = {**score_ensembles(features, root / "ensemble", reports), "seconds": seconds}
    out["ensemble"]["test_split_present_during_fit"] = False  # TestSplitAway
    log(f"{case}: ensembles {', '.join(args.fusions)} ({sum(seconds.values()):.1f} s)")
    parent = root / "ensemble" / args.distill_parent
    out["distill"] = {
        "parent_method": args.distill_parent,
        **compress(features, models, parent, root / "compact-ensemble", params),
    }
    log(f"{case}: distilled from the ensemble ({out['distill']['seconds']:.1f} s)")
    out["load_average"] = {"before": load_before, "after": load_average()}
    return out


# --- report --------------------------------------------------------------------------------


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def _compress_rows(case: str, report: dict, parent: str, skip: bool = True) -> list[list[Any]]:
    """The parent, then each candidate (a skipped one: its reason, unless ``skip`` is False)."""
    p = report["parent"]
    rows = [[case, parent, p["metrics"]["accuracy"], "", p["metrics"]["f1_macro"], p["size_bytes"]]]
    rows[0] += ["", p["latency_ms_row"], "", p["latency_ms_batch64"], "", ""]
    for method, c in report["candidates"].items():
        if "metrics" not in c:
            if skip:
                rows.append([case, method, *[""] * 9, f"{c['status']}: {c['reason']}"])
            continue
        row = [case, method, c["metrics"]["accuracy"], f"{0.0 - c['relative_drop']:+.2%}"]
        row += [c["metrics"]["f1_macro"], c["size_bytes"], f"{c['size_ratio']:.2f}x"]
        row += [c["latency_ms_row"], f"{c['speedup']:.2f}x", c["latency_ms_batch64"]]
        rows.append([*row, f"{c['speedup_batch64']:.2f}x", c["status"]])
    return rows


def _fusion_row(case: str, method: str, f: dict[str, Any]) -> list[Any]:
    weights = "" if f["weights"] is None else " ".join(f"{w:.2f}" for w in f["weights"])
    beats = "yes" if f["beats_best_member"] else f"no ({f['why_not']})"
    row = [case, method, weights, f["test_f1_macro"], f["best_member"], f["best_member_f1_macro"]]
    row += [f"{f['f1_minus_best_member']:+.4f}", f"{f['test_errors']} ({f['best_member_errors']})"]
    row += [beats, f["val_pick"]]
    row += [f"{f['f1_minus_val_pick']:+.4f}", f["test_log_loss"]]
    return [*row, f"{f['log_loss_minus_best_member']:+.4f}"]


COMPRESS_HEADER = ["case", "model", "accuracy", "vs parent", "macro-F1", "bytes", "smaller"]
COMPRESS_HEADER += ["row ms", "speedup", "batch-64 ms", "speedup b64", "gate"]
MEMBER_HEADER = ["case", "member", "family", "accuracy", "macro-F1", "errors", "log loss"]
MEMBER_HEADER += ["val log loss"]
FUSION_HEADER = ["case", "fusion", "weights", "macro-F1", "best member", "its F1", "ΔF1"]
FUSION_HEADER += [
    "errors (best's)",
    "beats",
    "val's pick",
    "ΔF1 vs it",
    "log loss",
    "Δ log loss vs best",
]


def print_report(result: dict[str, Any]) -> None:
    cases = result["cases"]
    rows = [r for case, o in cases.items() for r in _compress_rows(case, o["compress"], "parent")]
    print("\nCompression of train's model (test split; ratios against the parent, same run)\n")
    print(markdown(COMPRESS_HEADER, rows))
    print("\nEnsemble members on the test split (val: what the fusion was fitted on)\n")
    rows = [
        [case, m["name"], m["family"], m["test_accuracy"], m["test_f1_macro"], m["test_errors"]]
        + [m["test_log_loss"], m["val_log_loss"]]
        for case, o in cases.items()
        for m in o["ensemble"]["members"]
    ]
    print(markdown(MEMBER_HEADER, rows))
    print("\nEnsembles against their best member (on test) on test macro-F1\n")
    rows = [
        _fusion_row(case, method, f)
        for case, o in cases.items()
        for method, f in o["ensemble"]["fusions"].items()
    ]
    print(markdown(FUSION_HEADER, rows))
    print("\nDistilled from the ensemble (prune and quantize do not apply to an ensemble)\n")
    rows = []
    for case, o in cases.items():
        label = f"ensemble ({o['distill']['parent_method']})"
        rows += _compress_rows(case, o["distill"], label, skip=False)
    print(markdown(COMPRESS_HEADER, rows))
    print(f"\nbeats its best member: {json.dumps(result['summary']['beats_best_member'])}")


def summarize(cases: dict[str, Any]) -> dict[str, Any]:
    beats = {
        case: [m for m, f in o["ensemble"]["fusions"].items() if f["beats_best_member"]]
        for case, o in cases.items()
    }
    return {"beats_best_member": beats, "beats_on_some_dataset": any(beats.values())}


# --- the run -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compress",
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--fusions", nargs="+", choices=FUSIONS, default=list(FUSIONS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[1, 2], help="extra members")
    parser.add_argument("--families", nargs="*", help="extra members (default: per case)")
    parser.add_argument("--distill-parent", default="caruana", help="the ensemble distilled")
    parser.add_argument("--max-epochs", type=int, help="cap train.max_epochs (default: params)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (members too)")
    parser.add_argument(
        "--set", action="append", default=[], help="params override SECTION.KEY=VALUE (YAML)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings (the smoke test)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_epochs, args.seeds = args.max_epochs or 3, args.seeds[:1]
        args.families = args.families or ["gbdt"]
    if args.distill_parent not in args.fusions:
        parser.error(f"--distill-parent {args.distill_parent} is not among --fusions")
    import logging

    import torch

    from stages.common import tracking

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    threads, saved_env = torch.get_num_threads(), dict(os.environ)
    torch.set_num_threads(args.threads)
    # a store of our own (the env var wins over params), members' processes on --threads
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    machine = describe_machine()
    # the code measured: HEAD, and the tracked files that differed from it
    git = {"commit": tracking.git_state(ROOT)["git.commit"]}
    git["uncommitted"] = tracking.git_dirty_files(ROOT)
    started, load_before = time.perf_counter(), load_average()
    try:
        cases = {case: run_case(work, raw, case, args, _log) for case in args.cases}
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved_env)
        _reset_mlflow()
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "cases": cases,
        "summary": summarize(cases),
        "machine": machine,
        "git": git,
        "load_average": {"before": load_before, "after": load_average()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - started,
    }
    path = write_result(NAME, result, args.results_dir)
    print_report(result)
    print(f"\nwrote {path} ({result['seconds']:.0f} s; load {result['load_average']})")
    return 0


def _reset_mlflow() -> None:
    import mlflow

    mlflow.set_tracking_uri(None)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
