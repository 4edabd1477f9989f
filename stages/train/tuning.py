"""Hyper-parameter search for the train stage: the Optuna study, its sampler and pruner.

One study per data version and search: its name joins ``ingest.source``, the family tuned, a
hash of the feature files a trial reads (train, val, the fitted preprocessor: never test) and a
hash of the study's settings (``study_settings``: the family's space, the sampler, the pruner,
``tune.max_epochs``, ``base.seed`` and the train values the space leaves fixed). New data or a
new search (an edited space, another sampler, a different ``batch_size``) starts a new study;
``make tune`` again with both unchanged resumes the old one, and the write-back (which changes
only values inside the space) keeps it. Studies live in ``tune.storage`` (env ``TUNE_STORAGE``
wins). Trials run one per process (``stages.train.trial``); the orchestration is
``flows/tune.py``. This module has no torch.

Processes share the study through the storage only: each one builds the sampler and pruner
itself (``make_sampler``, ``make_pruner``), TPE and random seeded per trial (one seed in every
process would draw the same "random" values). The grid's points are enqueued by the flow
(``queue_grid_points``), so a point whose trial failed or was killed runs again and none runs
twice. A trial records its host and pid and a heartbeat; ``tune_liveness.fail_dead_trials`` marks
the RUNNING trials of a killed run FAIL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from model.files import PREPROCESSOR_FILE
from stages.common.config import Params, SearchRange
from stages.common.errors import PipelineError
from stages.common.redact import redact_url
from stages.train.tune_space import apply_values as apply_values  # bench/tune.py uses it
from stages.train.tune_space import grid_space
from stages.train.tune_space import suggest as suggest  # bench/tune.py uses it

logger = logging.getLogger(__name__)

STORAGE_ENV = "TUNE_STORAGE"  # overrides params tune.storage
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow run of the study
SETTINGS_ATTR = "settings"  # study user attr: study_settings (what its name hashes)
VALUES_ATTR = "train_values"  # trial user attr: the values the trial trained with (rounded)
PROCESS_ATTR = "process"  # trial user attr: [host, pid, process start time]
RUN_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow (child) run
READ_FILES = ("train.parquet", "val.parquet", PREPROCESSOR_FILE)  # what a trial reads
HEARTBEAT_S, STALE_AFTER_S = 10, 60  # a trial not heard from for a minute is dead
# the median pruner compares curves from a tenth of the epochs on (at least epoch 2): a slow
# starter (a small learning rate) is not judged on its first epochs
WARMUP_FRACTION, MIN_WARMUP_EPOCHS = 0.1, 2
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# train fields that change how a trial runs, not what it learns: left out of the study's identity
RUNTIME_FIELDS = ("data_on_device", "device_memory_fraction", "checkpoint_every_steps")
FAMILY_SECTIONS = ("transformer", "rnn", "gbdt")  # another family's section: not this study's


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


def study_settings(params: Params, family: str) -> dict[str, Any]:
    """What a study's trials depend on besides the data (JSON): ``tune.space.<family>``,
    ``tune.sampler``, ``tune.pruner``, ``tune.max_epochs``, ``base.seed`` and ``train`` outside
    the space (less ``RUNTIME_FIELDS`` and the other families' sections)."""
    space = params.tune.space.get(family) or {}
    train = params.train.model_dump(mode="json")
    train["model"] = family
    for key in space:
        node = train
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    for name in (*RUNTIME_FIELDS, *(s for s in FAMILY_SECTIONS if s != family)):
        train.pop(name, None)
    return {
        f"tune.space.{family}": {
            key: search.model_dump(mode="json", exclude_defaults=True)
            for key, search in sorted(space.items())
        },
        "tune.sampler": params.tune.sampler,
        "tune.pruner": params.tune.pruner,
        "tune.max_epochs": params.tune.max_epochs,
        "base.seed": params.base.seed,
        "train": train,
    }


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short hash of ``study_settings``."""
    return hashlib.md5(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def study_name(
    source: str, family: str, features_dir: str | Path, settings: Mapping[str, Any]
) -> str:
    """``<source>-<family>-<data hash>-<settings hash>``, e.g.
    ``sklearn-breast_cancer-mlp-3f2a9c01de-5be0c2a1``."""
    slug = re.sub(r"[^A-Za-z0-9_.]+", "-", redact_url(source).replace("***", "")).strip("-")
    return f"{slug[-60:]}-{family}-{features_hash(features_dir)}-{settings_hash(settings)}"


def settings_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings that differ (``tune.sampler``, ``train.batch_size``, ...)."""
    changed = [k for k in sorted({*old, *new} - {"train"}) if old.get(k) != new.get(k)]
    old_train, new_train = old.get("train") or {}, new.get("train") or {}
    return changed + [
        f"train.{k}"
        for k in sorted({*old_train, *new_train})
        if old_train.get(k) != new_train.get(k)
    ]


def previous_study(
    storage: optuna.storages.BaseStorage, name: str, settings: Mapping[str, Any]
) -> tuple[str, list[str]] | None:
    """The latest other study of this data and family (the same name up to the settings
    hash), and which settings differ from ``settings``; None when there is none."""
    prefix = name.rsplit("-", 1)[0] + "-"
    others = [
        s
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.study_name.startswith(prefix) and s.study_name != name
    ]
    if not others:
        return None
    latest = max(others, key=lambda s: s._study_id)
    return latest.study_name, settings_changes(latest.user_attrs.get(SETTINGS_ATTR) or {}, settings)


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
def known_warnings() -> Iterator[None]:
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
    with known_warnings():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=STALE_AFTER_S,
        )


class _AskTellGridSampler(optuna.samplers.GridSampler):
    # GridSampler.after_trial calls study.stop() once the grid is done, which raises outside
    # study.optimize (we ask and tell); the flow caps the trial count at the grid size instead.
    # The flow enqueues each point (queue_grid_points); this sampler picks for a trial asked
    # without one (trial n takes point n of its seeded shuffle, as in Optuna).
    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        return None


def make_sampler(
    kind: str, space: Mapping[str, SearchRange], seed: int, trial_index: int = 0
) -> optuna.samplers.BaseSampler:
    """``tpe`` | ``grid`` | ``random`` for the process that runs trial ``trial_index``.

    The grid needs the same seed in every process (it fixes its order). TPE and random draw
    from ``seed + trial_index``: with one seed, each new
    process would draw the same "random" values.
    """
    if kind == "grid":
        return _AskTellGridSampler(grid_space(space), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed + trial_index)
    # constant_liar: trials running in parallel count as bad so far, so they spread out
    with known_warnings():
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


# --- asking and counting ------------------------------------------------------------------


def ask(study: optuna.Study, storage_url: str | None = None) -> optuna.Trial:
    """``study.ask()`` (its warning that heartbeats belong to ``optimize`` silenced).

    On sqlite, one process asks at a time (a file lock beside the database): Optuna takes a
    queued (WAITING) trial with a read, then a write, and sqlite ignores its row lock, so two
    trial processes asking at once could both take the same queued trial (seen in CI: two
    processes trained grid point 0). PostgreSQL's row lock needs no help.
    """
    with _sqlite_ask_lock(storage_url), known_warnings():
        return study.ask()


@contextmanager
def _sqlite_ask_lock(storage_url: str | None) -> Iterator[None]:
    import fcntl

    prefix = "sqlite:///"
    if not storage_url or not storage_url.startswith(prefix):
        yield
        return
    lock_path = Path(storage_url[len(prefix) :] + ".ask.lock")
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
