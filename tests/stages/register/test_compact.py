"""Register's compact model: the compress stage's chosen candidate registered beside a champion
parent under ``compress.alias``, in a child run carrying the parent's lineage, linked both ways,
idempotent (an int8 ONNX compact too, whatever non-model train params its meta carries); never
beside a challenger; a champion without a compact removes the alias (audited); a compact the
service cannot answer with is recorded, not aliased, and the parent stands.

The compact model here is what the compress stage's distill method makes: a smaller network
(hidden_sizes [4]) trained by train's own code on the same features; its report is written as
the compress stage writes it (``compact/report.json``: parent sha256, candidates, chosen).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from flows.lineage import ModelRef, build_lineage
from model.artifacts import DIGEST_TAG, file_sha256
from serving import batch
from serving.model import load_model
from stages.common.errors import DataError
from stages.register import content, registry
from stages.register import stage as register
from stages.register.compact_report import read_compact
from tests.builders import make_params
from tests.stages.register.ensemble_builders import train_member
from tests.stages.register.test_stage import LOOSE, NAME, params_file, prepare, register_args

ALIAS = "champion-compact"  # params compress.alias (default)
GATE = "accuracy 0.9500 vs the parent's 0.9600 (relative drop +1.04%); 3.10x smaller (>= 3x)"


@pytest.fixture(scope="module")
def small(trained: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller network (hidden_sizes [4]) trained on the same features: a distilled model."""
    return train_member(
        trained[0], tmp_path_factory.mktemp("small"), {"train": {"hidden_sizes": [4]}}
    )


def write_compact(
    folder: Path, parent: Path, model: Path, method: str = "distill", chosen: bool = True
) -> Path:
    """``folder`` as the compress stage writes it: ``<method>/<file>`` and report.json."""
    (folder / method).mkdir(parents=True)
    target = folder / method / model.name
    shutil.copy2(model, target)
    candidate = {
        "file": f"{folder.name}/{method}/{model.name}",
        "sha256": file_sha256(target),
        "family": "mlp",
        "metrics": {"accuracy": 0.95, "f1_macro": 0.94, "log_loss": 0.12},
        "size_bytes": target.stat().st_size,
        "latency_ms_row": 0.5,
        "latency_ms_batch64": 0.9,
        "relative_drop": 0.0104,
        "speedup": 1.2,
        "speedup_batch64": 1.1,
        "size_ratio": 3.1,
        "status": "passed" if chosen else "failed",
        "reason": GATE if chosen else "loses too much",
        "details": {"hidden_sizes": [4]},
    }
    report = {
        "status": "built" if chosen else "none_passed",
        "parent": {"file": str(parent), "sha256": file_sha256(parent), "family": "mlp"},
        "candidates": {method: candidate},
        "chosen": method if chosen else None,
        "chosen_file": candidate["file"] if chosen else None,
    }
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def _versions() -> list[str]:
    found = mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")
    return sorted((str(v.version) for v in found), key=int)


def _aliases() -> dict[str, str]:
    return {a: str(v) for a, v in mlflow.MlflowClient().get_registered_model(NAME).aliases.items()}


def _record(work: Path) -> dict:
    return json.loads((work / "reports" / "registration.json").read_text())


# ----------------------------------------------------------------------------- the report


def test_the_report_gives_the_chosen_file_or_why_there_is_none(
    tmp_path: Path, trained: tuple[Path, Path], small: Path
) -> None:
    parent = trained[1] / "model.pt"

    found, why = read_compact(write_compact(tmp_path / "ok" / "compact", parent, small), parent)
    assert found is not None and why == ""
    assert found.method == "distill" and found.path.name == "model.pt" and found.gate == GATE
    assert found.metrics["size_ratio"] == 3.1 and found.metrics["accuracy"] == 0.95
    assert "status" not in found.metrics and "details" not in found.metrics

    none = write_compact(tmp_path / "none" / "compact", parent, small, chosen=False)
    assert read_compact(none, parent) == (
        None,
        "the compress stage chose none (status none_passed)",
    )

    stale, why = read_compact(write_compact(tmp_path / "stale" / "compact", small, small), parent)
    assert stale is None and "is about another parent" in why and "re-run compress" in why


