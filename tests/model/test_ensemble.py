"""The ensemble model file and its fusion: each method on known probabilities, the stacking
layout against scikit-learn, a byte-identical zip for identical inputs, the round trip of a
gbdt (tree view) beside networks (encoded view) through load_predictor and the pyfunc's
scorer, and clear errors for a tampered or incomplete file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model import ensemble
from model.artifacts import ArtifactIntegrityError
from model.ensemble import (
    EnsembleInputs,
    EnsemblePredictor,
    fuse,
    load_ensemble,
    stacking_features,
    stacking_from_sklearn,
    write_ensemble,
)
from model.errors import DataError
from model.gbdt import NATIVE_INPUTS, save_gbdt
from model.nets import build_network
from model.predictors import load_predictor
from model.preprocess import FittedPreprocessor, fit_preprocessor, save_preprocessor
from model.servable import load_scorer

P1 = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
P2 = np.array([[0.4, 0.6], [0.4, 0.6], [0.9, 0.1]])
P3 = np.array([[0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])


def penguins() -> pd.DataFrame:
    import palmerpenguins

    return pd.read_csv(Path(palmerpenguins.__file__).parent / "data" / "penguins.csv")


def save_mlp(preprocessor: FittedPreprocessor, seed: int, path: Path, n_classes: int = 3) -> Path:
    """A small MLP over the encoded view, in the checkpoint format train writes."""
    torch.manual_seed(seed)
    spec = {"model": "mlp", "hidden_sizes": [8], "dropout": 0.0}
    network = build_network(spec, preprocessor.n_features, n_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "state_dict": network.state_dict(),
        "train_params": spec,
        "n_features": preprocessor.n_features,
        "n_classes": n_classes,
        "epoch": seed,
        "val_loss": 1.0 + seed,
    }
    torch.save(checkpoint, path)
    return path


def save_tree_model(preprocessor: FittedPreprocessor, frame: pd.DataFrame, path: Path) -> Path:
    """A gbdt fitted on the tree view (NaN kept, categories as codes), as train saves it."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    X = preprocessor.transform_native(frame)
    categorical = preprocessor.native_categorical(255)
    trees = HistGradientBoostingClassifier(
        max_iter=5, categorical_features=categorical, random_state=0
    ).fit(X, preprocessor.encode_labels(frame["species"]))
    meta = {
        "train_params": {"model": "gbdt"},
        "n_features": X.shape[1],
        "n_classes": 3,
        "epoch": 5,
        "val_loss": 0.3,
        "inputs": NATIVE_INPUTS,
        "categorical": categorical,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_gbdt(trees, meta, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ensemble")
    frame = penguins()
    preprocessor = fit_preprocessor(frame, "species")
    save_preprocessor(preprocessor, root / "preprocessor.joblib")
    files = [
        save_mlp(preprocessor, 0, root / "a" / "model.pt"),
        save_tree_model(preprocessor, frame, root / "b" / "model.skops"),
        save_mlp(preprocessor, 1, root / "c" / "model.pt"),
    ]
    names = [("train", "train"), ("gbdt", "family:gbdt"), ("seed-1", "seed:1")]
    members = [
        {"name": name, "source": source, "file": file}
        for (name, source), file in zip(names, files, strict=True)
    ]
    return {"root": root, "frame": frame, "preprocessor": preprocessor, "members": members}


# --- fusion on known numbers --------------------------------------------------------------------


def test_mean_and_weighted_and_caruana_are_averages() -> None:
    np.testing.assert_allclose(fuse([P1, P2], "mean"), [[0.55, 0.45], [0.3, 0.7], [0.75, 0.25]])
    expected = [[0.475, 0.525], [0.35, 0.65], [0.825, 0.175]]
    np.testing.assert_allclose(fuse([P1, P2], "weighted", [0.25, 0.75]), expected)
    np.testing.assert_allclose(fuse([P1, P2], "caruana", [0.25, 0.75]), expected)
    # a member caruana never picked has weight 0 and no say
    np.testing.assert_allclose(fuse([P1, P2], "caruana", [0.0, 1.0]), P2)


def test_vote_is_the_majority_share_with_a_tenth_of_the_mean() -> None:
    fused = fuse([P1, P2, P3], "vote")
    # votes: row 0 -> 0,1,0; row 1 -> 1,1,1; row 2 -> 0,0,1
    share = np.array([[2, 1], [0, 3], [2, 1]]) / 3
    mean = (P1 + P2 + P3) / 3
    np.testing.assert_allclose(fused, 0.9 * share + 0.1 * mean)
    assert fused.argmax(axis=1).tolist() == [0, 1, 0]
    assert ((fused > 0) & (fused < 1)).all()  # log loss stays finite
    np.testing.assert_allclose(fused.sum(axis=1), 1.0)
    # two members disagree on every row: a tie, broken by the mean probability
    tied = fuse([P1, P2], "vote")
    np.testing.assert_allclose(tied[0], [0.45 + 0.055, 0.45 + 0.045])
    assert tied.argmax(axis=1).tolist() == [0, 1, 0]


def test_vote_mean_share_never_outweighs_one_vote() -> None:
    """With many members the mean's share shrinks below 1 / (members + 1): 11 hesitant votes
    for class 0 beat 10 sure ones for class 1, where a fixed tenth of the mean would not."""
    sure, unsure = np.array([[0.0, 1.0, 0.0]]), np.array([[0.34, 0.33, 0.33]])
    probas = [unsure] * 11 + [sure] * 10
    share, mean = np.array([[11, 10, 0]]) / 21, np.mean(probas, axis=0)

    assert (0.9 * share + 0.1 * mean).argmax() == 1  # a fixed 10% would flip the majority
    assert fuse(probas, "vote").argmax() == 0
    np.testing.assert_allclose(fuse(probas, "vote"), (1 - 0.5 / 22) * share + 0.5 / 22 * mean)


def test_stacking_applies_stored_coefficients_binary_and_multiclass() -> None:
    fused = fuse([P1, P2], "stacking", stacking={"coef": [[1, -1, 2, -2]], "intercept": [0.5]})
    # row 0: z = (0.7 - 0.3) + 2 (0.4 - 0.6) + 0.5 = 0.5 -> sigmoid for class 1
    np.testing.assert_allclose(fused[0], [1 - 0.6224593312018546, 0.6224593312018546])
    coef = np.zeros((2, 4))
    coef[1, 0] = np.log(3) / 0.7  # row 0: logits 0 and log 3 -> softmax 1/4, 3/4
    fused = fuse([P1, P2], "stacking", stacking={"coef": coef.tolist(), "intercept": [0, 0]})
    np.testing.assert_allclose(fused[0], [0.25, 0.75])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_stacking_matches_sklearn_on_the_documented_layout(n_classes: int) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    probas = [rng.dirichlet(np.ones(n_classes), size=60) for _ in range(3)]
    y = (probas[0].argmax(axis=1) + (rng.random(60) < 0.2)) % n_classes
    lr = LogisticRegression(C=1.0).fit(stacking_features(probas), y)

    stored = stacking_from_sklearn(lr)

    assert stacking_features(probas).shape == (60, 3 * n_classes)
    assert np.shape(stored["coef"]) == ((1, 6) if n_classes == 2 else (3, 9))
    expected = lr.predict_proba(stacking_features(probas))
    np.testing.assert_allclose(fuse(probas, "stacking", stacking=stored), expected, atol=1e-12)


def test_stacking_fitted_without_a_class_gives_it_zero() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    probas = [rng.dirichlet(np.ones(3), size=40) for _ in range(2)]
    y = np.where(probas[0][:, 0] > 0.3, 0, 2)  # class 1 absent from val
    lr = LogisticRegression().fit(stacking_features(probas), y)
    stored = stacking_from_sklearn(lr)

    fused = fuse(probas, "stacking", stacking=stored)

    assert stored["classes"] == [0, 2] and (fused[:, 1] == 0).all()
    np.testing.assert_allclose(fused[:, [0, 2]], lr.predict_proba(stacking_features(probas)))
    with pytest.raises(ValueError, match="class ids 0..k-1, not labels"):
        stacking_from_sklearn(LogisticRegression().fit(stacking_features(probas), y.astype(str)))


@pytest.mark.parametrize(
    ("probas", "method", "weights", "stacking", "message"),
    [
        ([], "mean", None, None, "at least one member"),
        ([P1, P1[:2]], "mean", None, None, "one shape"),
        ([P1, P2], "median", None, None, "unknown fusion method 'median'"),
        ([P1, P2], "mean", [0.5, 0.5], None, "weights are for weighted/caruana"),
        ([P1, P2], "weighted", None, None, "weights are for weighted/caruana"),
        ([P1, P2], "weighted", [1.0], None, "need 2 finite values"),
        ([P1, P2], "caruana", [-0.5, 1.5], None, "need 2 finite values >= 0"),
        ([P1, P2], "weighted", [2.0, 1.0], None, "sum to 3; normalise them to 1"),
        ([P1, P2], "stacking", None, None, "stacking coefficients are for stacking only"),
        ([P1, P2], "stacking", None, {"coef": [[1, 2]], "intercept": [0]}, r"expected \(1, 4\)"),
        ([P1, P2], "stacking", None, {"intercept": [0]}, "numeric 'coef' and 'intercept'"),
    ],
)
def test_fuse_refuses_inputs_that_do_not_fit(probas, method, weights, stacking, message) -> None:
    with pytest.raises(ValueError, match=message):
        fuse(probas, method, weights, stacking)


# --- the file -----------------------------------------------------------------------------------


def test_the_zip_is_byte_identical_for_identical_inputs(built: dict, tmp_path: Path) -> None:
    args = (built["members"], "weighted", [0.5, 0.25, 0.25])
    first = write_ensemble(tmp_path / "one" / "model.ensemble.zip", *args)
    second = write_ensemble(tmp_path / "two" / "model.ensemble.zip", *args)

    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        names = archive.namelist()
        assert (
            names
            == sorted(names)
            == [
                "ensemble.json",
                "members/gbdt/model.skops",
                "members/seed-1/model.pt",
                "members/train/model.pt",
            ]
        )
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    other = write_ensemble(tmp_path / "three" / "model.ensemble.zip", built["members"], "mean")
    assert other.read_bytes() != first.read_bytes()


def test_round_trip_fuses_a_gbdt_and_networks_on_their_own_views(
    built: dict, tmp_path: Path
) -> None:
    weights = [0.5, 0.3, 0.2]
    path = write_ensemble(tmp_path / "model.ensemble.zip", built["members"], "weighted", weights)
    singles = [load_predictor(m["file"]) for m in built["members"]]
    preprocessor, frame = built["preprocessor"], built["frame"]

    loaded = load_predictor(path)  # dispatches on the file name
    X = loaded.features(preprocessor, frame)

    assert isinstance(loaded, EnsemblePredictor) and loaded.family == "ensemble"
    assert not loaded.is_network and loaded.n_classes == 3
    assert isinstance(X, EnsembleInputs) and set(X.views) == {"native", "encoded"}
    assert X.shape == (len(frame), preprocessor.n_features) == (len(frame), loaded.n_features)
    probas = [p.predict_proba(p.features(preprocessor, frame)) for p in singles]
    for got, want in zip(loaded.member_probas(X), probas, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.predict_proba(X), fuse(probas, "weighted", weights))
    head = fuse([p[:5] for p in probas], "weighted", weights)
    np.testing.assert_allclose(loaded.predict_proba(X[:5], batch_size=2), head, atol=1e-6)
    members = loaded.meta["members"]
    assert [(m["name"], m["source"], m["family"], m["view"]) for m in members] == [
        ("train", "train", "mlp", "encoded"),
        ("gbdt", "family:gbdt", "gbdt", "native"),
        ("seed-1", "seed:1", "mlp", "encoded"),
    ]
    assert loaded.meta["train_params"]["model"] == "mlp" and loaded.meta["epoch"] == 0
    assert loaded.meta["method"] == "weighted" and loaded.meta["weights"] == weights
    with pytest.raises(ValueError, match="different views"):
        loaded.predict_proba(X.views["encoded"])


def test_one_view_takes_a_plain_array_and_to_moves_the_networks(
    built: dict, tmp_path: Path
) -> None:
    nets = [built["members"][0], built["members"][2]]
    loaded = load_ensemble(write_ensemble(tmp_path / "model.ensemble.zip", nets, "vote"))
    X = built["preprocessor"].transform(built["frame"])

    fused = loaded.to("cpu").predict_proba(X)

    assert fused.shape == (len(X), 3) and ((fused > 0) & (fused < 1)).all()
    assert all(m.device == torch.device("cpu") for _, m in loaded.members)


def test_the_pyfunc_scorer_predicts_with_the_ensemble(built: dict, tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    preprocessor, frame = built["preprocessor"], built["frame"]
    singles = [load_predictor(m["file"]) for m in built["members"]]
    probas = [p.predict_proba(p.features(preprocessor, frame)) for p in singles]
    y = preprocessor.encode_labels(frame["species"])
    lr = LogisticRegression().fit(stacking_features(probas), y)
    stacking = stacking_from_sklearn(lr)
    path = write_ensemble(
        tmp_path / "model.ensemble.zip", built["members"], "stacking", None, stacking
    )

    scorer = load_scorer(built["root"] / "preprocessor.joblib", path, device="cpu")
    served = scorer.predict(frame.drop(columns=["species"]).head(20))

    assert list(served.columns) == ["prediction"] + [f"proba_{c}" for c in preprocessor.classes]
    expected = lr.predict_proba(stacking_features(probas))[:20]
    np.testing.assert_allclose(served.filter(like="proba_").to_numpy(), expected, atol=1e-12)
    assert served["prediction"].tolist() == [preprocessor.classes[i] for i in expected.argmax(1)]


# --- failure paths ------------------------------------------------------------------------------


def _rewrite(source: Path, target: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of the zip with entries replaced (bytes) or left out (None)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change.get(info.filename, old.read(info.filename))
            if data is not None:
                new.writestr(info, data)
    return target


def test_a_tampered_or_missing_member_is_refused_by_name(built: dict, tmp_path: Path) -> None:
    path = write_ensemble(tmp_path / "model.ensemble.zip", built["members"], "mean")
    member = "members/seed-1/model.pt"
    other = Path(built["members"][0]["file"]).read_bytes()  # a valid network, not the pinned one

    tampered = _rewrite(path, tmp_path / "tampered.zip", {member: other})
    with pytest.raises(ArtifactIntegrityError, match=rf"member 'seed-1' \({member}\).*not the"):
        load_ensemble(tampered)
    missing = _rewrite(path, tmp_path / "missing.zip", {member: None})
    with pytest.raises(DataError, match=rf"member 'seed-1': {member} is named in ensemble.json"):
        load_ensemble(missing)
    with pytest.raises(DataError, match="not a readable ensemble"):
        load_ensemble(_rewrite(path, tmp_path / "nospec.zip", {"ensemble.json": None}))
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable ensemble"):
        load_ensemble(tmp_path / "junk.zip")


def test_write_refuses_bad_members_and_fusion_settings(built: dict, tmp_path: Path) -> None:
    first, out = built["members"][0], tmp_path / "model.ensemble.zip"
    with pytest.raises(DataError, match="member name 'a/b'"):
        write_ensemble(out, [first | {"name": "a/b"}], "mean")
    with pytest.raises(DataError, match="member name 'train'"):
        write_ensemble(out, [first, first], "mean")
    with pytest.raises(DataError, match="member 'x': expected an existing model.pt"):
        write_ensemble(out, [{"name": "x", "source": "", "file": tmp_path / "model.pt"}], "mean")
    two_classes = save_mlp(built["preprocessor"], 2, tmp_path / "two" / "model.pt", n_classes=2)
    with pytest.raises(DataError, match=r"different numbers of classes: \[3, 2\]"):
        write_ensemble(out, [first, {"name": "b", "file": two_classes}], "mean")
    with pytest.raises(ValueError, match="need 1 finite values"):
        write_ensemble(out, [first], "weighted", [0.5, 0.5])
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "two"]  # nothing left


def test_loading_leaves_no_temporary_files(built: dict, tmp_path: Path, monkeypatch) -> None:
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = write_ensemble(tmp_path / "model.ensemble.zip", built["members"][:2], "mean")
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    load_ensemble(path)

    assert list(scratch.iterdir()) == [] and ensemble.FORMAT == 1
