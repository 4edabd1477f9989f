"""Register stage: the promotion decision on dicts, then the real MLflow registry and aliases."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from stages import evaluate, register
from stages.common.config import Params, RegisterParams
from stages.common.errors import ConfigError, DataError, GateError
from tests.builders import (
    TEST_PARAMS,
    breast_cancer_frame,
    build_trained,
    fresh_run,
    make_params,
)

ROOT = Path(__file__).resolve().parents[2]
NAME = TEST_PARAMS["register"]["model_name"]

# ----------------------------------------------------------------------------- decision core

GATE = RegisterParams(min_metrics={"accuracy": 0.8, "roc_auc": 0.85},
                      max_metrics={"log_loss": 0.6}, compare_metric="f1_macro")
GOOD = {"accuracy": 0.9, "f1_macro": 0.9, "roc_auc": 0.95, "log_loss": 0.3}


def test_first_model_needs_only_the_thresholds() -> None:
    decision = register.decide_promotion(GOOD, None, GATE)

    assert decision.promote and not decision.gate_failed
    assert "no champion" in decision.reason
    assert "accuracy 0.9000 >= 0.8" in decision.reason
    assert "log_loss 0.3000 <= 0.6" in decision.reason


@pytest.mark.parametrize(("champion_f1", "promote", "verdict"), [
    (0.85, True, "is better than the champion's 0.8500"),
    (0.9, True, "is equal to the champion's 0.9000"),
    (0.95, False, "is worse than the champion's 0.9500"),
])
def test_candidate_is_compared_with_the_champion(champion_f1: float, promote: bool,
                                                 verdict: str) -> None:
    decision = register.decide_promotion(GOOD, {**GOOD, "f1_macro": champion_f1}, GATE)

    assert decision.promote is promote and not decision.gate_failed
    assert f"f1_macro 0.9000 {verdict}" in decision.reason


def test_lower_is_better_for_log_loss() -> None:
    params = GATE.model_copy(update={"compare_metric": "log_loss"})

    worse = register.decide_promotion(GOOD, {**GOOD, "log_loss": 0.2}, params)
    better = register.decide_promotion(GOOD, {**GOOD, "log_loss": 0.4}, params)

    assert not worse.promote and "(lower is better)" in worse.reason
    assert better.promote


@pytest.mark.parametrize(("candidate", "failure"), [
    ({**GOOD, "accuracy": 0.7}, "accuracy 0.7000 < min 0.8"),
    ({**GOOD, "log_loss": 0.65}, "log_loss 0.6500 > max 0.6"),
    ({**GOOD, "roc_auc": math.nan}, "roc_auc nan < min 0.85"),
])
def test_below_the_thresholds_fails_the_gate_whatever_the_champion(candidate: dict,
                                                                   failure: str) -> None:
    weak_champion = {k: 0.0 for k in GOOD}

    decision = register.decide_promotion(candidate, weak_champion, GATE)

    assert not decision.promote and decision.gate_failed
    assert decision.reason == f"below the absolute thresholds: {failure}"


def test_unknown_metric_in_params_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"register\.compare_metric: unknown metric 'f1'"):
        register.decide_promotion(GOOD, None, GATE.model_copy(update={"compare_metric": "f1"}))
    with pytest.raises(ConfigError, match=r"register\.min_metrics: unknown metric 'acc'"):
        register.check_register_params(GATE.model_copy(update={"min_metrics": {"acc": 0.5}}))


def test_lineage_tags_are_copied_from_the_run() -> None:
    tags = {"git.commit": "abc", "dvc.data/features.md5": "d41d", "prefect.flow_run_id": "f1",
            "mlflow.user": "me", "device": "cpu"}

    assert register.lineage_from_run(tags, "r1") == {
        "git.commit": "abc", "dvc.data/features.md5": "d41d", "prefect.flow_run_id": "f1",
        "run_id": "r1"}


# ----------------------------------------------------------------------------- the stage

LINEAGE = {"git.commit": "0123abc", "git.dirty": "false", "dvc.data/features.md5": "feedbeef",
           "prefect.flow_run_id": "flow-1"}
LOOSE = {"register": {"min_metrics": {}, "max_metrics": {}}}  # the champion comparison decides


def prepare(root: Path, source: tuple[Path, Path], params: Params,
            degrade: bool = False) -> Path:
    """A pipeline workspace at ``root``: features + model, a train run, evaluate's metrics.

    ``degrade`` zeroes the output layer: every row gets p = 0.5, a much worse model.
    """
    shutil.copytree(source[0], root / "features")
    shutil.copytree(source[1], root / "models")
    if degrade:
        checkpoint = torch.load(root / "models" / "model.pt", weights_only=True)
        state = checkpoint["state_dict"]
        last = [k for k in state if k.endswith(".weight")][-1].removesuffix(".weight")
        state[f"{last}.weight"].zero_()
        state[f"{last}.bias"].zero_()
        torch.save(checkpoint, root / "models" / "model.pt")
    fresh_run(root / "models", params, tags=LINEAGE)
    evaluate.run(root / "features", root / "models", root / "reports" / "eval",
                 root / "reports" / "metrics.json", params)
    return root


def register_args(root: Path, params_file: Path) -> list[str]:
    return ["--features", str(root / "features"), "--model", str(root / "models"),
            "--metrics", str(root / "reports" / "metrics.json"),
            "--out", str(root / "reports" / "registration.json"), "--params", str(params_file)]


def params_file(path: Path, overrides: dict | None = None) -> Path:
    raw = {name: dict(section) for name, section in TEST_PARAMS.items()}
    for name, section in (overrides or {}).items():
        raw[name] = {**raw.get(name, {}), **section}
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def version_by_alias(alias: str) -> mlflow.entities.model_registry.ModelVersion:
    return mlflow.MlflowClient().get_model_version_by_alias(NAME, alias)


def test_first_model_becomes_champion_and_serves_from_a_fresh_process(
        tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())

    assert register.main(register_args(work, params_file(tmp_path / "p.yaml"))) == 0

    record = json.loads((work / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 1
    assert record["reason"].startswith("first model: no champion to compare with; clears")
    assert record["champion_metrics"] is None and record["previous_champion_version"] is None
    evaluated = json.loads((work / "reports" / "metrics.json").read_text())
    assert record["metrics"] == pytest.approx(evaluated, abs=1e-6)  # served == evaluated
    champion = version_by_alias("champion")
    assert int(champion.version) == 1 and champion.run_id == record["run_id"]
    assert champion.tags == {
        **LINEAGE, "run_id": record["run_id"], "promotion.decision": "promoted",
        "promotion.reason": record["reason"],
        **{f"metric.{k}": f"{v:.6f}" for k, v in record["metrics"].items()}}
    assert champion.description.startswith(f"promoted: {record['reason']}")
    run = mlflow.MlflowClient().get_run(record["run_id"])
    assert run.data.tags["promotion.decision"] == "promoted"
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_names() == list(breast_cancer_frame().columns[:-1])
    assert info.signature.outputs.input_names() == ["prediction", "proba_0", "proba_1"]
    assert info.saved_input_example_info is not None

    # served from another directory by a process that has never seen this repository
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import json, sys, mlflow, pandas as pd\n"
            "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
            "rows = pd.read_parquet(sys.argv[2]).drop(columns=['target'])\n"
            "out = model.predict(rows)\n"
            "print(json.dumps({'columns': list(out.columns), 'n': len(out),\n"
            "  'argmax_ok': bool((out.filter(like='proba_').to_numpy().argmax(1)\n"
            "                     == out['prediction'].to_numpy()).all()),\n"
            "  'stages_from': sys.modules['stages'].__file__}))\n")
    test_file = work / "features" / "test.parquet"
    done = subprocess.run([sys.executable, "-c", code, f"models:/{NAME}@champion",
                           str(test_file)], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["columns"] == ["prediction", "proba_0", "proba_1"]
    assert served["n"] == len(__import__("pandas").read_parquet(test_file))
    assert served["argmax_ok"]  # labels 0/1 are the class ids here
    assert not served["stages_from"].startswith(str(ROOT))  # the code travelled with the model


def test_worse_model_is_challenger_and_below_thresholds_fails_the_gate(
        tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]) -> None:
    loose = params_file(tmp_path / "loose.yaml", LOOSE)
    strict = params_file(tmp_path / "strict.yaml")
    assert register.main(register_args(prepare(tmp_path / "v1", trained, make_params()),
                                       strict)) == 0

    # v2: much worse, but no absolute thresholds -> challenger, exit 0, champion stays v1
    v2 = prepare(tmp_path / "v2", trained, make_params(LOOSE), degrade=True)
    assert register.main(register_args(v2, loose)) == 0
    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger" and record["previous_champion_version"] == 1
    worse = (f"f1_macro {record['metrics']['f1_macro']:.4f} is worse than the champion's "
             f"{record['champion_metrics']['f1_macro']:.4f} on the same test data")
    assert record["reason"].startswith(f"champion v1: {worse}")
    assert int(version_by_alias("champion").version) == 1
    challenger = version_by_alias("challenger")
    assert int(challenger.version) == 2
    assert challenger.tags["promotion.reason"] == record["reason"]
    assert challenger.tags["promotion.decision"] == "challenger"

    # v3: below the thresholds -> GateError after recording it; champion still v1
    v3 = prepare(tmp_path / "v3", trained, make_params(), degrade=True)
    with pytest.raises(GateError, match=r"model gate: test-clf v3 below the absolute "
                                        r"thresholds: accuracy 0\.\d+ < min 0\.8"):
        register.run(v3 / "features", v3 / "models", v3 / "reports" / "metrics.json",
                     v3 / "reports" / "registration.json", make_params())
    record = json.loads((v3 / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger" and record["version"] == 3
    assert "below the absolute thresholds" in record["reason"]
    assert int(version_by_alias("champion").version) == 1
    tags = version_by_alias("challenger").tags
    assert tags["promotion.decision"] == "challenger"
    assert "accuracy" in tags["promotion.reason"] and tags["git.commit"] == "0123abc"
    # and through the CLI the gate failure is exit code 1
    assert register.main(register_args(v3, strict)) == 1
    assert int(version_by_alias("champion").version) == 1


def test_champion_that_cannot_score_the_new_data_leaves_the_thresholds_to_decide(
        tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]) -> None:
    strict = params_file(tmp_path / "strict.yaml")
    register.main(register_args(prepare(tmp_path / "v1", trained, make_params()), strict))
    # a new feature schema: five columns fewer, so the champion's signature rejects the rows
    narrow = build_trained(tmp_path / "narrow", make_params(), breast_cancer_frame(drop=5))
    v2 = prepare(tmp_path / "v2", narrow, make_params())

    assert register.main(register_args(v2, strict)) == 0

    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["reason"].startswith("champion v1 could not score the current test data (")
    assert "so the thresholds alone decide: no champion to compare with; clears" in \
        record["reason"]
    assert record["decision"] == "promoted" and record["champion_metrics"] is None
    assert int(version_by_alias("champion").version) == 2


def test_bad_metrics_file_stops_before_anything_is_registered(
        tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())
    (work / "reports" / "metrics.json").write_text('{"accuracy": 0.9}')
    (work / "reports" / "registration.json").write_text("previous")

    with pytest.raises(DataError, match=r"metric missing .*metrics\.json, column=f1_macro"):
        register.run(work / "features", work / "models", work / "reports" / "metrics.json",
                     work / "reports" / "registration.json", make_params())
    assert register.main(register_args(work, params_file(tmp_path / "p.yaml"))) == 1

    assert (work / "reports" / "registration.json").read_text() == "previous"
    assert mlflow.MlflowClient().search_registered_models() == []


def test_a_version_the_service_cannot_answer_in_time_is_blocked_and_says_why(
        tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())
    tight = make_params({"register": {"max_latency_ms": 1e-6}})  # no model answers in 1 ns

    with pytest.raises(GateError, match=r"model gate: test-clf v1 serving check failed: median "
                                        r"latency .* is above register\.max_latency_ms 1e-06"):
        register.run(work / "features", work / "models", work / "reports" / "metrics.json",
                     work / "reports" / "registration.json", tight)

    record = json.loads((work / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger"
    assert "(on its metrics alone: no champion to compare with; clears" in record["reason"]
    aliases = mlflow.MlflowClient().get_registered_model(NAME).aliases
    assert {alias: str(v) for alias, v in aliases.items()} == {"challenger": "1"}  # no champion
    assert version_by_alias("challenger").tags["promotion.reason"] == record["reason"]
