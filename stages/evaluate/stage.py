"""Evaluate stage: score the test split with the trained model (a network or a gbdt).

Writes the test metrics (``dvc metrics show``), ROC/PR/confusion plot data (``dvc plots show``)
and PNGs of the same, and logs all of it to the MLflow run that train started.
Multiclass curves are micro-averaged one-vs-rest (every (row, class) pair is one binary case).

Each ROC-AUC is named by its average: ``roc_auc_macro`` (one-vs-rest per class, then the mean;
with two classes this equals the AUC of the positive class) and ``roc_auc_micro`` (every
(row, class) pair one binary case). The ROC image shows the curve of the one it names in its
legend: the positive class (``roc_auc_macro``) for two classes, else the micro average.

Beside the network's metrics, two baselines are scored on the same test split and written
with the prefix ``baseline_<name>_``: ``majority`` (the most frequent train class, with the
train class shares as probabilities) and ``logistic`` (scikit-learn's LogisticRegression on
the same fitted preprocessor's features, trained on the train split). The register stage's
default gate is relative to them. The rows and the baselines are in ``baselines.py``; the model
scores the test rows in the view it was trained on (``Predictor.features``). The model is the
judged one (``scoring.py``): the ensemble stage's when it built one, its members then scored
beside it (``member_<name>_<metric>``, reported, not gated), else train's.

A strong baseline is scored there too: scikit-learn's HistGradientBoostingClassifier with its
defaults, fitted on the same train rows (the preprocessor's tree view of them: NaN kept,
categories native; ``strong_gbdt_<metric>``), so that the summary can
say how the network does against gradient-boosted trees on the same test split. It is a
reference, not part of the gate (whose best simple baseline stays logistic regression): a
network within reach of a simple baseline is good enough to ship.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.metrics import (
    STRONG_BASELINE,
    STRONG_PREFIX,
    check_scores,
    compute_metrics,
    flatten_baselines,
)
from stages.common import tracking
from stages.common.cli import build_parser, run_main
from stages.common.config import Params
from stages.common.io import atomic_path, write_json
from stages.evaluate.baselines import baseline_probas as baseline_probas  # re-exported
from stages.evaluate.baselines import load_split as load_split  # (flows.own_data, bench)
from stages.evaluate.baselines import score_baselines
from stages.evaluate.scoring import flatten_members, log_scores, member_scores, score

if TYPE_CHECKING:
    import argparse

    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

PLOT_FILES = (
    "roc.json",
    "pr.json",
    "confusion.json",
    "roc_curve.png",
    "pr_curve.png",
    "confusion_matrix.png",
)


# --- pure core ----------------------------------------------------------------------------


def _binary_scores(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Binary: the positive class. Multiclass: micro-average, one (row, class) pair per case.
    y_true, proba = check_scores(y_true, proba)
    if proba.shape[1] == 2:
        return y_true, proba[:, 1]
    one_hot = np.eye(proba.shape[1], dtype=np.int64)[y_true]
    return one_hot.ravel(), proba.ravel()


def build_roc_records(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    """ROC curve points ``[{fpr, tpr}, ...]`` (micro-averaged one-vs-rest for multiclass)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(*_binary_scores(y_true, proba))
    return [
        {"fpr": round(float(f), 6), "tpr": round(float(t), 6)}
        for f, t in zip(fpr, tpr, strict=True)
    ]


