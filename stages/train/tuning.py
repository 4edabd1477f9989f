"""Hyper-parameter search for the train stage: the Optuna study, its space and the write-back.

One study per dataset and model family, named from ``ingest.source``, ``train.model`` and a
hash of the feature files a trial reads (train, val, the fitted preprocessor: never test), and
kept in ``tune.storage`` (env ``TUNE_STORAGE`` wins), so that a new data version starts a new
study and ``make tune`` again on the same data resumes the old one. Trials run one per process
(``stages.train.trial``); the orchestration is ``flows/tune.py``. This module has no torch.

Processes share the study through the storage only: each one builds the sampler and pruner
itself (``make_sampler``, ``make_pruner``): TPE and random seeded per trial (one seed in every
process would draw the same "random" values), the grid with one seed (it fixes its order). A
trial records its host and pid and a heartbeat; ``fail_dead_trials`` marks the RUNNING trials
of a killed run FAIL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from pydantic import ValidationError

from model.files import PREPROCESSOR_FILE
from stages.common.config import SearchRange, TrainParams, describe_errors, parse_params
from stages.common.errors import ConfigError, PipelineError
from stages.common.io import write_text
from stages.common.redact import redact_url

logger = logging.getLogger(__name__)

STORAGE_ENV = "TUNE_STORAGE"  # overrides params tune.storage
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow run of the study
VALUES_ATTR = "train_values"  # trial user attr: the values the trial trained with (rounded)
PROCESS_ATTR = "process"  # trial user attr: [host, pid, process start time]
RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow (child) run
READ_FILES = ("train.parquet", "val.parquet", PREPROCESSOR_FILE)  # what a trial reads
HEARTBEAT_S, STALE_AFTER_S = 10, 60  # a trial not heard from for a minute is dead
SIGNIFICANT = 4  # float values are rounded to this many digits: params.yaml stays readable
# the median pruner compares curves from a tenth of the epochs on (at least epoch 2): a slow
# starter (a small learning rate) is not judged on its first epochs
WARMUP_FRACTION, MIN_WARMUP_EPOCHS = 0.1, 2
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# --- the study: name, storage, sampler, pruner -------------------------------------------


def features_hash(features_dir: str | Path) -> str:
    """A short hash of the files a trial reads: the study belongs to this data version."""
    digest = hashlib.md5()
    for name in READ_FILES:
        path = Path(features_dir) / name
        if not path.is_file():
            raise PipelineError(
                f"{path} not found: run the pipeline first (make run) so that "
                "the features stage has written the splits tuning reads"
            )
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:10]


def study_name(source: str, family: str, features_dir: str | Path) -> str:
    """``<source>-<family>-<data hash>``, e.g. ``sklearn-breast_cancer-mlp-3f2a9c01de``."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", redact_url(source).replace("***", "")).strip("-")
    return f"{slug[-60:]}-{family}-{features_hash(features_dir)}"


def resolve_storage(configured: str, repo: str | Path = ".") -> str:
    """The study storage URL: env ``TUNE_STORAGE``, else ``configured``; a relative sqlite
    path is taken from ``repo`` and its folder created."""
    url = os.environ.get(STORAGE_ENV) or configured
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = (Path(repo) / url.removeprefix("sqlite:///")).resolve()
        url = f"sqlite:///{path}"
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url