def test_a_missing_report_or_chosen_file_stops_register_before_anything(
    tmp_path: Path, trained: tuple[Path, Path], small: Path
) -> None:
    parent = trained[1] / "model.pt"
    with pytest.raises(DataError, match=r"compress stage's report is missing.*report\.json"):
        read_compact(tmp_path / "nothing", parent)
    folder = write_compact(tmp_path / "gone" / "compact", parent, small)
    (folder / "distill" / "model.pt").unlink()
    with pytest.raises(DataError, match=r"chose 'distill' but its model file is missing"):
        read_compact(folder, parent)
    folder = write_compact(tmp_path / "swapped" / "compact", parent, small)
    shutil.copy2(parent, folder / "distill" / "model.pt")  # another file under its name
    with pytest.raises(DataError, match=r"not the one the compress report measured"):
        read_compact(folder, parent)


# ----------------------------------------------------------------------------- registered


@pytest.mark.slow
def test_compact_of_a_champion_is_registered_aliased_linked_and_idempotent(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], small: Path
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())
    write_compact(work / "compact", work / "models" / "model.pt", small)
    args = [
        *register_args(work, params_file(tmp_path / "p.yaml")),
        "--compact",
        str(work / "compact"),
    ]
    client = mlflow.MlflowClient()
    parent_run = json.loads((work / "models" / "run.json").read_text())["run_id"]
    client.log_text(parent_run, "train:\n  epochs: 3\n", "lineage/params.yaml")  # as train does

    assert register.main(args) == 0

    record = _record(work)
    compact = record["compact"]
    assert record["decision"] == "promoted" and record["version"] == 1
    assert compact["status"] == "registered" and compact["version"] == 2
    assert compact["method"] == "distill" and compact["alias"] == ALIAS
    assert compact["reason"].startswith(f"distill of v1: {GATE}; the service loads it")
    assert _versions() == ["1", "2"]
    assert _aliases() == {"champion": "1", ALIAS: "2"}
    parent, small_v = client.get_model_version(NAME, "1"), client.get_model_version(NAME, "2")
    assert parent.tags["compact.version"] == "2"  # linked both ways
    assert small_v.tags["compact.parent_version"] == "1"
    assert small_v.tags["compact.method"] == "distill" and small_v.tags["compact.gate"] == GATE
    assert json.loads(small_v.tags["compact.metrics"])["size_ratio"] == 3.1
    assert small_v.tags["promotion.gate"] == "passed" and DIGEST_TAG in small_v.tags
    assert small_v.tags["model.content_hash"] == compact["content_hash"]
    assert small_v.tags["git.commit"] == "0123abc"  # the parent run's lineage
    # logged in a child run of the parent's: its params are its own, not the parent's
    assert parent.run_id == record["run_id"] == parent_run != small_v.run_id
    child = client.get_run(small_v.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_run
    assert child.data.tags["mlflow.runName"] == "compact"
    assert (
        child.data.tags["git.commit"] == "0123abc" and small_v.tags["run_id"] == child.info.run_id
    )
    hashes = " ".join(v for k, v in child.data.params.items() if "artifact_sha256" in k)
    assert file_sha256(small) in hashes and file_sha256(work / "models" / "model.pt") not in hashes
    assert not any(k.startswith("train.") for k in child.data.params)
    assert small_v.source != parent.source
    # its lineage tells its truth: the parent's code and params, its own test metrics
    told = build_lineage(client, ModelRef(NAME, version="2"), "http://ui")
    assert told["run"]["id"] == child.info.run_id and told["git"]["commit"] == "0123abc"
    assert told["params"] == {"train": {"epochs": 3}}
    assert told["metrics"] == {"accuracy": 0.95, "f1_macro": 0.94, "log_loss": 0.12}
    assert told["model"]["compact_of"] == "1"  # reproduce sends the reader to v1 (its parent)
    moves = registry.alias_history(client, NAME, ALIAS)  # moved through the audited registry
    assert [(m.to_version, m.kind, m.status, m.caused_by_run) for m in moves] == [
        ("2", "register", "done", record["run_id"])
    ]
    # served as `--alias champion-compact` would load it, and batch-scored unchanged
    served = load_model(f"models:/{NAME}@{ALIAS}")
    assert served.version == "2" and served.describe()["compact_of"] == "1"
    assert served.describe()["members"] is None
    scored = tmp_path / "scored.parquet"
    rows = batch.score_file(served, work / "features" / "test.parquet", scored)
    out = pd.read_parquet(scored)
    assert rows == len(out) and set(out["model_version"]) == {"2"}
    assert (out["prediction"] == out["target"]).mean() > 0.8  # a real, smaller model

    # the same inputs again (a new run of the same model): nothing new, the alias stays
    again = prepare(tmp_path / "again", trained, make_params())
    write_compact(again / "compact", again / "models" / "model.pt", small)
    assert (
        register.main(
            [
                *register_args(again, params_file(tmp_path / "p.yaml")),
                "--compact",
                str(again / "compact"),
            ]
        )
        == 0
    )

    record = _record(again)
    assert record["decision"] == "identical" and record["compact"]["status"] == "identical"
    assert record["compact"]["version"] == 2
    assert record["compact"]["reason"].endswith(f"nothing registered; {ALIAS} stays on it")
    assert _versions() == ["1", "2"] and _aliases() == {"champion": "1", ALIAS: "2"}
    assert len(registry.alias_history(client, NAME, ALIAS)) == 1


@pytest.mark.slow
def test_no_compact_beside_a_challenger_and_a_champion_without_one_removes_the_alias(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], small: Path
) -> None:
    loose = params_file(tmp_path / "loose.yaml", LOOSE)
    v1 = prepare(tmp_path / "v1", trained, make_params())
    write_compact(v1 / "compact", v1 / "models" / "model.pt", small)
    assert register.main([*register_args(v1, loose), "--compact", str(v1 / "compact")]) == 0
    assert _aliases() == {"champion": "1", ALIAS: "2"}
    # v3: worse -> challenger; its compact is not registered, the alias is right as it is
    v3 = prepare(tmp_path / "v3", trained, make_params(LOOSE), degrade=True)
    write_compact(v3 / "compact", v3 / "models" / "model.pt", small)

    assert register.main([*register_args(v3, loose), "--compact", str(v3 / "compact")]) == 0

    record = _record(v3)
    assert record["decision"] == "challenger" and record["version"] == 3
    assert record["compact"] == {
        "status": "not_registered",
        "reason": "compact model not registered: its parent v3 is not champion (v1 is)",
    }
    assert _versions() == ["1", "2", "3"]
    assert _aliases() == {"champion": "1", ALIAS: "2", "challenger": "3"}

    # v3 made champion by hand, then a run whose compress stage chose none: the compact alias
    # must not serve v1's compact beside champion v3: removed, through the audit log
    client = mlflow.MlflowClient()
    registry.move_alias(client, NAME, "champion", "3", "test", kind="manual")
    write_compact(v3 / "none", v3 / "models" / "model.pt", small, chosen=False)

    assert register.main([*register_args(v3, loose), "--compact", str(v3 / "none")]) == 0

    record = _record(v3)
    compact = record["compact"]
    assert compact["status"] == "not_registered" and "chose none" in compact["reason"]
    assert compact["alias_change"] == (
        f"{ALIAS} v2 -> nothing (removed): removed: v3 has no compact model (no compact.version "
        f"tag); {ALIAS} names only a compact of the champion"
    )
    assert _versions() == ["1", "2", "3"] and _aliases() == {"champion": "3", "challenger": "3"}
    last = registry.alias_history(client, NAME, ALIAS)[-1]
    assert (last.from_version, last.to_version, last.kind, last.caused_by_run) == (
        "2",
        None,
        "register",
        record["run_id"],
    )
    # v1 champion again (by hand), an identical re-run of v1: the alias back on v1's compact
    registry.move_alias(client, NAME, "champion", "1", "test", kind="manual")
    write_compact(v1 / "off", v1 / "models" / "model.pt", small, chosen=False)  # (disabled)

    assert register.main([*register_args(v1, loose), "--compact", str(v1 / "off")]) == 0

    compact = _record(v1)["compact"]
    assert compact["alias_change"] == f"{ALIAS} nothing -> v2: the compact of champion v1"
    assert _aliases()[ALIAS] == "2" and _versions() == ["1", "2", "3"]


