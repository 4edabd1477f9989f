"""An ensemble folder as the ensemble stage writes it (``report.json`` + ``model.ensemble.zip``),
built with ``model.ensemble.write_ensemble`` from members trained by train's own code on the
same features: the train stage's MLP and a gbdt."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from stages.train import stage as train
from tests.builders import make_params


def train_member(features: Path, root: Path, overrides: dict) -> Path:
    """Train one more member on ``features`` with train's own code; its model file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        train.run(
            features,
            root / "no-report",
            root / "models",
            root / "history.csv",
            make_params(overrides),
            resume_dir=root / "resume",
        )
        mlflow.set_tracking_uri(None)
    return next(p for p in (root / "models").iterdir() if p.name.startswith("model."))


def write_ensemble_dir(
    folder: Path, members: list[tuple[str, str, Path]], method: str = "mean", **fusion: object
) -> Path:
    """``folder/model.ensemble.zip`` of ``members`` (name, source, file) and a built report."""
    from model.ensemble import write_ensemble

    folder.mkdir(parents=True, exist_ok=True)
    write_ensemble(
        folder / "model.ensemble.zip",
        [{"name": n, "source": s, "file": f} for n, s, f in members],
        method,
        **fusion,
    )
    report = {
        "status": "built",
        "method": method,
        "members": [{"name": n, "source": s} for n, s, _ in members],
    }
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def resaved(checkpoint: Path, dest: Path) -> Path:
    """The same network saved again with other records in it (another epoch): other bytes,
    the same model."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    saved = torch.load(checkpoint, weights_only=True)
    torch.save({**saved, "epoch": 999}, dest)
    return dest