def quiet_optuna() -> None:
    """Our own log lines say what happens: no Optuna INFO line per trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextmanager
def _known_warnings() -> Iterator[None]:
    # The heartbeat and constant_liar are "experimental" (since Optuna 2.9 and 2.8), and a
    # heartbeat outside study.optimize is warned about: we record it ourselves (start_heartbeat)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The RDB storage, with heartbeats (stale trials of a killed run can be failed)."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several trial processes write at once: wait for SQLite's lock instead of failing
        engine_kwargs = {"connect_args": {"timeout": 60}}
    with _known_warnings():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=STALE_AFTER_S,
        )


class _AskTellGridSampler(optuna.samplers.GridSampler):
    # GridSampler.after_trial calls study.stop() once the grid is done, which raises outside
    # study.optimize (we ask and tell); the flow caps the trial count at the grid size instead.
    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def grid_space(space: Mapping[str, SearchRange]) -> dict[str, list[Any]]:
    """Every value of each (discrete) range, choices encoded as Optuna stores them."""
    grid: dict[str, list[Any]] = {}
    for key, search in space.items():
        if search.choices is not None:
            grid[key] = [_encode(choice) for choice in search.choices]
        elif search.integer:
            grid[key] = list(range(int(search.low), int(search.high) + 1, int(search.step or 1)))
        elif search.step is not None:
            count = int((search.high - search.low) / search.step + 1e-9) + 1
            grid[key] = [round(search.low + i * search.step, 12) for i in range(count)]
        else:
            raise ConfigError(f"tune.space: {key} is a continuous range; the grid needs steps")
    return grid


def grid_size(space: Mapping[str, SearchRange]) -> int:
    """How many points the grid sampler visits."""
    size = 1
    for values in grid_space(space).values():
        size *= len(values)
    return size


def make_sampler(
    kind: str, space: Mapping[str, SearchRange], seed: int, trial_index: int = 0
) -> optuna.samplers.BaseSampler:
    """``tpe`` | ``grid`` | ``random`` for the process that runs trial ``trial_index``.

    The grid's order is a shuffle by ``seed`` and trial n takes point n: every process needs
    the same seed. TPE and random draw from ``seed + trial_index``: with one seed, each new
    process would draw the same "random" values.
    """
    if kind == "grid":
        return _AskTellGridSampler(grid_space(space), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed + trial_index)
    # constant_liar: trials running in parallel count as bad so far, so they spread out
    with _known_warnings():
        return optuna.samplers.TPESampler(seed=seed + trial_index, constant_liar=True)


def make_pruner(kind: str, max_epochs: int, trials: int) -> optuna.pruners.BasePruner:
    """``median`` | ``hyperband`` | ``none``; the median waits for a quarter of the trials
    (at most 5) to finish, and compares from a tenth of ``max_epochs`` on."""
    if kind == "median":
        startup = min(5, max(1, trials // 4))
        warmup = max(MIN_WARMUP_EPOCHS, int(max_epochs * WARMUP_FRACTION))
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1))
    return optuna.pruners.NopPruner()


def open_study(
    name: str,
    storage: optuna.storages.BaseStorage | str,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> optuna.Study:
    """Create the study (minimising val loss) or load it when it exists."""
    return optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
        load_if_exists=True,
    )


# --- one trial's values ------------------------------------------------------------------


def current_values(train: TrainParams, space: Mapping[str, SearchRange]) -> dict[str, Any] | None:
    """The values ``train`` has for the keys of ``space``, as Optuna stores them; None when
    one of them lies outside its range (it cannot be a trial of this space)."""
    data, values = train.model_dump(mode="json"), {}
    for key, search in space.items():
        value = data
        for part in key.split("."):
            value = value[part]
        if search.choices is not None:
            if value not in search.choices:
                return None
            values[key] = _encode(value)
        elif not search.low <= value <= search.high:
            return None
        else:
            values[key] = value
    return values


def enqueue_current(
    study: optuna.Study, train: TrainParams, space: Mapping[str, SearchRange]
) -> bool:
    """Make the params as they are the first trial of a new study: the best trial then beats
    them or is them, and the write-back never trades them for worse (on val). Not for the grid
    (it visits its own points) nor a study that has trials."""
    values = current_values(train, space)
    if values is None or study.get_trials(deepcopy=False):
        return False
    study.enqueue_trial(values, user_attrs={"baseline": True})
    return True


def _encode(choice: Any) -> Any:
    # Optuna stores None/bool/int/float/str choices only: a list ([64, 32]) becomes its JSON
    return (
        choice
        if choice is None or isinstance(choice, (bool, int, float, str))
        else (json.dumps(choice))
    )


def suggest(trial: optuna.Trial, space: Mapping[str, SearchRange]) -> dict[str, Any]:
    """Ask ``trial`` for a value of each range; choices come back decoded (lists as lists)."""
    values: dict[str, Any] = {}
    for key, search in space.items():
        if search.choices is not None:
            decoded = {_encode(choice): choice for choice in search.choices}
            values[key] = decoded[trial.suggest_categorical(key, list(decoded))]
        elif search.integer:
            step = int(search.step or 1)
            values[key] = trial.suggest_int(
                key, int(search.low), int(search.high), step=step, log=search.log
            )
        else:
            values[key] = trial.suggest_float(
                key, search.low, search.high, step=search.step, log=search.log
            )
    return values


def _rounded(value: Any) -> Any:
    return float(f"{value:.{SIGNIFICANT}g}") if isinstance(value, float) else value


def apply_values(
    train: TrainParams, values: Mapping[str, Any], max_epochs: int | None = None
) -> tuple[TrainParams, dict[str, Any]]:
    """``train`` with ``values`` set (dotted keys reach sub-sections) and ``max_epochs`` capped.

    Returns the checked params and the values as applied (floats rounded to ``SIGNIFICANT``
    digits: what the trial trains with and what the write-back writes).

    Raises:
        ConfigError: the combination is not valid (e.g. n_heads not dividing d_token).
    """
    data = train.model_dump(mode="json")
    applied = {key: _rounded(value) for key, value in values.items()}
    for key, value in applied.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    if max_epochs is not None:
        data["max_epochs"] = min(data["max_epochs"], max_epochs)
    try:
        return TrainParams.model_validate(data), applied
    except ValidationError as exc:
        raise ConfigError(
            "these values do not make valid train params: "
            + "; ".join(describe_errors(exc, prefix="train"))
        ) from exc


# --- trials of a killed run --------------------------------------------------------------


def process_identity() -> list[Any]:
    """``[host, pid, start time]`` of this process (a trial records it on its trial)."""
    import psutil

    return [socket.gethostname(), os.getpid(), psutil.Process().create_time()]


def _gone(identity: Any) -> bool:
    import psutil

    try:
        host, pid, started = identity
        if host != socket.gethostname():
            return False  # another machine's trial: its heartbeat tells
        process = psutil.Process(int(pid))
        # a zombie is gone too: a killed run's trial whose new parent does not reap it
        return (
            abs(process.create_time() - float(started)) > 0.01
            or process.status() == psutil.STATUS_ZOMBIE
        )
    except (psutil.Error, TypeError, ValueError):
        return True


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` (its warning that heartbeats belong to ``optimize`` silenced)."""
    with _known_warnings():
        return study.ask()