def build_pr_records(y_true: np.ndarray, proba: np.ndarray) -> list[dict[str, float]]:
    """Precision-recall points ``[{recall, precision}, ...]`` by increasing recall."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(
        *_binary_scores(y_true, proba), drop_intermediate=True
    )
    return [
        {"recall": round(float(r), 6), "precision": round(float(p), 6)}
        for r, p in zip(recall[::-1], precision[::-1], strict=True)
    ]


def build_confusion_records(
    y_true: np.ndarray, proba: np.ndarray, classes: list[Any]
) -> list[dict[str, Any]]:
    """One ``{actual, predicted}`` record per row, as label values (DVC's confusion template)."""
    y_true, proba = check_scores(y_true, proba)
    return [
        {"actual": classes[a], "predicted": classes[p]}
        for a, p in zip(y_true.tolist(), proba.argmax(axis=1).tolist(), strict=True)
    ]


def curve_title(kind: str, n_classes: int) -> str:
    """Plot title that says how a multiclass curve was averaged."""
    if n_classes == 2:
        return f"{kind} (positive class)"
    return f"{kind}\n(micro-average one-vs-rest, {n_classes} classes)"


def roc_legend(metrics: dict[str, float], n_classes: int) -> str:
    """The ROC image's legend: the metrics.json name and value of the AUC the curve shows."""
    if n_classes == 2:  # the positive-class curve; its AUC is the macro average's
        return f"roc_auc_macro = {metrics['roc_auc_macro']:.4f}"
    return f"roc_auc_micro = {metrics['roc_auc_micro']:.4f}"


def curve_area(records: list[dict[str, float]], x: str, y: str) -> float:
    """Area under curve records: trapezoids for ROC, steps (average precision) for PR."""
    xs, ys = np.array([r[x] for r in records]), np.array([r[y] for r in records])
    if x == "recall":
        return float(np.sum(np.diff(xs) * ys[1:]))
    return float(np.trapezoid(ys, xs))


def plot_curve(
    records: list[dict[str, float]], x: str, y: str, title: str, label: str | None = None
) -> Figure:
    """A line plot of curve records (ROC or PR) on the unit square, ``label`` in the legend.

    Without ``label`` the legend gives the area under the records (AUC or AP).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    area = label or f"{'AP' if x == 'recall' else 'AUC'} = {curve_area(records, x, y):.3f}"
    ax.plot([r[x] for r in records], [r[y] for r in records], lw=2, label=area)
    if x == "fpr":
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=x, ylabel=y, title=title)
    ax.legend(loc="lower right" if x == "fpr" else "lower left")
    return fig


def plot_confusion(y_true: np.ndarray, proba: np.ndarray, classes: list[Any]) -> Figure:
    """A confusion-matrix heat map with the counts written in the cells."""
    from matplotlib.figure import Figure
    from sklearn.metrics import confusion_matrix

    y_true, proba = check_scores(y_true, proba)
    matrix = confusion_matrix(y_true, proba.argmax(axis=1), labels=np.arange(len(classes)))
    fig = Figure(figsize=(5 + 0.3 * len(classes), 4 + 0.3 * len(classes)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ticks = np.arange(len(classes))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=[str(c) for c in classes],
        yticklabels=[str(c) for c in classes],
        xlabel="predicted",
        ylabel="actual",
        title="Confusion matrix (test split)",
    )
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            color="white" if count > matrix.max() / 2 else "black",
        )
    return fig


# --- I/O ----------------------------------------------------------------------------------


def strong_metrics(scores: dict[str, float]) -> dict[str, float]:
    """The strong baseline's metrics as metrics.json keys: ``strong_gbdt_<metric>``."""
    return {f"{STRONG_PREFIX}{metric}": value for metric, value in scores.items()}


def write_plots(
    out_dir: Path,
    y_true: np.ndarray,
    proba: np.ndarray,
    classes: list[Any],
    metrics: dict[str, float],
) -> None:
    """Write the DVC plot data (JSON) and the PNGs of ROC, PR and confusion into ``out_dir``.

    The ROC legend names and quotes the metrics.json value the curve's area is (``metrics``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    roc, pr = build_roc_records(y_true, proba), build_pr_records(y_true, proba)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "roc.json", roc)
    write_json(out_dir / "pr.json", pr)
    write_json(out_dir / "confusion.json", build_confusion_records(y_true, proba, classes))
    figures = {
        "roc_curve.png": plot_curve(
            roc, "fpr", "tpr", curve_title("ROC", len(classes)), roc_legend(metrics, len(classes))
        ),
        "pr_curve.png": plot_curve(
            pr, "recall", "precision", curve_title("Precision-recall", len(classes))
        ),
        "confusion_matrix.png": plot_confusion(y_true, proba, classes),
    }
    for name, fig in figures.items():
        FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
        fig.savefig(out_dir / name, dpi=100)


def run(
    features_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    params: Params,
    ensemble_dir: str | Path | None = None,
) -> dict[str, float]:
    """Score the test split, write metrics and plots, log both to the train stage's MLflow run.

    The model scored is the judged one (``ensemble_dir``'s ``model.ensemble.zip`` when the
    ensemble stage built one, else train's; None: train's). The metrics (``metrics_path``,
    and ``test_<name>`` in MLflow) are the model's plus the baselines'
    (``baseline_<baseline>_<metric>``), the strong baseline's (``strong_gbdt_<metric>``) and,
    for an ensemble, each member's (``member_<name>_<metric>``), all on the same test split.

    Everything is computed and logged before the outputs replace the old ones, so a failure
    leaves ``out_dir`` and ``metrics_path`` as they were.
    """
    import mlflow

    features_dir, model_dir = Path(features_dir), Path(model_dir)
    ensemble = None if ensemble_dir is None else Path(ensemble_dir)
    scored = score(features_dir, model_dir, params, ensemble)
    proba, classes, test = scored.proba, scored.classes, scored.test
    y_true = test.y
    network = compute_metrics(y_true, proba)
    members = member_scores(y_true, scored.members)
    baselines = score_baselines(features_dir, test.encoded, y_true, params, strong_test=test.native)
    strong = baselines.pop(STRONG_BASELINE)
    metrics = {
        **network,
        **flatten_baselines(baselines),
        **strong_metrics(strong),
        **flatten_members(members),
    }
    with atomic_path(out_dir) as tmp_dir, atomic_path(metrics_path) as tmp_metrics:
        write_plots(tmp_dir, y_true, proba, classes, network)
        write_json(tmp_metrics, metrics)
        with tracking.resume_run(model_dir, params.mlflow):
            mlflow.log_metrics({f"test_{name}": value for name, value in metrics.items()})
            mlflow.log_artifacts(str(tmp_dir), artifact_path="eval")
            mlflow.log_artifact(str(tmp_metrics), artifact_path="eval")
    log_scores(scored.path, network, members, baselines, strong)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m stages.evaluate --features DIR --model DIR [--ensemble DIR] --out DIR
    --metrics FILE``."""
    parser = build_parser("evaluate", "Score the test split; write metrics and plots.")
    parser.add_argument("--features", required=True, help="features dir (test split)")
    parser.add_argument(
        "--model", required=True, help="model dir (model.pt or model.skops, run.json)"
    )
    parser.add_argument(
        "--ensemble",
        default=None,
        help="the ensemble stage's dir: its model is scored when it built one (else train's)",
    )
    parser.add_argument("--out", required=True, help="plots dir (JSON plot data + PNGs)")
    parser.add_argument("--metrics", required=True, help="metrics JSON file")

    def body(args: argparse.Namespace, params: Params) -> None:
        run(args.features, args.model, args.out, args.metrics, params, args.ensemble)

    return run_main("evaluate", parser, body, argv)