@pytest.mark.slow
def test_a_compact_the_service_cannot_answer_with_is_recorded_and_the_parent_stands(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path], small: Path
) -> None:
    broken = tmp_path / "broken" / "model.pt"  # loads and logs, answers NaN
    broken.parent.mkdir()
    checkpoint = torch.load(small, weights_only=True)
    for tensor in checkpoint["state_dict"].values():
        tensor.fill_(float("nan"))
    torch.save(checkpoint, broken)
    work = prepare(tmp_path / "v1", trained, make_params())
    write_compact(work / "compact", work / "models" / "model.pt", broken)
    args = [
        *register_args(work, params_file(tmp_path / "p.yaml")),
        "--compact",
        str(work / "compact"),
    ]

    assert register.main(args) == 0  # the compact is optional: the stage succeeds

    record = _record(work)
    compact = record["compact"]
    assert record["decision"] == "promoted" and record["version"] == 1
    assert compact["status"] == "failed_serving_check" and compact["version"] == 2
    assert compact["reason"].startswith(f"not aliased {ALIAS}: serving check failed")
    assert _aliases() == {"champion": "1"}
    failed = mlflow.MlflowClient().get_model_version(NAME, "2")
    assert failed.tags["promotion.gate"] == "failed"
    assert failed.tags["compact.serving"].startswith("serving check failed")
    assert failed.tags["compact.parent_version"] == "1"