def fail_dead_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Mark FAIL the RUNNING trials whose process is gone (this host) or whose heartbeat
    stopped (any host); return them. Call it holding the workspace run lock."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with _known_warnings():
        optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _gone(trial.user_attrs.get(PROCESS_ATTR)):
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    still = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    failed = [t for t in study.get_trials(deepcopy=False) if t.number in before - still]
    if failed:
        logger.warning(
            "trials %s were left RUNNING by a killed run: marked FAIL", [t.number for t in failed]
        )
    return failed


def start_heartbeat(storage: optuna.storages.RDBStorage, trial_id: int) -> threading.Event:
    """Record the trial's heartbeat every ``HEARTBEAT_S`` s until the returned event is set.

    ``study.optimize`` does this itself; an ask/tell trial has to.
    """
    done = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # a busy store: the next beat may get through
                logger.debug("heartbeat of trial %d not recorded: %s", trial_id, exc)
            if done.wait(HEARTBEAT_S):
                return

    threading.Thread(target=beat, name="tune-heartbeat", daemon=True).start()
    return done


# --- results and write-back ----------------------------------------------------------------


def count_states(study: optuna.Study) -> dict[str, int]:
    """Trials per state name (``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING``, ...)."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def finished_trials(study: optuna.Study) -> int:
    """COMPLETE + PRUNED: the trials that count towards the target."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def started_trials(study: optuna.Study) -> int:
    """Trials asked so far (an enqueued, WAITING trial is the next one asked)."""
    return len([t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The COMPLETE trial with the lowest validation loss (None before the first one)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: t.value) if complete else None


def _yaml() -> Any:
    from ruamel.yaml import YAML

    rt = YAML()  # round trip: comments, order and flow style kept
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a long commented line
    rt.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    rt.representer.add_representer(float, _represent_float)
    return rt


def _represent_float(representer: Any, value: float) -> Any:
    # YAML 1.1 (PyYAML, which loads params.yaml) reads 1e-05 as a string: write 1.0e-05
    text = repr(value)
    mantissa, _, exponent = text.partition("e")
    if exponent:
        mantissa = mantissa if "." in mantissa else f"{mantissa}.0"
        exponent = exponent if exponent[0] in "+-" else f"+{exponent}"
        text = f"{mantissa}e{exponent}"
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _node_value(value: Any) -> Any:
    if isinstance(value, list):
        from ruamel.yaml.comments import CommentedSeq

        seq = CommentedSeq(value)
        seq.fa.set_flow_style()  # [128, 64], as params.yaml writes lists
        return seq
    return value


def write_back(
    params_file: str | Path, family: str, values: Mapping[str, Any], read_text: str | None = None
) -> dict[str, tuple[Any, Any]]:
    """Write ``values`` (dotted train keys) and ``train.model: family`` into ``params_file``.

    Comments, order and layout are kept (ruamel round trip); the file is checked like any
    params load before it is replaced, atomically. Returns ``{key: (old, new)}`` for what
    changed.

    Raises:
        PipelineError: the file is not what ``read_text`` says it was when tuning started
            (edited meanwhile: nothing written), or the result would not load.
    """
    path = Path(params_file)
    text = path.read_text(encoding="utf-8")
    if read_text is not None and text != read_text:
        raise PipelineError(
            f"{path} changed while tuning ran: not overwritten; set these train values by "
            f"hand: model: {family}, " + ", ".join(f"{k}: {v}" for k, v in values.items())
        )
    from ruamel.yaml.comments import CommentedMap

    rt = _yaml()
    doc = rt.load(text)
    train = doc.setdefault("train", CommentedMap())
    changes: dict[str, tuple[Any, Any]] = {}
    for key, value in {"model": family, **values}.items():
        node = train
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # a sub-section params.yaml leaves to its defaults
                node[part] = CommentedMap()
            node = node[part]
        old = node.get(leaf)
        if (list(old) if isinstance(old, list) else old) != value:
            changes[key] = (list(old) if isinstance(old, list) else old, value)
            node[leaf] = _node_value(value)
    if not changes:
        return changes
    import io

    out = io.StringIO()
    rt.dump(doc, out)
    parse_params(yaml.safe_load(out.getvalue()), source=str(path))  # never write a bad file
    write_text(path, out.getvalue())
    return changes
