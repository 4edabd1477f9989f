"""Trials of a killed run: each trial records its process and a heartbeat, and
``fail_dead_trials`` (the flow, holding the run lock) marks FAIL the RUNNING trials whose
process is gone (this host) or whose heartbeat stopped (any host), so that they run again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import optuna
from optuna.trial import TrialState

from stages.train.tuning import HEARTBEAT_S, PROCESS_ATTR, known_warnings

logger = logging.getLogger(__name__)


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


def fail_dead_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Mark FAIL the RUNNING trials whose process is gone (this host) or whose heartbeat
    stopped (any host); return them. Call it holding the workspace run lock."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with known_warnings():
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
