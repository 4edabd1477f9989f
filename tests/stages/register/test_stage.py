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
import pandas as pd
import pytest
import torch

from model import metrics as model_metrics
from stages.common.config import Params, RegisterParams
from stages.common.errors import DataError, GateError
from stages.evaluate import stage as evaluate
from stages.export import stage as export_stage
from stages.register import candidate, gate, registry, versions
from stages.register import stage as register
from tests.builders import (
    TEST_PARAMS,
    breast_cancer_frame,
    build_trained,
    fresh_run,
    make_params,
)

ROOT = Path(__file__).resolve().parents[3]
NAME = TEST_PARAMS["register"]["model_name"]

# ----------------------------------------------------------------------------- decision core

GATE = RegisterParams(
    min_metrics={"accuracy": 0.8, "roc_auc_macro": 0.85},
    max_metrics={"log_loss": 0.6},
    compare_metric="f1_macro",
)
GOOD = {
    "accuracy": 0.9,
    "f1_macro": 0.9,
    "roc_auc_macro": 0.95,
    "roc_auc_micro": 0.95,
    "log_loss": 0.3,
}
# what evaluate writes beside the network's metrics: a hard, imbalanced table
BASELINES = {
    "majority": {"accuracy": 0.6, "f1_macro": 0.25, "log_loss": 1.1},
    "logistic": {"accuracy": 0.85, "f1_macro": 0.62, "log_loss": 0.55},
}


def test_first_model_needs_only_the_thresholds() -> None:
    decision = gate.decide_promotion(GOOD, None, GATE)

    assert decision.promote and not decision.gate_failed
    assert "no champion" in decision.reason
    assert "accuracy 0.9000 >= 0.8" in decision.reason
    assert "log_loss 0.3000 <= 0.6" in decision.reason


@pytest.mark.parametrize(
    ("champion_f1", "promote", "verdict"),
    [
        (0.85, True, "is better than the champion's 0.8500"),
        (0.9, False, "is equal to the champion's 0.9000"),  # a tie: the champion stays
        (0.95, False, "is worse than the champion's 0.9500"),
    ],
)
def test_candidate_is_compared_with_the_champion(
    champion_f1: float, promote: bool, verdict: str
) -> None:
    decision = gate.decide_promotion(GOOD, {**GOOD, "f1_macro": champion_f1}, GATE)

    assert decision.promote is promote and not decision.gate_failed
    assert f"f1_macro 0.9000 {verdict}" in decision.reason


def test_a_tie_never_moves_the_alias_whatever_the_metric() -> None:
    for metric in ("f1_macro", "log_loss", "accuracy"):
        params = GATE.model_copy(update={"compare_metric": metric})

        decision = gate.decide_promotion(GOOD, dict(GOOD), params)

        assert not decision.promote and not decision.gate_failed
        assert decision.reason.startswith(f"tie: {metric} ")
        assert "a tie never moves the alias" in decision.reason


def test_default_gate_is_relative_to_the_baselines() -> None:
    default = RegisterParams()
    assert default.min_metrics == {} and default.max_metrics == {}  # no absolute thresholds
    # a first model on a harder table: far from 0.9, but close to what logistic regression does
    fair = {
        "accuracy": 0.82,
        "f1_macro": 0.6,
        "roc_auc_macro": 0.8,
        "roc_auc_micro": 0.85,
        "log_loss": 0.6,
    }

    decision = gate.decide_promotion(fair, None, default, BASELINES)

    assert decision.promote and not decision.gate_failed
    assert (
        "beats the majority-class baseline (f1_macro 0.2500) and is within 0.05 of the "
        "best baseline (logistic 0.6200)"
    ) in decision.reason


@pytest.mark.parametrize(
    ("f1", "failure"),
    [
        (0.25, "f1_macro 0.2500 does not beat the majority-class baseline's 0.2500"),
        (
            0.5,
            (
                "f1_macro 0.5000 trails the logistic baseline's 0.6200 by 0.1200 > "
                "register.max_gap_to_baseline 0.05"
            ),
        ),
    ],
)
def test_below_the_baselines_fails_the_gate(f1: float, failure: str) -> None:
    decision = gate.decide_promotion({**GOOD, "f1_macro": f1}, None, RegisterParams(), BASELINES)

    assert not decision.promote and decision.gate_failed
    assert decision.reason.startswith("below the baselines: ") and failure in decision.reason


def test_baseline_gate_on_a_lower_is_better_metric_and_switched_off() -> None:
    by_loss = RegisterParams(compare_metric="log_loss", max_gap_to_baseline=0.1)

    close = gate.decide_promotion({**GOOD, "log_loss": 0.6}, None, by_loss, BASELINES)
    far = gate.decide_promotion({**GOOD, "log_loss": 0.7}, None, by_loss, BASELINES)
    off = gate.decide_promotion(
        {**GOOD, "f1_macro": 0.1}, None, RegisterParams(max_gap_to_baseline=None), BASELINES
    )

    assert close.promote and "best baseline (logistic 0.5500)" in close.reason
    assert far.gate_failed and "trails the logistic baseline's 0.5500 by 0.1500" in far.reason
    assert off.promote and off.reason == "no champion to compare with; no gate set"


