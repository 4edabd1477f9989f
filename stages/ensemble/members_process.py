"""Who the extra members are (from ``ensemble.members``), and training them in one
``python -m stages.train.members`` process: train's own code, and no stage imports another.

The spec is checked here, before anything trains: a family that cannot train on these params
(cnn without ``train.image_shape``, rnn without ``train.rnn.sequence_length``), a member that
would repeat train's model (its seed, its family), a name used twice, all fail in a second
with the field to change.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stages.common.config import SECTIONS, Params, TrainParams
from stages.common.errors import ConfigError, PipelineError

logger = logging.getLogger(__name__)

MODULE = "stages.train.members"
MEMBERS_FILE = "members.json"  # the process's list of what it trained (stages.train.members)
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# what a family needs set in the train section before it can train at all, and where
_FAMILY_NEEDS = {
    "cnn": ("image_shape", "train.image_shape: [channels, height, width]"),
    "rnn": ("rnn.sequence_length", "train.rnn.sequence_length: the steps in each row's window"),
}


def member_specs(params: Params) -> list[dict[str, Any]]:
    """The spec of the extra members ``ensemble.members`` asks for (seeds, then families), in
    ``stages.train.members``' format; the tuning trials are looked up by that process.

    Raises:
        ConfigError: a member repeats train's model or another member, or a family cannot
            train with these params; the message names the field under ensemble.members.
    """
    members, base = params.ensemble.members, params.base.seed
    seeds, families = members.seeds, members.families
    if len(set(seeds)) != len(seeds) or len(set(families)) != len(families):
        raise ConfigError(
            f"ensemble.members: seeds {seeds} / families {families} list a value twice "
            "(identical members): list each once"
        )
    if base in seeds:
        raise ConfigError(
            f"ensemble.members.seeds {seeds} holds base.seed {base}: that member is train's "
            "model (member 0) again; list other seeds"
        )
    if params.train.model in families:
        raise ConfigError(
            f"ensemble.members.families {families} holds train.model {params.train.model!r}: "
            "that member is train's model (member 0) again; use ensemble.members.seeds for more "
            "of the same family"
        )
    spec = [{"name": f"seed{s}", "source": f"seed:{s}", "overrides": {}, "seed": s} for s in seeds]
    for family in families:
        _check_family(params.train, family, families)
        spec.append(
            {
                "name": family,
                "source": f"family:{family}",
                "overrides": {"model": family},
                "seed": base,
            }
        )
    return spec


def _check_family(train: TrainParams, family: str, families: list[str]) -> None:
    try:
        TrainParams.model_validate({**train.model_dump(mode="json"), "model": family})
    except ValidationError as exc:
        need = _FAMILY_NEEDS.get(family)
        what = f"set {need[1]}" if need else "fix the train section"
        problems = "; ".join(e["msg"] for e in exc.errors())
        raise ConfigError(
            f"ensemble.members.families {families}: {family!r} cannot train with this train "
            f"section ({problems}): {what} in params.yaml, or drop {family!r} from "
            "ensemble.members.families"
        ) from None


def member_count(params: Params) -> int:
    """Members in the ensemble: train's model + seeds + families + tuning trials."""
    members = params.ensemble.members
    return 1 + len(members.seeds) + len(members.families) + members.tune_top_k


def train_members(
    features_dir: Path,
    spec: list[dict[str, Any]],
    work_dir: Path,
    params: Params,
    params_file: str | Path | None,
) -> list[dict[str, Any]]:
    """Run ``python -m stages.train.members`` into ``work_dir/members``; its members.json,
    each entry's ``file`` made absolute.

    ``params_file`` is passed through; without one (a caller holding only ``params``), the
    resolved params are written to ``work_dir`` for the process to read.

    Raises:
        PipelineError: the process failed; its own error line is quoted.
    """
    spec_file, out = work_dir / "spec.json", work_dir / "members"
    spec_file.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    if params_file is None:
        params_file = work_dir / "params.yaml"
        raw = {name: getattr(params, name).model_dump(mode="json") for name in SECTIONS}
        Path(params_file).write_text(yaml.safe_dump(raw, sort_keys=False), "utf-8")
    command = [
        sys.executable, "-m", MODULE,
        "--features", str(features_dir), "--spec", str(spec_file), "--out", str(out),
        "--params", str(params_file),
        "--tune-top-k", str(params.ensemble.members.tune_top_k),
    ]  # fmt: skip
    env = dict(os.environ)
    # the process imports stages.train as a module: the project importable from any cwd
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    logger.info("training %d member(s) in %s", len(spec), " ".join(command[1:3]))
    code, tail = _run_forwarding(command, env)
    if code != 0:
        failed = [line for line in tail if "failed:" in line or "Error" in line]
        raise PipelineError(
            f"training the ensemble members failed (python -m {MODULE}, exit {code}): "
            f"{(failed or list(tail) or ['no output'])[-1].strip()}"
        )
    members = json.loads((out / MEMBERS_FILE).read_text(encoding="utf-8"))
    for member in members:
        member["file"] = str(out / member["file"])
    return members


def _run_forwarding(command: list[str], env: dict[str, str]) -> tuple[int, deque[str]]:
    """Run ``command``, its stderr passed on line by line (the last lines kept for the error),
    SIGTERM/SIGINT passed on to it."""
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True) as child:
        forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
        signals = (signal.SIGTERM, signal.SIGINT)
        main = threading.current_thread() is threading.main_thread()  # handlers live there
        previous = {sig: signal.signal(sig, forward) for sig in signals} if main else {}
        try:
            assert child.stderr is not None
            for line in child.stderr:
                sys.stderr.write(line)
                tail.append(line)
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code, tail
