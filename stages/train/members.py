"""The ensemble stage's extra members, trained by train's own code in one process.

    python -m stages.train.members --features data/features --spec members.json --out DIR \
        [--params params.yaml] [--tune-top-k K]

The ensemble stage starts this as a process (no stage imports another) and fuses what it
writes. Each member of the spec (a JSON list of ``{"name", "source", "overrides": {train field:
value}, "seed"}``; dotted fields reach sub-sections, e.g. ``gbdt.learning_rate``) is the
``train`` section with its overrides and ``base.seed`` set to its seed, trained as the stage
trains it (as ``trial.py`` does): a network with ``loop.train_model`` on ``build_network``, gbdt
with ``gbdt.fit_gbdt``, early stopping on the val split. ``--tune-top-k K`` adds the K best
COMPLETE trials of the current ``make tune`` study (``member_trials``: ``tuning``'s study name
for these params and data), each with the values it was tried with. What is saved is what the
train stage saves (``stage.final_checkpoint``, ``gbdt.model_meta``), so a member loads as train's
model does. One process for all: torch and the data load once. Only the train and val splits
are read, never test. No MLflow run per member: the ensemble stage logs to train's run.

Writes ``DIR/<name>/model.pt`` (or ``model.skops``) per member and ``DIR/members.json`` (name,
source, family, file, seed, overrides, best epoch, val loss), the folder as a whole.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model.files import NETWORK_FILE, PREPROCESSOR_FILE
from stages.common.cli import build_parser, run_main
from stages.common.config import Params, TrainParams, describe_errors
from stages.common.errors import ConfigError
from stages.common.io import atomic_path, read_json, read_parquet, write_json
from stages.train.member_trials import tuning_members

logger = logging.getLogger(__name__)

MEMBERS_FILE = "members.json"  # what was trained, read back by the ensemble stage
RESERVED = "train"  # member 0, train's own model: the ensemble stage adds it
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a folder name inside the zip


# --- the members: spec and overrides ----------------------------------------------------


def read_spec(path: str | Path) -> list[dict[str, Any]]:
    """The members asked for, checked: a list of ``{name, source, overrides, seed}`` with
    unique names that are plain folder names (not ``train``: member 0 is train's model).

    Raises:
        ConfigError: naming the spec file, the member and what is wrong.
    """
    spec = read_json(path)
    if not isinstance(spec, list):
        raise ConfigError(f"{path}: expected a JSON list of members, got {type(spec).__name__}")
    seen: set[str] = set()
    for index, member in enumerate(spec):
        where = f"{path}: member {index}"
        if not isinstance(member, dict) or set(member) - {"name", "source", "overrides", "seed"}:
            raise ConfigError(f"{where}: expected {{name, source, overrides, seed}}, got {member}")
        name = member.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == RESERVED:
            raise ConfigError(
                f"{where}: name {name!r} must be letters, digits, '_', '.', '-' (not "
                f"{RESERVED!r}: member 0 is train's model)"
            )
        if name in seen:
            raise ConfigError(f"{where}: name {name!r} is used twice")
        seen.add(name)
        if not isinstance(member.get("seed"), int) or not isinstance(
            member.get("overrides", {}), dict
        ):
            raise ConfigError(f"{where} ({name}): seed must be an integer, overrides a mapping")
    return spec


def member_train(train: TrainParams, overrides: dict[str, Any], name: str) -> TrainParams:
    """``train`` with ``overrides`` set (dotted keys reach sub-sections), checked.

    Raises:
        ConfigError: the result is not valid train params (e.g. model cnn without image_shape);
            names the member and the field.
    """
    data = train.model_dump(mode="json")
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"member {name}: override {key!r}: train has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"member {name}: override {key!r}: not a train field")
        node[leaf] = value
    try:
        return TrainParams.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"member {name}: its train params are not valid: "
            + "; ".join(describe_errors(exc, prefix="train"))
        ) from exc


# --- training, as the train stage does -------------------------------------------------------


def train_member(
    train: TrainParams, seed: int, features: Path, params: Params, out_dir: Path
) -> dict[str, Any]:
    """Train one member on the train split (early stopping on val); write its model file into
    ``out_dir``. Returns the file name, best epoch and val loss."""
    from model.preprocess import load_preprocessor

    preprocessor = load_preprocessor(features / PREPROCESSOR_FILE)
    out_dir.mkdir(parents=True)
    if train.model == "gbdt":
        return _train_gbdt(train, seed, features, preprocessor, out_dir)
    return _train_network(train, seed, features, preprocessor, params, out_dir)


def _train_network(
    train: TrainParams, seed: int, features: Path, preprocessor: Any, params: Params, out: Path
) -> dict[str, Any]:
    import torch

    from model.nets import build_network, select_device
    from stages.train.batches import load_train_data
    from stages.train.loop import seed_torch, train_model
    from stages.train.stage import final_checkpoint  # the train stage's model.pt, as saved

    # the stage's order (seed, data, network): with train's params and seed, train's weights
    device = select_device(params.base.device)
    seed_torch(seed, device)
    data, _ = load_train_data(features, preprocessor, train, device, with_test=False)
    n_features, n_classes = preprocessor.n_features, len(preprocessor.classes)
    network = build_network(train, n_features, n_classes).to(device)
    result = train_model(network, data, train, device, seed)
    torch.save(final_checkpoint(result, train, preprocessor), out / NETWORK_FILE)
    return {"file": NETWORK_FILE, "best_epoch": result.best_epoch, "val_loss": result.best_val_loss}


def _train_gbdt(
    train: TrainParams, seed: int, features: Path, preprocessor: Any, out: Path
) -> dict[str, Any]:
    from model.gbdt import GBDT_FILE, save_gbdt
    from stages.train.gbdt import fit_gbdt, model_meta, native_inputs

    splits = {name: read_parquet(features / f"{name}.parquet") for name in ("train", "val")}
    X, y, categorical = native_inputs(splits, preprocessor, train)
    n_classes = len(preprocessor.classes)
    result = fit_gbdt(
        X["train"],
        y["train"],
        X["val"],
        y["val"],
        train,
        seed,
        n_classes=n_classes,
        categorical=categorical,
    )
    meta = model_meta(result, train, X["train"].shape[1], n_classes, categorical)  # as train's
    save_gbdt(result.estimator, meta, out / GBDT_FILE)
    return {"file": GBDT_FILE, "best_epoch": result.best_epoch, "val_loss": result.best_val_loss}


def run(
    features_dir: str | Path,
    spec: list[dict[str, Any]],
    out_dir: str | Path,
    params: Params,
    *,
    tune_top_k: int = 0,
) -> list[dict[str, Any]]:
    """Train every member of ``spec`` (plus the ``tune_top_k`` best tuning trials) and write
    ``out_dir`` as a whole: one folder per member and ``members.json``. Every member's params
    are checked before the first one trains.

    Raises:
        ConfigError: a member's params are invalid, or the tuning trials are missing.
    """
    features = Path(features_dir)
    trials = tuning_members(params, features, tune_top_k) if tune_top_k else []
    members = list(spec) + trials
    trains = [member_train(params.train, m.get("overrides", {}), m["name"]) for m in members]
    written = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for member, train in zip(members, trains, strict=True):
            started = time.monotonic()
            logger.info(
                "member %s (%s): training %s", member["name"], member["source"], train.model
            )
            result = train_member(train, member["seed"], features, params, tmp / member["name"])
            seconds = time.monotonic() - started
            logger.info(
                "member %s: best epoch %d, val_loss %.4f (%.1f s)",
                member["name"],
                result["best_epoch"],
                result["val_loss"],
                seconds,
            )
            written.append(
                {
                    "name": member["name"],
                    "source": member["source"],
                    "family": train.model,
                    "file": f"{member['name']}/{result['file']}",
                    "seed": member["seed"],
                    "overrides": member.get("overrides", {}),
                    "best_epoch": result["best_epoch"],
                    "val_loss": result["val_loss"],
                    "seconds": round(seconds, 2),
                }
            )
        write_json(tmp / MEMBERS_FILE, written)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stages.train.members --features DIR --spec FILE --out DIR`` (module doc)."""
    parser = build_parser("train.members", "Train the ensemble's extra members.")
    parser.add_argument("--features", required=True, help="features folder (train, val)")
    parser.add_argument(
        "--spec", required=True, help="JSON list of {name, source, overrides, seed}"
    )
    parser.add_argument("--out", required=True, help="folder: <name>/model.* + members.json")
    parser.add_argument("--tune-top-k", type=int, default=0, help="add the K best tuning trials")

    def body(args: argparse.Namespace, params: Params) -> None:
        spec = read_spec(args.spec)
        run(args.features, spec, args.out, params, tune_top_k=args.tune_top_k)

    return run_main("train.members", parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