def test_lower_is_better_for_log_loss() -> None:
    params = GATE.model_copy(update={"compare_metric": "log_loss"})

    worse = gate.decide_promotion(GOOD, {**GOOD, "log_loss": 0.2}, params)
    better = gate.decide_promotion(GOOD, {**GOOD, "log_loss": 0.4}, params)

    assert not worse.promote and "(lower is better)" in worse.reason
    assert better.promote


@pytest.mark.parametrize(
    ("candidate", "failure"),
    [
        ({**GOOD, "accuracy": 0.7}, "accuracy 0.7000 < min 0.8"),
        ({**GOOD, "log_loss": 0.65}, "log_loss 0.6500 > max 0.6"),
        ({**GOOD, "roc_auc_macro": math.nan}, "roc_auc_macro nan < min 0.85"),
    ],
)
def test_below_the_thresholds_fails_the_gate_whatever_the_champion(
    candidate: dict, failure: str
) -> None:
    weak_champion = {k: 0.0 for k in GOOD}

    decision = gate.decide_promotion(candidate, weak_champion, GATE)

    assert not decision.promote and decision.gate_failed
    assert decision.reason == f"below the absolute thresholds: {failure}"


def test_a_reason_is_one_bounded_line_even_from_a_dataframe() -> None:
    import pandas as pd

    frame = pd.DataFrame({"a": range(1000), "b": ["x" * 50] * 1000})

    text = gate.one_line(f"champion could not score ({frame})")

    assert "\n" not in text and len(text) <= gate.MAX_REASON and text.endswith("...")


def _checkpoint(seed: int, epoch: int = 3) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    return {
        "state_dict": net.state_dict(),
        "n_features": 4,
        "n_classes": 2,
        "epoch": epoch,
        "val_loss": 0.1 * epoch,
        "train_params": {"model": "mlp", "hidden_sizes": [3], "dropout": 0.1, "lr": 0.01},
    }


def test_content_hash_is_what_the_model_is_not_how_its_file_was_written(tmp_path: Path) -> None:
    contract = {"target": "y", "labels": [0, 1], "columns": [{"name": "a", "kind": "float"}]}
    code = {"model/x.py": b"print(1)"}
    # torch.save embeds the file's name: the same weights saved under two names differ in
    # bytes, and the checkpoint's epoch/val-loss records do not change the model
    torch.save(_checkpoint(0), tmp_path / "a.pt")
    torch.save(_checkpoint(0, epoch=9), tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "b.pt").read_bytes()
    loaded = [torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("a", "b")]

    same = {candidate.content_hash(c, b"prep", contract, code) for c in loaded}
    assert len(same) == 1
    digest = same.pop()
    other_lr = {**_checkpoint(0), "train_params": {**_checkpoint(0)["train_params"], "lr": 1}}
    assert candidate.content_hash(other_lr, b"prep", contract, code) == digest
    network = candidate.content_hash(loaded[0], b"prep", None, code)  # without the contract
    assert network != digest
    assert candidate.content_hash(loaded[1], b"prep", None, code) == network
    for changed in (
        candidate.content_hash(_checkpoint(1), b"prep", contract, code),
        candidate.content_hash(loaded[0], b"prep2", contract, code),
        candidate.content_hash(loaded[0], b"prep", {**contract, "labels": [1, 2]}, code),
        candidate.content_hash(loaded[0], b"prep", contract, {"x.py": b""}),
    ):
        assert changed != digest


def test_lineage_tags_are_copied_from_the_run() -> None:
    tags = {
        "git.commit": "abc",
        "dvc.data/features.md5": "d41d",
        "prefect.flow_run_id": "f1",
        "mlflow.user": "me",
        "device": "cpu",
    }

    assert versions.lineage_from_run(tags, "r1") == {
        "git.commit": "abc",
        "dvc.data/features.md5": "d41d",
        "prefect.flow_run_id": "f1",
        "run_id": "r1",
    }


# ----------------------------------------------------------------------------- the stage

LINEAGE = {
    "git.commit": "0123abc",
    "git.dirty": "false",
    "dvc.data/features.md5": "feedbeef",
    "prefect.flow_run_id": "flow-1",
}
# the champion comparison decides: no absolute thresholds, no baseline gate
LOOSE = {"register": {"min_metrics": {}, "max_metrics": {}, "max_gap_to_baseline": None}}


