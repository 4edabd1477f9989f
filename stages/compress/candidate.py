"""One candidate: built by its method, loaded back from its file, measured on the test split
and judged by the gate. Whatever goes wrong on the way (the method raises, the file does not
load, onnxruntime fails at inference) makes it ``failed`` with the reason: one broken candidate
must not sink the others, nor the stage (register waits on ``compact/``, and compressing is an
optional optimisation that must not stop the champion from being promoted).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.files import NETWORK_FILE, ONNX_MODEL_FILE
from stages.common.config import Params
from stages.compress.gate import FAILED, judge

logger = logging.getLogger(__name__)

METHOD_FILES = {"prune": NETWORK_FILE, "quantize": ONNX_MODEL_FILE, "distill": NETWORK_FILE}
FLOAT_ONNX = "model.float.onnx"  # quantize's float graph, measured beside it, not kept


@dataclass(frozen=True)
class Parent:
    """The judged model: its file, loaded, and measured on the test split."""

    path: Path
    model: Any  # model.predictors.Predictor (or EnsemblePredictor)
    measured: Any  # stages.compress.measure.Measurement


def build(
    method: str,
    parent: Parent,
    data: Any,
    params: Params,
    out: Path,
    meta: dict,
    scratch: Path,
) -> dict[str, Any]:
    """Make one candidate file ``out`` (scratch: a folder for files not kept); returns the
    method's details for the report."""
    from model.nets import select_device
    from stages.compress.fit import fit_config

    cp, seed = params.compress, params.base.seed
    train_params = parent.model.meta.get("train_params") or {}
    device = select_device(params.base.device)
    if method == "prune":
        from stages.compress.prune import prune

        config = fit_config(train_params, cp.finetune_epochs, cp.lr, seed, device)
        meta = {**meta, "prune_fraction": cp.prune_fraction}
        return prune(parent.path, data, cp.prune_fraction, config, out, meta)
    if method == "quantize":
        from stages.compress.quantize import quantize

        return quantize(
            parent.path, data.train.X, cp.calibration_rows, seed, out, meta, scratch / FLOAT_ONNX
        )
    from stages.compress.distill import distill

    config = fit_config(train_params, cp.distill_epochs, cp.lr, seed, device)
    return distill(parent.model, data, cp, config, out, meta)


def candidate(
    method: str, parent: Parent, data: Any, params: Params, folder: Path, shown: str
) -> dict[str, Any]:
    """Build, measure and judge one candidate in ``folder/<method>/``; ``failed`` (its folder
    removed) when any step raises."""
    cp = params.compress
    path = folder / method / METHOD_FILES[method]
    path.parent.mkdir(parents=True)
    meta = {
        "method": method,
        "parent_file": parent.path.name,
        "parent_sha256": parent.measured.sha256,
        "parent_family": parent.model.family,
    }
    step = "build"
    try:
        with tempfile.TemporaryDirectory(prefix="compress-scratch-") as scratch:
            started = time.perf_counter()
            details = build(method, parent, data, params, path, meta, Path(scratch))
            details["build_s"] = round(time.perf_counter() - started, 3)
            step = "load and measure"
            found = _measure(path, data, cp, shown)
            float_path = Path(scratch) / FLOAT_ONNX
            if float_path.is_file():
                from stages.compress.quantize import versus_float

                float_found = _measure(float_path, data, cp, "float ONNX (not kept)")
                details |= versus_float(float_found, found, cp.metric)
    except Exception as exc:  # noqa: BLE001 - one method failing must not sink the others
        logger.exception("compress: %s: could not %s its candidate", method, step)
        shutil.rmtree(path.parent, ignore_errors=True)  # no half-written or unusable file kept
        return {
            "status": FAILED,
            "reason": f"could not {step} it: {type(exc).__name__}: {exc}",
            "file": None,
        }
    return {**found.record(), **judge(parent.measured, found, cp), "details": details}


def _measure(path: Path, data: Any, cp: Any, shown: str) -> Any:
    from model.predictors import load_predictor
    from stages.compress.measure import measure

    model = load_predictor(path)
    return measure(model, path, data.test, (cp.row_repeats, cp.batch_repeats), shown)
