"""Lineage and reproduction, end to end: real git, DVC (local remote) and MLflow (temp sqlite).

The slow test trains version 1 on a CSV, changes the CSV and trains version 2, then traces
version 1 and reproduces it in a clean workspace from the DVC remote: its test metrics must
equal version 1's exactly (and differ from version 2's). The fast tests cover the errors.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import lineage, reproduce
from tests.conftest import dvc, make_pipeline_repo

MODEL = "classifier"
CSV = "data/source/cancer.csv"


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() turns MLflow's download bars off with setdefault: keep that out of other tests
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout.strip()


def _write_csv(path: Path, drop_every: int | None = None) -> None:
    """The breast-cancer table as a user's CSV; ``drop_every``: a later, changed version."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    if drop_every:
        frame = frame[frame.index % drop_every != 0]
    frame.to_csv(path, index=False)


def _train_version(repo: Path, message: str) -> dict:
    """``dvc repro``, commit and ``dvc push``: what a user (or the flow) does per data change."""
    result = dvc(repo, "repro", check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    dvc(repo, "push")
    return {
        "metrics": json.loads((repo / "reports/metrics.json").read_text()),
        "lock": yaml.safe_load((repo / "dvc.lock").read_text()),
        "registration": json.loads((repo / "reports/registration.json").read_text()),
    }


def _raw_md5(lock: dict) -> str:
    return next(out["md5"] for out in lock["stages"]["ingest"]["outs"] if out["path"] == "data/raw")


@pytest.mark.slow
@pytest.mark.stack
def test_reproduce_an_old_version_after_the_data_changed(
    tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_pipeline_repo(tmp_path / "repo", {"ingest": {"source": CSV}})
    _write_csv(repo / CSV)
    v1 = _train_version(repo, "data v1")
    _write_csv(repo / CSV, drop_every=10)  # new data arrives: 10% fewer rows
    _git(repo, "commit", "-q", "-am", "data v2")
    v2 = _train_version(repo, "model v2")
    # v1 is the first version; v2's number follows v1's compact copy when compress made one
    second = v2["registration"]["version"]
    assert v1["registration"]["version"] == 1 and second > 1
    assert _raw_md5(v1["lock"]) != _raw_md5(v2["lock"])
    assert v1["metrics"] != v2["metrics"]

    # lineage of v1: its data hashes, not the current ones
    assert lineage.main([f"{MODEL}/1", "--repo", str(repo), "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    data = {item["path"]: item for item in chain["data"]}
    assert data["data/raw"]["md5"] == _raw_md5(v1["lock"])
    assert {"data/raw", "data/validated", "data/features"} <= set(data)
    assert chain["git"]["commit"] == _git(repo, "rev-list", "--max-parents=0", "HEAD")
    assert chain["git"]["dirty"] is False
    assert chain["validation"]["success"] is True
    assert chain["params"]["ingest"]["source"] == CSV
    assert chain["metrics"] == v1["metrics"]
    assert lineage.main([f"{MODEL}/1", "--repo", str(repo)]) == 0
    text = capsys.readouterr().out
    assert _raw_md5(v1["lock"]) in text and _raw_md5(v2["lock"]) not in text
    assert chain["run"]["id"] in text and "Validation" in text

    # v2 ran on a tree whose dvc.lock the same `dvc repro` had rewritten: dirty in the lock only
    assert lineage.main([f"{MODEL}/{second}", "--repo", str(repo), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["git"]["dirty_files"] == ["dvc.lock"]

    started = time.monotonic()
    workdir = tmp_path / "reproduced"
    code = reproduce.main([f"{MODEL}/1", "--repo", str(repo), "--workdir", str(workdir)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    print(f"reproduce took {time.monotonic() - started:.1f}s", file=sys.stderr)
    again = json.loads((workdir / "reports/metrics.json").read_text())
    assert again == v1["metrics"] and again != v2["metrics"]
    assert re.search(r"All \d+ test metrics of classifier v1 match exactly", out), out
    assert "stage 5/5: evaluate" in err  # validate, features, train, ensemble, evaluate
    assert _raw_md5(yaml.safe_load((workdir / "dvc.lock").read_text())) == _raw_md5(v1["lock"])
    assert _git(workdir, "rev-parse", "HEAD") == chain["git"]["commit"]
    # the reproduction logged into its own store, never into the original one
    assert (workdir / "mlflow/mlflow.db").is_file()
    assert lineage.main([f"{MODEL}/99", "--repo", str(repo)]) == 1  # no such version


OWN_CSV, OWN_SUITE = "data/source/own.csv", "suites/own.json"


@pytest.mark.slow
@pytest.mark.stack
def test_reproduce_own_data_with_an_untracked_suite_and_dirty_outputs(
    tmp_path: Path, mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9 item 7: the own-data path, as `make run` / the schedule leave the tree."""
    repo = make_pipeline_repo(
        tmp_path / "repo", {"ingest": {"source": OWN_CSV}, "validate": {"suite_path": OWN_SUITE}}
    )
    # the user's table and the suite profiled from it stay untracked (never committed)
    (repo / ".git/info/exclude").write_text(f"{OWN_CSV}\n{OWN_SUITE}\n")
    _write_csv(repo / OWN_CSV)
    for args in (
        ["stages.ingest", "--out", "data/raw"],
        ["stages.validate", "suite", "--snapshot", "data/raw", "--out", OWN_SUITE],
    ):
        subprocess.run([sys.executable, "-m", *args], cwd=repo, check=True, capture_output=True)
    suite = (repo / OWN_SUITE).read_bytes()
    _train_version(repo, "v1 and its outputs")  # reports/*.json, dvc.lock now tracked
    for _version, drop_every in ((2, 10), (3, 7)):  # new data, runs without a commit between
        _write_csv(repo / OWN_CSV, drop_every=drop_every)
        result = dvc(repo, "repro", check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        dvc(repo, "push")
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    third = json.loads((repo / "reports/registration.json").read_text())["version"]
    assert third >= 3  # the third model (compact copies, when made, take numbers too)

    assert lineage.main([f"{MODEL}/{third}", "--repo", str(repo), "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert "reports/metrics.json" in chain["git"]["dirty_files"]  # v2's, not the commit's
    recorded = chain["inputs"][OWN_SUITE]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    suite_dep = next(d for d in lock["stages"]["validate"]["deps"] if d["path"] == OWN_SUITE)
    assert recorded["md5"] == recorded["lock_md5"] == suite_dep["md5"]
    assert recorded["logged"] and not recorded["in_git"]
    assert chain["inputs"]["model/nets.py"]["in_git"]  # a code file train depends on

    workdir = tmp_path / "reproduced"
    code = reproduce.main([f"{MODEL}/{third}", "--repo", str(repo), "--workdir", str(workdir)])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "WARNING" not in err, err
    assert (workdir / OWN_SUITE).read_bytes() == suite
    assert json.loads((workdir / "reports/metrics.json").read_text()) == metrics


def test_declared_outputs_come_from_dvc_yaml() -> None:
    from tests.conftest import ROOT

    outputs = reproduce.declared_outputs(yaml.safe_load((ROOT / "dvc.yaml").read_text()), {})
    assert {
        "reports/metrics.json",
        "reports/registration.json",
        "reports/train/history.csv",
        "data/raw",
        "models",
        "reports/eval",
    } <= set(outputs)
    assert not {"dvc.lock", "params.yaml", "stages/train/stage.py"} & set(outputs)
    interpolated = {"stages": {"s": {"outs": [{"${out.dir}/x": {"cache": False}}]}}}
    assert reproduce.declared_outputs(interpolated, {"out": {"dir": "o"}}) == ["o/x"]


def test_outputs_and_logged_inputs_are_not_code_changes() -> None:
    outputs = ["reports/metrics.json", "reports/eval", "models"]
    dirty = ["dvc.lock", "reports/metrics.json", "reports/eval/roc.json", "suites/own.json"]
    assert reproduce.check_clean(dirty, False, [*outputs, "suites/own.json"]) is None
    with pytest.raises(reproduce.ReproduceError, match="suites/own.json"):
        reproduce.check_clean(dirty, False, outputs)
    with pytest.raises(reproduce.ReproduceError, match="stages/train/stage.py"):
        reproduce.check_clean(
            [*dirty, "stages/train/stage.py"], False, [*outputs, "suites/own.json"]
        )


def test_train_time_record_of_the_inputs(tmp_path: Path) -> None:
    from stages.common.tracking import file_md5, lock_inputs, record_inputs

    for cmd in (["init", "-q"], ["config", "user.email", "t@e.st"], ["config", "user.name", "t"]):
        _git(tmp_path, *cmd)
    files = {"stages/validate/stage.py": "code", "suites/own.json": "{}", "suites/old.json": "{}"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    _git(tmp_path, "add", "stages/validate/stage.py")
    _git(tmp_path, "commit", "-q", "-m", "code")
    (tmp_path / "suites/old.json").write_text('{"edited": true}')  # after validate read it
    deps = [
        {"path": name, "md5": file_md5(tmp_path / name) if "old" not in name else "0" * 32}
        for name in files
    ]
    lock = {
        "stages": {
            "ingest": {
                "deps": [{"path": "data/source", "md5": "a.dir"}],
                "outs": [{"path": "data/raw", "md5": "b.dir"}],
            },
            "validate": {
                "deps": [{"path": "data/raw", "md5": "b.dir"}, *deps],
                "outs": [{"path": "data/validated", "md5": "c.dir"}],
            },
        }
    }
    assert set(lock_inputs(lock)) == {"data/source", *files}  # data/raw: an output
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    record, to_log = record_inputs(tmp_path)
    assert to_log == ["suites/own.json"]  # not in the commit; the bytes validate read
    assert (
        record["stages/validate/stage.py"]["in_git"]
        and not record["stages/validate/stage.py"]["logged"]
    )
    assert record["suites/own.json"]["md5"] == file_md5(tmp_path / "suites/own.json")
    assert not record["suites/old.json"]["logged"]  # changed since: these are not its input
    assert record["data/source"] == {
        "lock_md5": "a.dir",
        "stages": ["ingest"],
        "md5": None,
        "in_git": False,
        "logged": False,
    }


def test_inputs_must_have_the_recorded_hash(tmp_path: Path) -> None:
    from stages.common.tracking import file_md5

    (tmp_path / "suites").mkdir()
    suite = tmp_path / "suites/own.json"
    suite.write_text('{"name": "own"}')
    inputs = {
        "suites/own.json": {
            "md5": file_md5(suite),
            "stages": ["validate"],
            "in_git": False,
            "logged": True,
        },
        "data/source": {"md5": None, "stages": ["ingest"], "in_git": False},
        "big.csv": {"md5": "0" * 32, "stages": ["ingest"], "in_git": False},
    }
    assert reproduce.check_inputs(tmp_path, inputs, ["validate", "train"], False) == []
    suite.write_text('{"name": "edited"}')
    with pytest.raises(reproduce.ReproduceError, match="suites/own.json, read by validate"):
        reproduce.check_inputs(tmp_path, inputs, ["validate", "train"], False)
    assert reproduce.restore_inputs(tmp_path, {"suites/own.json": b'{"name": "own"}'}) == [
        "suites/own.json"
    ]
    assert reproduce.check_inputs(tmp_path, inputs, ["validate"], False) == []
    suite.unlink()
    with pytest.raises(reproduce.ReproduceError, match="has missing"):
        reproduce.check_inputs(tmp_path, inputs, ["validate"], False)


@pytest.fixture
def registered(mlflow_uri: str) -> str:
    """A store with one registered version (no training): version 1, alias champion."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    run = client.create_run(client.create_experiment("lineage-test"))
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, "file:///nowhere", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, "champion", "1")
    return mlflow_uri


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (f"{MODEL}@nope", "has no alias 'nope' (aliases: champion -> v1)"),
        (f"{MODEL}/7", "has no version 7 (versions: 1)"),
        ("other@champion", "no registered model 'other' (registered: classifier)"),
        ("classifier", "expected <model>@<alias>"),
    ],
)
def test_lineage_names_what_is_unknown(
    registered: str, tmp_path: Path, ref: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lineage.main([ref, "--repo", str(tmp_path)]) == 1
    assert expected in capsys.readouterr().err


def test_lineage_of_a_run_without_lineage_artifacts(
    registered: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert lineage.main([f"{MODEL}@champion", "--repo", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "version 1 (aliases: champion)" in out and "not logged for this run" in out
    assert reproduce.main([f"{MODEL}@champion", "--repo", str(tmp_path)]) == 1
    assert "no lineage/params.yaml artifact" in capsys.readouterr().err


def test_missing_store_is_an_error_not_an_empty_store(
    tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow/none.db")
    assert lineage.main([f"{MODEL}@champion", "--repo", str(tmp_path)]) == 1
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow").exists()


def test_relative_remote_becomes_absolute_and_urls_stay(tmp_path: Path) -> None:
    assert reproduce.resolve_remote_url("../.dvcstore", tmp_path / ".dvc") == str(
        tmp_path / ".dvcstore"
    )
    assert reproduce.resolve_remote_url("s3://bucket/dvc", tmp_path) == "s3://bucket/dvc"
    assert reproduce.resolve_remote_url("/abs/store", tmp_path) == "/abs/store"


def test_dirty_code_is_refused_unless_allowed() -> None:
    assert reproduce.check_clean([], False) is None
    assert reproduce.check_clean(["dvc.lock", "params.yaml"], False) is None
    assert reproduce.check_clean(["dvc.lock", "data/.gitignore"], False) is None  # DVC writes it
    with pytest.raises(reproduce.ReproduceError, match="stages/train/stage.py.*--allow-dirty"):
        reproduce.check_clean(["dvc.lock", "stages/train/stage.py"], False)
    with pytest.raises(reproduce.ReproduceError, match="files not recorded"):
        reproduce.check_clean(None, False)
    assert "stages/train/stage.py" in reproduce.check_clean(["stages/train/stage.py"], True)


def test_metrics_must_match_exactly() -> None:
    rows = reproduce.compare_metrics(
        {"accuracy": 0.95, "log_loss": 0.1}, {"accuracy": 0.95, "log_loss": 0.1 + 1e-12}
    )
    assert [row["match"] for row in rows] == [True, False]
    table = reproduce.render_table(rows, 1)
    assert "0.10000000000100000" not in table and "0.100000000001" in table and "NO" in table


def test_stage_order_from_dvc_dag_skips_the_restored_stage() -> None:
    dot = (
        'strict digraph {\n"ingest";\n"validate";\n"features";\n"train";\n"evaluate";\n'
        '"ingest" -> "validate";\n"validate" -> "features";\n"validate" -> "train";\n'
        '"features" -> "train";\n"features" -> "evaluate";\n"train" -> "evaluate";\n}\n'
    )
    assert reproduce.order_stages_between(dot, "ingest") == [
        "validate",
        "features",
        "train",
        "evaluate",
    ]


def test_model_refs() -> None:
    assert lineage.parse_model_ref("classifier@champion") == lineage.ModelRef(
        "classifier", alias="champion"
    )
    assert lineage.parse_model_ref("classifier/12") == lineage.ModelRef("classifier", version="12")
    for bad in ("classifier", "classifier/x", "@champion", "a@b@c"):
        with pytest.raises(lineage.LineageError):
            lineage.parse_model_ref(bad)


def test_train_time_record_reads_the_summary_defensively(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow import MlflowClient

    from stages.common.config import MlflowParams
    from stages.common.tracking import configure_mlflow, log_lineage, validation_tags

    assert validation_tags({"success": True, "rows": 9, "bad_fraction": 0.0, "failed": []}) == {
        "validation.success": "true",
        "validation.rows": "9",
        "validation.bad_fraction": "0.0",
    }
    assert validation_tags({"rows": 3}) == {"validation.rows": "3"}  # other keys: no tags
    (tmp_path / "params.yaml").write_text("base: {seed: 1}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "report").mkdir()
    (tmp_path / "report/summary.json").write_text('{"success": false, "rows": 4}')
    monkeypatch.chdir(tmp_path)
    configure_mlflow(MlflowParams(experiment="lineage"))
    with mlflow.start_run() as run:
        log_lineage(".", "params.yaml", "report")
        log_lineage(".", "params.yaml", "no-report")  # no summary: nothing to tag, no error
    client = MlflowClient(tracking_uri=mlflow_uri)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "lineage")}
    assert logged == {
        "lineage/params.yaml",
        "lineage/dvc.lock",
        "lineage/inputs.json",
        "lineage/validation_summary.json",
    }
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["validation.success"] == "false" and "validation.bad_fraction" not in tags


def test_reproducing_a_compact_version_points_at_its_parent(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A compact model's metrics are its file's, not the run's: re-running the stages would give
    # its parent's. The command says which version to reproduce instead, and builds nothing.
    from flows import reproduce

    lineage = {"model": {"name": "clf", "version": 2, "compact_of": "1"}}
    monkeypatch.setattr(reproduce, "load_lineage", lambda args: lineage)
    assert reproduce.main(["clf/2", "--workdir", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "clf v2 is a compact copy of v1" in err and "make reproduce MODEL=clf/1" in err
    assert not (tmp_path / "w").exists()