def prepare(
    root: Path,
    source: tuple[Path, Path],
    params: Params,
    degrade: bool = False,
    bias: float = 0.0,
    export: bool = False,
) -> Path:
    """A pipeline workspace at ``root``: features + model, a train run, evaluate's metrics.

    ``degrade`` zeroes the output layer: every row gets the same probabilities (p = 0.5 with
    ``bias`` 0), a much worse model; another ``bias`` gives another (equally bad) model.
    ``export``: the export stage logs the ONNX variants to the run (``reports/export.json``,
    which :func:`register_args` then passes to register), as ``dvc repro`` runs it.
    """
    shutil.copytree(source[0], root / "features")
    shutil.copytree(source[1], root / "models")
    if degrade:
        checkpoint = torch.load(root / "models" / "model.pt", weights_only=True)
        state = checkpoint["state_dict"]
        last = [k for k in state if k.endswith(".weight")][-1].removesuffix(".weight")
        state[f"{last}.weight"].zero_()
        state[f"{last}.bias"].zero_()
        state[f"{last}.bias"][0] = bias
        torch.save(checkpoint, root / "models" / "model.pt")
    fresh_run(root / "models", params, tags=LINEAGE)
    evaluate.run(
        root / "features",
        root / "models",
        root / "reports" / "eval",
        root / "reports" / "metrics.json",
        params,
    )
    if export:
        export_stage.run(
            root / "features", root / "models", root / "reports" / "export.json", params
        )
    return root


def register_args(root: Path, params_file: Path) -> list[str]:
    exported = root / "reports" / "export.json"  # when prepare(export=True) wrote it
    return [
        "--features",
        str(root / "features"),
        "--model",
        str(root / "models"),
        "--metrics",
        str(root / "reports" / "metrics.json"),
        *(["--export", str(exported)] if exported.is_file() else []),
        "--out",
        str(root / "reports" / "registration.json"),
        "--params",
        str(params_file),
    ]


def params_file(path: Path, overrides: dict | None = None) -> Path:
    raw = {name: dict(section) for name, section in TEST_PARAMS.items()}
    for name, section in (overrides or {}).items():
        raw[name] = {**raw.get(name, {}), **section}
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def version_by_alias(alias: str) -> mlflow.entities.model_registry.ModelVersion:
    return mlflow.MlflowClient().get_model_version_by_alias(NAME, alias)


