"""What a model is, as a sha256 (tag ``model.content_hash``): two models with the same hash
answer alike, so register finds an identical one again instead of adding a version.

Hashed per kind of model file (:func:`model_checkpoint` reads it, :func:`content_hash` hashes):

- a network (``model.pt``): its architecture and weights, not the file (``torch.save`` embeds
  the file name; the epoch/val-loss records do not change the model);
- a gbdt (``model.skops``): the fitted estimator's pickle bytes (the skops file is not
  byte-stable: it names its arrays by object id);
- an ensemble (``model.ensemble.zip``): its spec (``ensemble.json``: method, weights, stacking
  coefficients, the members' names, sources and families; not the members' file sha256, which
  changes with a re-saved checkpoint) and each member's content, hashed the same way in turn,
  so that a rebuilt identical ensemble is identical;
- an ONNX model (``model.int8.onnx``, a compact model): its file bytes, which hold its meta
  (the quantizer's output is deterministic for the same network).

The fitted preprocessor's bytes, the input contract (None: left out, the network hash) and the
model code that ships with it are hashed with each.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.files import ENSEMBLE_FILE
from serving.model import MEMBERS_TAG  # /version lists the members from it
from stages.common.errors import DataError

ENSEMBLE_SPEC = "ensemble.json"  # inside model.ensemble.zip (model.ensemble.write_ensemble)
VARIANTS_NOT_ATTACHED = (
    "not attached: export's ONNX/int8 variants in the run are copies of train's single model, "
    "not of this ensemble; the compress stage's compact model is its smaller copy"
)
_VOLATILE_MEMBER_KEYS = ("sha256", "file")  # how a member file was written, not what it is


def content_hash(
    checkpoint: dict[str, Any],
    preprocessor_bytes: bytes,
    contract: dict[str, Any] | None,
    code: dict[str, bytes],
) -> str:
    """What the model is, as a sha256 (see the module doc). ``checkpoint``: what
    :func:`model_checkpoint` reads of a model file (a network checkpoint dict works too);
    ``code``: relative path -> bytes of the model code that ships with it."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}:{len(data)}:".encode())
        digest.update(data)

    _add_model(add, checkpoint)
    add("preprocessor", preprocessor_bytes)
    if contract is not None:
        add("contract", json.dumps(contract, sort_keys=True, default=str).encode())
    for path, data in sorted(code.items()):
        add(f"code {path}", data)
    return digest.hexdigest()


def _add_model(add: Callable[[str, bytes], None], checkpoint: dict[str, Any], at: str = "") -> None:
    # ``at`` prefixes the labels of an ensemble member; empty for the model itself, so the
    # hash of a single network or gbdt is the one earlier versions were tagged with.
    if "ensemble" in checkpoint:
        add(f"{at}ensemble", _json(checkpoint["ensemble"]))
        for name, member in checkpoint["members"]:
            _add_model(add, member, f"{at}member {name} ")
        return
    if "onnx" in checkpoint:
        add(f"{at}onnx", checkpoint["onnx"])
        return
    train = checkpoint["train_params"]
    architecture = {
        key: train.get(key)
        for key in ("model", "hidden_sizes", "channels", "image_shape", "dropout")
    }
    add(
        f"{at}architecture",
        json.dumps(
            {
                **architecture,
                "n_features": checkpoint["n_features"],
                "n_classes": checkpoint["n_classes"],
            },
            sort_keys=True,
        ).encode(),
    )
    if "estimator" in checkpoint:
        from model.gbdt import estimator_bytes

        add(f"{at}estimator", estimator_bytes(checkpoint["estimator"]))
    for name, tensor in sorted(checkpoint.get("state_dict", {}).items()):
        values = tensor.detach().cpu().contiguous()
        add(
            f"{at}tensor {name} {values.dtype} {tuple(values.shape)}",
            values.view(-1).view(_byte_dtype()).numpy().tobytes(),
        )


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def model_checkpoint(path: Path, predictor: Any = None) -> dict[str, Any]:
    """What :func:`content_hash` reads of the model file at ``path`` (``predictor``: it,
    loaded already)."""
    if path.suffix == ".onnx":
        return {"onnx": path.read_bytes()}
    if predictor is None:
        from model.predictors import load_predictor

        predictor = load_predictor(path)
    return _checkpoint(predictor, path)


def _checkpoint(predictor: Any, path: Path | None = None) -> dict[str, Any]:
    """A loaded model's metadata and weights/trees; an ensemble's spec and its members'."""
    if predictor.family == "ensemble":
        spec = ensemble_spec(path) if path is not None else dict(predictor.meta)
        for member in spec.get("members", []):
            for key in _VOLATILE_MEMBER_KEYS:
                member.pop(key, None)
        return {
            "ensemble": spec,
            "members": [(name, _checkpoint(member)) for name, member in predictor.members],
        }
    if predictor.family == "onnx":  # a member (or a caller) without the file: its meta
        return {"onnx": _json(predictor.meta)}
    if predictor.is_network:
        return {**predictor.meta, "state_dict": predictor.module.state_dict()}
    return {**predictor.meta, "estimator": predictor.estimator}


def ensemble_spec(path: Path) -> dict[str, Any]:
    """``ensemble.json`` of a ``model.ensemble.zip`` (method, weights, members...).

    Raises:
        DataError: not a readable ensemble file.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read(ENSEMBLE_SPEC))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise DataError(
            f"cannot read {ENSEMBLE_SPEC} in the ensemble file ({type(exc).__name__}: {exc}); "
            "re-run the ensemble stage (dvc repro -f ensemble)",
            file=str(path),
            rule="ensemble_spec",
        ) from exc


def ensemble_tags(path: Path) -> dict[str, str]:
    """The version tags of an ensemble (none for another model file): ``ensemble.members``
    (JSON: each member's name, source, family, sha256) and ``ensemble.method``."""
    if path.name != ENSEMBLE_FILE:
        return {}
    spec = ensemble_spec(path)
    members = [
        {key: member.get(key) for key in ("name", "source", "family", "sha256")}
        for member in spec.get("members", [])
    ]
    return {
        MEMBERS_TAG: json.dumps(members, separators=(",", ":")),
        "ensemble.method": str(spec.get("method")),
        "ensemble.variants": VARIANTS_NOT_ATTACHED,
    }


def model_code() -> dict[str, bytes]:
    """The code that ships with the model (servable.copy_model_code): the model/ package,
    sources only (bytecode differs between Python builds, not the model)."""
    import model

    package = Path(model.__file__).parent
    return {
        str(f.relative_to(package.parent)): f.read_bytes() for f in sorted(package.rglob("*.py"))
    }