def _quantized(work: Path) -> list[str]:
    """The compress stage's int8 ONNX copy of ``work``'s model; register's args with it."""
    from stages.compress import stage as compress

    # the gate set so that the int8 copy passes whatever this machine's timings
    cp = {"methods": ["quantize"], "row_repeats": 3, "batch_repeats": 2}
    cp |= {"max_relative_drop": 0.5, "min_speedup": 0.01}
    report = compress.run(
        work / "features", work / "models", None, work / "compact", make_params({"compress": cp})
    )
    assert report["chosen"] == "quantize", report["reason"]
    return [*register_args(work, params_file(work / "p.yaml")), "--compact", str(work / "compact")]


def _with_train_params(model: Path, **changes: object) -> None:
    """``model`` saved again with other non-model train params: the same network."""
    checkpoint = torch.load(model, weights_only=True)
    checkpoint["train_params"] = {**checkpoint["train_params"], **changes}
    torch.save(checkpoint, model)


def test_an_onnx_models_content_is_its_graph_and_architecture_not_its_meta(
    tmp_path: Path,
) -> None:
    import onnx
    from onnx import TensorProto, helper

    from model.onnx_model import save_onnx_model

    def graph(scale: float) -> bytes:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])
        k = helper.make_tensor("k", TensorProto.FLOAT, [1], [scale])
        node = helper.make_node("Mul", ["x", "k"], ["y"])
        return helper.make_model(helper.make_graph([node], "g", [x], [y], [k])).SerializeToString()

    def saved(name: str, scale: float = 2.0, **meta: object) -> str:
        train = {"model": "mlp", "hidden_sizes": [8], "checkpoint_every_steps": 0} | meta
        meta_all = {"n_features": 3, "n_classes": 3, "train_params": train}
        path = save_onnx_model(graph(scale), meta_all, tmp_path / name / "model.int8.onnx")
        return content.content_hash(content.model_checkpoint(path), b"prep", None, {})

    first = saved("a")
    assert saved("b", checkpoint_every_steps=500, nproc=4) == first  # not the model
    assert saved("c", hidden_sizes=[16]) != first  # another architecture
    assert saved("d", scale=3.0) != first  # other weights
    broken = tmp_path / "e" / "model.int8.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"not onnx")
    with pytest.raises(DataError, match=r"cannot read the ONNX model.*re-run the compress"):
        content.model_checkpoint(broken)
    assert onnx.load(str(tmp_path / "b" / "model.int8.onnx")).metadata_props  # meta kept


@pytest.mark.slow
def test_an_int8_onnx_compact_made_by_the_compress_stage_is_registered_and_served(
    tmp_path: Path, mlflow_uri: str, trained: tuple[Path, Path]
) -> None:
    work = prepare(tmp_path / "v1", trained, make_params())

    assert register.main(_quantized(work)) == 0

    compact = _record(work)["compact"]
    assert compact["status"] == "registered" and compact["method"] == "quantize"
    assert _aliases() == {"champion": "1", ALIAS: "2"}
    served = load_model(f"models:/{NAME}@{ALIAS}")
    assert served.describe()["compact_of"] == "1"
    info = mlflow.models.get_model_info(f"models:/{NAME}/2")
    assert "model.int8.onnx" in str(info.flavors)  # the ONNX file is the pyfunc's model
    rows = pd.read_parquet(work / "features" / "test.parquet")
    answer = served.predict(rows.drop(columns=["target"]))
    assert (answer["prediction"] == rows["target"]).mean() > 0.9
    # the same network again, with other non-model train params in its file (and so in the
    # int8 file's meta): the parent is identical, the int8 copy too; nothing moves
    again = prepare(tmp_path / "again", trained, make_params())
    _with_train_params(again / "models" / "model.pt", checkpoint_every_steps=7, nproc=2)

    assert register.main(_quantized(again)) == 0

    int8 = "compact/quantize/model.int8.onnx"
    assert (work / int8).read_bytes() != (again / int8).read_bytes()  # the meta differs
    record = _record(again)
    assert record["decision"] == "identical" and record["compact"]["status"] == "identical"
    assert (
        record["compact"]["version"] == 2
        and record["compact"]["content_hash"] == (compact["content_hash"])
    )
    assert _versions() == ["1", "2"] and _aliases() == {"champion": "1", ALIAS: "2"}
    assert len(registry.alias_history(mlflow.MlflowClient(), NAME, ALIAS)) == 1