@pytest.mark.slow
def test_first_model_becomes_champion_and_serves_from_a_fresh_process(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())

    assert register.main(register_args(work, params_file(tmp_path / "p.yaml"))) == 0

    record = json.loads((work / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 1
    assert record["reason"].startswith("first model: no champion to compare with; clears")
    assert record["champion_metrics"] is None and record["previous_champion_version"] is None
    evaluated = json.loads((work / "reports" / "metrics.json").read_text())
    assert record["metrics"] == pytest.approx(  # served == evaluated
        {k: evaluated[k] for k in model_metrics.METRIC_NAMES}, abs=1e-6
    )
    assert record["baselines"] == model_metrics.read_baselines(evaluated)
    champion = version_by_alias("champion")
    assert int(champion.version) == 1 and champion.run_id == record["run_id"]
    assert {  # (besides the artifact hashes: tests/serving/test_artifact_integrity.py)
        **LINEAGE,
        "run_id": record["run_id"],
        "promotion.decision": "promoted",
        "promotion.reason": record["reason"],
        "promotion.gate": "passed",
        "model.content_hash": record["content_hash"],
        "model.network_hash": record["network_hash"],
        **{f"metric.{k}": f"{v:.6f}" for k, v in record["metrics"].items()},
    }.items() <= champion.tags.items()
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
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "rows = pd.read_parquet(sys.argv[2]).drop(columns=['target'])\n"
        "out = model.predict(rows)\n"
        "print(json.dumps({'columns': list(out.columns), 'n': len(out),\n"
        "  'argmax_ok': bool((out.filter(like='proba_').to_numpy().argmax(1)\n"
        "                     == out['prediction'].to_numpy()).all()),\n"
        "  'model_from': sys.modules['model'].__file__}))\n"
    )
    test_file = work / "features" / "test.parquet"
    done = subprocess.run(
        [sys.executable, "-c", code, f"models:/{NAME}@champion", str(test_file)],
        check=False,
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert served["columns"] == ["prediction", "proba_0", "proba_1"]
    assert served["n"] == len(__import__("pandas").read_parquet(test_file))
    assert served["argmax_ok"]  # labels 0/1 are the class ids here
    assert not served["model_from"].startswith(str(ROOT))  # the code travelled with the model


@pytest.mark.slow
def test_worse_model_is_challenger_and_below_thresholds_fails_the_gate(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    loose = params_file(tmp_path / "loose.yaml", LOOSE)
    strict = params_file(tmp_path / "strict.yaml")
    assert (
        register.main(register_args(prepare(tmp_path / "v1", trained, make_params()), strict)) == 0
    )

    # v2: much worse, but no absolute thresholds -> challenger, exit 0, champion stays v1
    v2 = prepare(tmp_path / "v2", trained, make_params(LOOSE), degrade=True)
    assert register.main(register_args(v2, loose)) == 0
    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger" and record["previous_champion_version"] == 1
    worse = (
        f"f1_macro {record['metrics']['f1_macro']:.4f} is worse than the champion's "
        f"{record['champion_metrics']['f1_macro']:.4f} on the same test data"
    )
    assert record["reason"].startswith(f"champion v1: {worse}")
    assert int(version_by_alias("champion").version) == 1
    challenger = version_by_alias("challenger")
    assert int(challenger.version) == 2
    assert challenger.tags["promotion.reason"] == record["reason"]
    assert challenger.tags["promotion.decision"] == "challenger"

    # v3: below the thresholds -> GateError after recording it; champion still v1
    v3 = prepare(tmp_path / "v3", trained, make_params(), degrade=True, bias=0.1)
    with pytest.raises(
        GateError,
        match=r"model gate: test-clf v3 below the absolute "
        r"thresholds: accuracy 0\.\d+ < min 0\.8",
    ):
        register.run(
            v3 / "features",
            v3 / "models",
            v3 / "reports" / "metrics.json",
            v3 / "reports" / "registration.json",
            make_params(),
        )
    record = json.loads((v3 / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger" and record["version"] == 3
    assert "below the absolute thresholds" in record["reason"]
    assert int(version_by_alias("champion").version) == 1
    tags = version_by_alias("challenger").tags
    assert tags["promotion.decision"] == "challenger"
    assert "accuracy" in tags["promotion.reason"] and tags["git.commit"] == "0123abc"
    # and through the CLI the gate failure is exit code 1: the same model is judged again
    # (no new version) and fails again
    assert register.main(register_args(v3, strict)) == 1
    assert int(version_by_alias("champion").version) == 1
    assert len(mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")) == 3


@pytest.mark.slow
def test_identical_model_registers_no_new_version_and_moves_no_alias(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    strict = params_file(tmp_path / "strict.yaml")
    assert (
        register.main(register_args(prepare(tmp_path / "v1", trained, make_params()), strict)) == 0
    )
    first = json.loads((tmp_path / "v1" / "reports" / "registration.json").read_text())
    # the same training again (a new run, the checkpoint re-saved with other records in it)
    again = prepare(tmp_path / "again", trained, make_params())
    checkpoint = torch.load(again / "models" / "model.pt", weights_only=True)
    torch.save({**checkpoint, "epoch": 999}, again / "models" / "model.pt")

    assert register.main(register_args(again, strict)) == 0

    record = json.loads((again / "reports" / "registration.json").read_text())
    assert record["decision"] == "identical" and record["version"] == 1
    assert record["reason"].startswith("identical to v1 (same network weights, preprocessor")
    assert "nothing registered, no alias moved" in record["reason"]
    assert record["content_hash"] == first["content_hash"]
    client = mlflow.MlflowClient()
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()} == {
        "champion": "1"
    }
    assert client.get_run(record["run_id"]).data.tags["registered.identical_to"] == "1"


def _penguins() -> pd.DataFrame:
    from importlib.resources import files

    return pd.read_csv(files("palmerpenguins") / "data" / "penguins.csv")


@pytest.mark.slow
def test_another_table_is_not_compared_with_the_champion_unless_allowed(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    from stages.validate import stage as validate

    loose = params_file(tmp_path / "loose.yaml", LOOSE)
    assert (
        register.main(register_args(prepare(tmp_path / "v1", trained, make_params()), loose)) == 0
    )
    # the same repo switched to another real table: penguins (other columns, three labels)
    (tmp_path / "penguins.csv").write_text(_penguins().to_csv(index=False))
    validate.write_suite(
        tmp_path / "penguins.csv", tmp_path / "penguins.json", "species", 0.1, 1000
    )
    other = {
        "ingest": {"target": "species"},
        "validate": {"suite_path": str(tmp_path / "penguins.json")},
        "features": {"drop_columns": ["year"]},
        **LOOSE,
    }
    penguins = build_trained(tmp_path / "penguins", make_params(other), _penguins())
    v2 = prepare(tmp_path / "v2", penguins, make_params(other))

    with pytest.raises(GateError) as refused:
        register.run(
            v2 / "features",
            v2 / "models",
            v2 / "reports" / "metrics.json",
            v2 / "reports" / "registration.json",
            make_params(other),
        )

    message = str(refused.value)
    assert message.startswith(
        "model gate: test-clf v2 has another input schema or label set than champion v1 ("
    )
    assert "labels ['0', '1'] -> ['Adelie', 'Chinstrap', 'Gentoo']" in message
    assert "register.allow_schema_change: true" in message and "\n" not in message
    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger" and record["champion_metrics"] is None
    assert len(record["reason"]) <= gate.MAX_REASON and "\n" not in record["reason"]
    assert int(version_by_alias("champion").version) == 1

    # told to: promoted without comparing (no new version: the same model, judged again)
    allowed = params_file(
        tmp_path / "allowed.yaml",
        {**other, "register": {**LOOSE["register"], "allow_schema_change": True}},
    )
    assert register.main(register_args(v2, allowed)) == 0
    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 2
    assert "input schema changed from champion v1 (" in record["reason"]
    assert "allowed by register.allow_schema_change" in record["reason"]
    assert int(version_by_alias("champion").version) == 2


def test_bad_metrics_file_stops_before_anything_is_registered(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())
    (work / "reports" / "metrics.json").write_text('{"accuracy": 0.9}')
    (work / "reports" / "registration.json").write_text("previous")

    with pytest.raises(DataError, match=r"metric missing .*metrics\.json, column=f1_macro"):
        register.run(
            work / "features",
            work / "models",
            work / "reports" / "metrics.json",
            work / "reports" / "registration.json",
            make_params(),
        )
    assert register.main(register_args(work, params_file(tmp_path / "p.yaml"))) == 1

    assert (work / "reports" / "registration.json").read_text() == "previous"
    assert mlflow.MlflowClient().search_registered_models() == []


@pytest.mark.slow
def test_a_version_the_service_cannot_answer_in_time_is_blocked_and_says_why(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())
    tight = make_params({"register": {"max_latency_ms": 1e-6}})  # no model answers in 1 ns

    with pytest.raises(
        GateError,
        match=r"model gate: test-clf v1 serving check failed: median "
        r"latency .* is above register\.max_latency_ms 1e-06",
    ):
        register.run(
            work / "features",
            work / "models",
            work / "reports" / "metrics.json",
            work / "reports" / "registration.json",
            tight,
        )

    record = json.loads((work / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger"
    assert "(on its metrics alone: no champion to compare with; clears" in record["reason"]
    aliases = mlflow.MlflowClient().get_registered_model(NAME).aliases
    assert {alias: str(v) for alias, v in aliases.items()} == {"challenger": "1"}  # no champion
    assert version_by_alias("challenger").tags["promotion.reason"] == record["reason"]


# ----------------------------------------------------------------------------- in the DVC graph


@pytest.mark.slow
def test_revalidating_identical_data_retrains_nothing(reproduced) -> None:
    import hashlib

    import yaml

    from tests.conftest import dvc

    repo, mlflow_uri = reproduced.repo, reproduced.uri  # a copy of the session's `dvc repro`

    def train_deps() -> dict[str, str]:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        files = [
            p
            for dep in lock["stages"]["train"]["deps"]
            for p in (
                [repo / dep["path"]]
                if (repo / dep["path"]).is_file()
                else sorted((repo / dep["path"]).rglob("*"))
            )
        ]
        return {
            str(p.relative_to(repo)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in files
            if p.is_file()
        }

    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    versions = _all_versions(client)  # the model (v1) and, when compress chose one, its compact
    before = train_deps()
    result_json = (repo / "reports/validation/result.json").read_bytes()
    # validate runs again on byte-identical data (as when a rejected file is replaced by the
    # good one): GX writes a new result (run id, timestamps) and new Data Docs...
    dvc(repo, "repro", "--force", "--single-item", "validate")
    assert (repo / "reports/validation/result.json").read_bytes() != result_json

    # ...but nothing train depends on changed, so nothing below validate is out of date
    assert train_deps() == before
    status = json.loads(dvc(repo, "status", "--json").stdout or "{}")
    assert status == {"ingest": ["always changed"]}, status
    again = dvc(repo, "repro")
    for stage in ("features", "train", "evaluate", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout
    assert _all_versions(client) == versions
    assert [v for v, compact_of in versions if compact_of is None] == ["1"]


def _all_versions(client: mlflow.MlflowClient) -> list[tuple[str, str | None]]:
    # (version, the version it is a compact copy of: None for the model itself), oldest first
    found = client.search_model_versions("name = 'classifier'")
    return sorted(
        ((str(v.version), v.tags.get("compact.parent_version")) for v in found),
        key=lambda item: int(item[0]),
    )


@pytest.mark.slow
def test_forced_register_twice_in_dvc_leaves_one_version_and_one_move(reproduced) -> None:
    # The fault: `dvc repro --force --single-item register` twice made two versions from one
    # MLflow run (and a flow retry a third, each moving champion).
    from tests.conftest import dvc

    repo, mlflow_uri = reproduced.repo, reproduced.uri  # a copy of the session's `dvc repro`
    run_id = json.loads((repo / "reports" / "registration.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    versions = _all_versions(client)  # the model and, when compress chose one, its compact
    compact_moves = registry.alias_history(client, "classifier", "champion-compact")

    for _ in range(2):
        again = dvc(repo, "repro", "--force", "--single-item", "register", check=False)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    record = json.loads((repo / "reports" / "registration.json").read_text())
    assert record["decision"] == "identical" and record["version"] == 1
    assert record["compact"]["status"] in ("identical", "not_registered"), record["compact"]
    assert record["run_id"] == run_id  # the same MLflow run each time
    assert _all_versions(client) == versions
    assert [v for v, compact_of in versions if compact_of is None] == ["1"]
    assert [
        (m.alias, m.to_version) for m in registry.alias_history(client, "classifier", "champion")
    ] == [("champion", "1")]
    assert registry.alias_history(client, "classifier", "champion-compact") == compact_moves


def _register_dying_in(
    function: str,
    monkeypatch: pytest.MonkeyPatch,
    workdir: Path,
    params: Path,
    module: object = register,
) -> None:
    """Run register once with ``module.function`` killed (as a crash there would stop it)."""

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"killed in {function}")

    with monkeypatch.context() as patch:
        patch.setattr(module, function, crash)
        with pytest.raises(RuntimeError, match="killed"):
            register.main(register_args(workdir, params))


def _versions() -> list[str]:
    return sorted(
        str(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")
    )


def _aliases() -> dict[str, str]:
    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def _moves() -> list[tuple[str, str | None, str, str]]:
    """The alias history: (alias, from, to, status) per recorded move."""
    return [
        (m.alias, m.from_version, m.to_version, m.status)
        for m in registry.alias_history(mlflow.MlflowClient(), NAME)
    ]


@pytest.mark.slow
def test_a_retry_after_a_crash_resumes_the_version_instead_of_adding_one(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run dies after the version exists but before the decision (as a flow retry saw it:
    # one failed run + 2 retries left three versions and no champion).
    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params())

    _register_dying_in("judge_version", monkeypatch, workdir, strict)
    client = mlflow.MlflowClient()
    assert client.get_model_version(NAME, "1").tags["promotion.gate"] == "pending"

    assert register.main(register_args(workdir, strict)) == 0

    record = json.loads((workdir / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 1
    assert "left undecided by a run that stopped" in record["reason"]
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert client.get_model_version(NAME, "1").tags["promotion.gate"] == "passed"
    assert {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()} == {
        "champion": "1"
    }


@pytest.mark.slow
def test_a_crash_after_the_alias_moved_finishes_as_champion_not_compared_with_itself(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run dies after the alias moved to v1, before the gate is closed: the retry finds
    # v1 pending AND champion; scored against itself it would tie.
    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params())

    _register_dying_in("close_gate", monkeypatch, workdir, strict)
    client = mlflow.MlflowClient()
    assert client.get_model_version(NAME, "1").tags["promotion.gate"] == "pending"
    assert int(version_by_alias("champion").version) == 1

    assert register.main(register_args(workdir, strict)) == 0

    record = json.loads((workdir / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 1
    assert "already the champion" in record["reason"] and "not compared" in record["reason"]
    assert record["champion_metrics"] is None
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]
    assert client.get_model_version(NAME, "1").tags["promotion.gate"] == "passed"
    assert {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()} == {
        "champion": "1"
    }
    assert _moves() == [("champion", None, "1", "done")]  # the retry moved nothing again


@pytest.mark.slow
def test_a_failed_version_made_champion_by_a_forced_rollback_is_still_judged_by_the_gate(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # Champion by `make rollback ... FORCE=1`, not by register: a later identical run must not
    # take it as "already the champion" and mark it passed without a gate.
    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params(), degrade=True)
    assert register.main(register_args(workdir, strict)) == 1
    registry.move_alias(mlflow.MlflowClient(), NAME, "champion", "1", "forced", kind="rollback")

    assert register.main(register_args(workdir, strict)) == 1

    record = json.loads((workdir / "reports" / "registration.json").read_text())
    assert record["decision"] == "challenger" and record["gate_failed"]
    assert (
        "champion v1, moved there outside register, not compared: below the absolute "
        "thresholds" in record["reason"]
    )
    assert mlflow.MlflowClient().get_model_version(NAME, "1").tags["promotion.gate"] == "failed"
    assert _versions() == ["1"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("function", "where"),
    [
        ("record_on_version", register),  # deciding done, nothing written on the version yet
        ("move_alias", registry),  # everything written on the version, the alias not moved
    ],
)
def test_a_stop_before_the_alias_moves_leaves_no_champion_and_the_retry_moves_it_once(
    tmp_path: Path,
    mlflow_uri: str,
    trained: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    function: str,
    where: object,
) -> None:
    # Before: the alias moved first, then the decision was written; a stop in between left a
    # champion whose version said nothing (and a retry could promote again).
    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params())

    _register_dying_in(function, monkeypatch, workdir, strict, where)

    client = mlflow.MlflowClient()
    assert _versions() == ["1"] and _aliases() == {} and _moves() == []
    stopped = client.get_model_version(NAME, "1")
    assert stopped.tags["promotion.gate"] == "pending"
    if function == "move_alias":  # the whole decision was on the version before the alias
        assert stopped.tags["promotion.decision"] == "promoted"
        assert stopped.tags["promotion.reason"].startswith("first model: no champion")
        assert stopped.description.startswith("promoted: first model")

    assert register.main(register_args(workdir, strict)) == 0

    record = json.loads((workdir / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 1
    assert _versions() == ["1"] and _aliases() == {"champion": "1"}
    [move] = registry.alias_history(client, NAME)
    assert (move.alias, move.from_version, move.to_version, move.status, move.kind) == (
        "champion",
        None,
        "1",
        "done",
        "register",
    )
    assert move.caused_by_run == record["run_id"] and move.reason == record["reason"]
    assert client.get_model_version(NAME, "1").tags["promotion.gate"] == "passed"


@pytest.mark.slow
def test_one_run_registers_one_version_even_when_a_stop_left_it_untagged(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # An earlier register logged + registered the model in this run, then stopped before
    # tagging the version (the old two-step registration): no content hash to find it by.
    from model.servable import log_servable

    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params())
    run_id = json.loads((workdir / "models" / "run.json").read_text())["run_id"]
    with mlflow.start_run(run_id=run_id):
        test = pd.read_parquet(workdir / "features" / "test.parquet")
        log_servable(
            workdir / "features" / "preprocessor.joblib",
            workdir / "models" / "model.pt",
            test.head(5),
            registered_model_name=NAME,
        )
    assert "model.content_hash" not in mlflow.MlflowClient().get_model_version(NAME, "1").tags

    assert register.main(register_args(workdir, strict)) == 0

    record = json.loads((workdir / "reports" / "registration.json").read_text())
    assert record["version"] == 1 and record["decision"] == "promoted"
    assert "which this run had registered when it stopped; judged again" in record["reason"]
    assert _versions() == ["1"] and _aliases() == {"champion": "1"}
    tags = mlflow.MlflowClient().get_model_version(NAME, "1").tags
    assert tags["model.content_hash"] == record["content_hash"]
    assert tags["promotion.gate"] == "passed"


@pytest.mark.slow
def test_register_twice_on_the_same_inputs_adds_no_version_and_moves_nothing(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # what `dvc repro --force --single-item register` (or a flow retry) does: the same run
    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params())

    assert register.main(register_args(workdir, strict)) == 0
    assert register.main(register_args(workdir, strict)) == 0

    record = json.loads((workdir / "reports" / "registration.json").read_text())
    assert record["decision"] == "identical" and record["version"] == 1
    assert _versions() == ["1"] and _aliases() == {"champion": "1"}
    assert _moves() == [("champion", None, "1", "done")]


@pytest.mark.slow
def test_a_gate_failure_is_not_registered_again_by_a_later_identical_run(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # A daily schedule: every day a new run trains the same rejected model again.
    strict = params_file(tmp_path / "strict.yaml")
    day1 = prepare(tmp_path / "day1", trained, make_params(), degrade=True)
    assert register.main(register_args(day1, strict)) == 1
    assert _versions() == ["1"] and _aliases() == {"challenger": "1"}
    assert mlflow.MlflowClient().get_model_version(NAME, "1").tags["promotion.gate"] == "failed"

    day2 = prepare(tmp_path / "day2", trained, make_params(), degrade=True)  # a new run
    assert register.main(register_args(day2, strict)) == 1

    record = json.loads((day2 / "reports" / "registration.json").read_text())
    assert record["version"] == 1 and record["decision"] == "challenger"
    assert "identical to v1, which failed the gate before; judged again" in record["reason"]
    first = json.loads((day1 / "reports" / "registration.json").read_text())
    assert record["run_id"] != first["run_id"]
    assert _versions() == ["1"] and _aliases() == {"challenger": "1"}
    assert _moves() == [("challenger", None, "1", "done")]  # moved once, on day 1


@pytest.mark.slow
def test_a_reviewed_suite_edit_reaches_the_service_with_the_same_network(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # serving rejected real rows, so the user widens a range in the suite: validate, register
    # re-run, features/train are skipped. The same weights tie the champion: a tie with the
    # champion's own network and other row rules promotes, or the new rules never serve.
    loose = params_file(tmp_path / "loose.yaml", LOOSE)
    assert (
        register.main(register_args(prepare(tmp_path / "v1", trained, make_params()), loose)) == 0
    )
    suite = json.loads((ROOT / "suites" / "breast_cancer.json").read_text())
    radius = next(
        e
        for e in suite["expectations"]
        if e["type"].endswith("_be_between") and e["kwargs"].get("column") == "mean_radius"
    )
    old_max = radius["kwargs"]["max_value"]
    radius["kwargs"]["max_value"] = 40.0
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    edited = {"validate": {"suite_path": str(tmp_path / "suite.json")}}
    v2 = prepare(tmp_path / "v2", trained, make_params({**LOOSE, **edited}))

    assert (
        register.main(register_args(v2, params_file(tmp_path / "edited.yaml", {**LOOSE, **edited})))
        == 0
    )

    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["decision"] == "promoted" and record["version"] == 2
    assert record["reason"].startswith(
        f"champion v1: same network as v1, new input contract rules (column 'mean_radius': "
        f"max {old_max!r} -> 40.0): a tie on f1_macro, promoted"
    )
    assert int(version_by_alias("champion").version) == 2
    client = mlflow.MlflowClient()
    tags = [client.get_model_version(NAME, v).tags for v in ("1", "2")]
    assert tags[0]["model.network_hash"] == tags[1]["model.network_hash"]
    assert tags[0]["model.content_hash"] != tags[1]["model.content_hash"]
    from model.contract import model_contract

    served = {c["name"]: c for c in model_contract(f"models:/{NAME}@champion")["columns"]}
    assert served["mean_radius"]["max"] == 40.0
    # the same suite again: identical, nothing registered
    assert (
        register.main(register_args(v2, params_file(tmp_path / "edited.yaml", {**LOOSE, **edited})))
        == 0
    )
    assert len(client.search_model_versions(f"name = '{NAME}'")) == 2


@pytest.mark.slow
def test_using_fewer_columns_of_the_same_table_is_compared_not_refused(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # features.drop_columns (or datetime drop <-> calendar, max_category_fraction) changes
    # which columns the model uses, not the table, test split or labels: metrics compare
    loose = params_file(tmp_path / "loose.yaml", LOOSE)
    assert (
        register.main(register_args(prepare(tmp_path / "v1", trained, make_params()), loose)) == 0
    )
    fewer = {"features": {"drop_columns": ["mean_radius"]}, **LOOSE}
    v2 = prepare(
        tmp_path / "v2",
        build_trained(tmp_path / "fewer", make_params(fewer), breast_cancer_frame()),
        make_params(fewer),
    )

    assert register.main(register_args(v2, params_file(tmp_path / "fewer.yaml", fewer))) == 0

    record = json.loads((v2 / "reports" / "registration.json").read_text())
    assert record["version"] == 2 and record["champion_metrics"] is not None
    assert record["reason"].startswith("champion v1: ")  # compared: better, worse or a tie
    assert f"the champion's {record['champion_metrics']['f1_macro']:.4f}" in record["reason"]


@pytest.mark.slow
def test_a_params_edit_during_register_refuses_before_the_alias_moves(
    tmp_path: Path,
    mlflow_uri: str,
    trained: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The edit lands while register decides: the old check ran only after the alias had moved,
    # so the stage failed with a champion promoted under params DVC would never lock.
    strict = params_file(tmp_path / "strict.yaml")
    workdir = prepare(tmp_path / "v1", trained, make_params())
    record_on_version = register.record_on_version

    def record_then_edit(*args: object, **kwargs: object) -> None:
        record_on_version(*args, **kwargs)
        params_file(strict, {"register": {"max_latency_ms": 1234.0}})  # someone edits it now

    with monkeypatch.context() as patch:
        patch.setattr(register, "record_on_version", record_then_edit)
        assert register.main(register_args(workdir, strict)) == 1

    assert f"stage register failed: {strict} changed while stage register ran" in caplog.text
    assert _versions() == ["1"] and _aliases() == {} and _moves() == []
    assert mlflow.MlflowClient().get_model_version(NAME, "1").tags["promotion.gate"] == "pending"
    assert register.main(register_args(workdir, strict)) == 0  # re-run with the file as it is
    assert _aliases() == {"champion": "1"} and _moves() == [("champion", None, "1", "done")]


@pytest.mark.slow
def test_a_later_identical_run_keeps_the_versions_lineage_and_is_recorded_as_its_judge(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    # Day 2 retrains the same rejected model from another commit: the version's files are
    # still day 1's, so its run_id and lineage tags must stay day 1's (MLflow's own
    # version.run_id is day 1's run); day 2's run is recorded as the one that judged it.
    strict = params_file(tmp_path / "strict.yaml")
    day1 = prepare(tmp_path / "day1", trained, make_params(), degrade=True)
    assert register.main(register_args(day1, strict)) == 1
    day2 = prepare(tmp_path / "day2", trained, make_params(), degrade=True)
    client = mlflow.MlflowClient()
    day2_run = json.loads((day2 / "models" / "run.json").read_text())["run_id"]
    client.set_tag(day2_run, "git.commit", "fedcba9")

    assert register.main(register_args(day2, strict)) == 1

    day1_run = json.loads((day1 / "reports" / "registration.json").read_text())["run_id"]
    assert json.loads((day2 / "reports" / "registration.json").read_text())["run_id"] == day2_run
    version = client.get_model_version(NAME, "1")
    assert version.run_id == day1_run != day2_run
    assert version.tags["run_id"] == day1_run
    assert version.tags["git.commit"] == LINEAGE["git.commit"]  # day 1's, not fedcba9
    assert version.tags["promotion.judged_by_run"] == day2_run
    assert "judged again" in version.tags["promotion.reason"]
    assert f"Trained in MLflow run {day1_run}. Judged by run {day2_run}." in version.description
