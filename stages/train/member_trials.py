"""The ensemble's tuning-trial members: the ``ensemble.members.tune_top_k`` best COMPLETE
trials of the current ``make tune`` study, as member specs for ``stages.train.members``.

Apart from the member training (``members.py``) because it reads Optuna's storage, not the
data: the study is found by the name ``tuning`` gives these params and data, so a change of
data or search settings points at another (perhaps empty) study and fails here, clearly,
before anything trains.
"""

from __future__ import annotations

from pathlib import Path

from stages.common.config import Params
from stages.common.errors import ConfigError


def tuning_members(params: Params, features: Path, k: int, repo: str | Path = ".") -> list[dict]:
    """The ``k`` best COMPLETE trials of the current study as members ``trial<number>``.

    The study is the one ``make tune`` runs for these params and data (``tuning.study_name``:
    the source, ``train.model``, the train/val/preprocessor files, the search settings), in
    ``tune.storage`` (env ``TUNE_STORAGE`` wins); each member trains with the values its
    trial was tried with, for ``train.max_epochs`` (not ``tune.max_epochs``: as train would).

    Raises:
        ConfigError: no such study, or fewer than ``k`` complete trials in it.
    """
    import optuna
    from optuna.trial import TrialState

    from stages.common.redact import redact_url
    from stages.train import tuning

    family = params.train.model
    name = tuning.study_name(
        params.ingest.source, family, features, tuning.study_settings(params, family)
    )
    url = tuning.resolve_storage(params.tune.storage, repo)
    fix = "run `make tune` for the current data and params, or lower ensemble.members.tune_top_k"
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(
            f"ensemble.members.tune_top_k is {k} but {redact_url(url)} holds no study yet: {fix}"
        )
    tuning.quiet_optuna()
    try:
        study = optuna.load_study(study_name=name, storage=tuning.open_storage(url))
    except KeyError:
        raise ConfigError(
            f"ensemble.members.tune_top_k is {k} but there is no study {name} (these data and "
            f"settings) in {redact_url(url)}: {fix}"
        ) from None
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if tuning.VALUES_ATTR in t.user_attrs
    ]
    if len(complete) < k:
        raise ConfigError(
            f"ensemble.members.tune_top_k is {k} but study {name} has {len(complete)} COMPLETE "
            f"trial(s): {fix}"
        )
    best = sorted(complete, key=lambda t: (t.value, t.number))[:k]
    return [
        {
            "name": f"trial{t.number}",
            "source": f"trial:{t.number}",
            "overrides": {"model": family, **t.user_attrs[tuning.VALUES_ATTR]},
            "seed": params.base.seed,
        }
        for t in best
    ]
