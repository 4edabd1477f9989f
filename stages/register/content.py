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
- an ONNX model (``model.int8.onnx``, a compact model): its graph serialized with its
  ``metadata_props`` cleared, plus the architecture fields of the meta held there (as for a
  network), not the file: the meta also carries every train param of the parent and its file's
  sha256, which change with a re-run that leaves the parent's network identical (e.g.
  ``train.checkpoint_every_steps``); the quantizer's graph is deterministic for one network.

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
MAX_TAG_VALUE = 5000  # characters of a model version tag value (MLflow's SQL store column)
SHA_PREFIX = 12  # hex digits of a member's sha256 kept when the full list is too long
MEMBERS_NOTE_TAG = "ensemble.members_note"  # set when ensemble.members was shortened
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
        if "onnx_meta" in checkpoint:
            _add_architecture(add, checkpoint["onnx_meta"], at)
        return
    _add_architecture(add, checkpoint, at)
    if "estimator" in checkpoint:
        from model.gbdt import estimator_bytes

        add(f"{at}estimator", estimator_bytes(checkpoint["estimator"]))
    for name, tensor in sorted(checkpoint.get("state_dict", {}).items()):
        values = tensor.detach().cpu().contiguous()
        add(
            f"{at}tensor {name} {values.dtype} {tuple(values.shape)}",
            values.view(-1).view(_byte_dtype()).numpy().tobytes(),
        )


def _add_architecture(add: Callable[[str, bytes], None], meta: dict[str, Any], at: str) -> None:
    # What the model is built as; not how it was trained (epochs, checkpointing, devices).
    train = meta.get("train_params") or {}
    architecture = {
        key: train.get(key)
        for key in ("model", "hidden_sizes", "channels", "image_shape", "dropout")
    }
    add(
        f"{at}architecture",
        json.dumps(
            {
                **architecture,
                "n_features": meta.get("n_features"),
                "n_classes": meta.get("n_classes"),
            },
            sort_keys=True,
        ).encode(),
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
        return onnx_checkpoint(path)
    if predictor is None:
        from model.predictors import load_predictor

        predictor = load_predictor(path)
    return _checkpoint(predictor, path)


def onnx_checkpoint(path: Path) -> dict[str, Any]:
    """An ONNX model file as :func:`content_hash` reads it: the graph serialized
    deterministically with its ``metadata_props`` cleared, and the meta held there.

    Raises:
        DataError: not a readable ONNX file, or its meta is not JSON.
    """
    import onnx

    from model.onnx_model import META_KEY

    try:
        proto = onnx.load(str(path), load_external_data=False)
        props = {prop.key: prop.value for prop in proto.metadata_props}
        meta = json.loads(props[META_KEY]) if META_KEY in props else None
    except Exception as exc:  # onnx raises protobuf's DecodeError and others
        raise DataError(
            f"cannot read the ONNX model to hash it ({type(exc).__name__}: {exc}); re-run "
            "the compress stage (dvc repro -f compress)",
            file=str(path),
            rule="onnx_model",
        ) from exc
    del proto.metadata_props[:]
    graph = proto.SerializeToString(deterministic=True)
    return {"onnx": graph} | ({"onnx_meta": meta} if isinstance(meta, dict) else {})


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
    return members_tags(spec.get("members", [])) | {
        "ensemble.method": str(spec.get("method")),
        "ensemble.variants": VARIANTS_NOT_ATTACHED,
    }


def members_tags(members: list[dict[str, Any]]) -> dict[str, str]:
    """``ensemble.members``: a JSON list of each member's name, source, family and sha256, that
    fits MLflow's tag value limit (:data:`MAX_TAG_VALUE`; a longer one would fail
    ``register_model`` after the upload). Too long (about 30 members and more): names and
    sha256 prefixes only, then as many members as fit, with ``ensemble.members_note`` saying
    so; the full list is the model's ``ensemble.json``."""
    full = [{key: m.get(key) for key in ("name", "source", "family", "sha256")} for m in members]
    value = _dumps(full)
    if len(value) <= MAX_TAG_VALUE:
        return {MEMBERS_TAG: value}
    short = [{"name": m["name"], "sha256": str(m["sha256"])[:SHA_PREFIX]} for m in full]
    kept = len(short)
    while len(value := _dumps(short[:kept])) > MAX_TAG_VALUE:
        kept -= 1
    what = f"names and sha256 prefixes ({SHA_PREFIX} hex)"
    if kept < len(short):
        what = f"the first {kept} of {len(short)} members, {what}"
    return {
        MEMBERS_TAG: value,
        MEMBERS_NOTE_TAG: f"{what}: the full list ({len(full)} members, with sources, "
        f"families and sha256) is too long for a tag ({len(_dumps(full))} > {MAX_TAG_VALUE} "
        f"characters); read it from {ENSEMBLE_SPEC} in the model's {ENSEMBLE_FILE}",
    }


def _dumps(members: list[dict[str, Any]]) -> str:
    return json.dumps(members, separators=(",", ":"))


def model_code() -> dict[str, bytes]:
    """The code that ships with the model (servable.copy_model_code): the model/ package,
    sources only (bytecode differs between Python builds, not the model)."""
    import model

    package = Path(model.__file__).parent
    return {
        str(f.relative_to(package.parent)): f.read_bytes() for f in sorted(package.rglob("*.py"))
    }
