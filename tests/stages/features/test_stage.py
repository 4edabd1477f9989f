"""Features stage and the preprocessor it fits (model/preprocess.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from model.preprocess import fit_preprocessor, load_preprocessor, save_preprocessor
from stages.common.config import FeaturesParams, parse_params
from stages.common.errors import DataError
from stages.common.io import read_json
from stages.features import stage as features

SPLIT = FeaturesParams(test_size=0.2, val_size=0.2)


def make_frame(n: int = 100, seed: int = 0) -> pd.DataFrame:
    """Two numeric columns, one categorical, an imbalanced 3-class target (50/30/20 %)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(["a", "b", "c"], [n // 2, n * 3 // 10, n - n // 2 - n * 3 // 10])
    return pd.DataFrame(
        {
            "x0": rng.permutation(n).astype(float),  # unique values identify rows
            "x1": rng.normal(10, 3, n),
            "color": rng.choice(["red", "green", "blue"], n),
            "label": rng.permutation(labels),
        }
    )


# ----------------------------------------------------------------------------- preprocessor


def test_preprocessor_is_fitted_on_train_rows_only() -> None:
    train = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0], "y": [0, 1, 0, 1]})
    everything = pd.concat([train, pd.DataFrame({"x": [100.0, 200.0], "y": [0, 1]})])

    prep = fit_preprocessor(train, "y")

    scaler = prep.transformer.named_transformers_["num"].named_steps["scale"]
    assert scaler.mean_[0] == pytest.approx(train["x"].mean())
    assert scaler.mean_[0] != pytest.approx(everything["x"].mean())
    assert prep.transform(train)[:, 0].mean() == pytest.approx(0.0, abs=1e-6)
    assert prep.classes == [0, 1] and type(prep.classes[0]) is int


def test_preprocessor_imputes_missing_values_from_train() -> None:
    train = pd.DataFrame(
        {"x": [1.0, 2.0, 9.0, np.nan], "c": ["u", "u", "v", None], "y": [0, 1, 0, 1]}
    )
    prep = fit_preprocessor(train, "y")

    out = prep.transform(pd.DataFrame({"x": [np.nan, 2.0], "c": [None, "u"]}))

    assert out.dtype == np.float32 and not np.isnan(out).any()
    np.testing.assert_array_equal(out[0], out[1])  # NaN -> median 2.0; None -> "u"


def test_preprocessor_one_hot_encodes_and_ignores_unknown_categories() -> None:
    train = pd.DataFrame(
        {
            "n": [1.0, 2.0, 3.0],
            "c": ["u", "v", "w"],
            "flag": [True, False, True],
            "y": ["p", "q", "p"],
        }
    )
    prep = fit_preprocessor(train, "y")
    names = list(prep.transformer.get_feature_names_out())
    c_cols = [i for i, name in enumerate(names) if name.startswith("cat__c_")]

    out = prep.transform(
        pd.DataFrame({"n": [1.0, 1.0], "c": ["v", "never-seen"], "flag": [True, True]})
    )

    assert prep.n_features == 1 + 3 + 2
    assert out[0, c_cols].tolist() == [0.0, 1.0, 0.0]
    assert out[1, c_cols].tolist() == [0.0, 0.0, 0.0]  # unknown category: all zeros


def test_preprocessor_roundtrips_through_joblib(tmp_path: Path) -> None:
    df = make_frame()
    prep = fit_preprocessor(df, "label")
    save_preprocessor(prep, tmp_path / "prep.joblib")

    loaded = load_preprocessor(tmp_path / "prep.joblib")

    np.testing.assert_array_equal(loaded.transform(df), prep.transform(df))
    assert (loaded.feature_columns, loaded.target, loaded.classes) == (
        ["x0", "x1", "color"],
        "label",
        ["a", "b", "c"],
    )
    np.testing.assert_array_equal(
        loaded.encode_labels(df["label"].iloc[:3]),
        [["a", "b", "c"].index(v) for v in df["label"].iloc[:3]],
    )


def test_unseen_label_names_column_and_rule() -> None:
    prep = fit_preprocessor(make_frame(), "label")

    with pytest.raises(DataError, match=r"'zzz'.*column=label, rule=label_in_classes"):
        prep.encode_labels(pd.Series(["a", "zzz"], name="label"))


def test_transform_names_a_missing_feature_column() -> None:
    prep = fit_preprocessor(make_frame(), "label")

    with pytest.raises(DataError, match="column=color, rule=column_present"):
        prep.transform(make_frame().drop(columns="color"))


@pytest.mark.parametrize(
    ("value", "rule"), [("ten", "numeric"), (float("inf"), "finite"), (1e300, "float32_range")]
)
def test_bad_numeric_values_name_column_and_rule(value: object, rule: str) -> None:
    prep = fit_preprocessor(make_frame(), "label")
    bad = make_frame().head(3).astype({"x1": object})
    bad.loc[1, "x1"] = value

    with pytest.raises(DataError, match=f"column=x1, rule={rule}"):
        prep.transform(bad)


# ----------------------------------------------------------------------------- split


def test_split_is_stratified_disjoint_and_sized_from_the_whole() -> None:
    df = make_frame(n=100)

    splits = features.split_data(df, "label", SPLIT, seed=7)

    assert {name: len(part) for name, part in splits.items()} == {
        "train": 60,
        "val": 20,
        "test": 20,
    }
    ids = [set(part["x0"]) for part in splits.values()]
    assert set().union(*ids) == set(df["x0"]) and sum(map(len, ids)) == len(df)
    overall = df["label"].value_counts(normalize=True)
    for part in splits.values():
        share = part["label"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.05
    assert list(splits["train"].columns) == list(df.columns)  # raw columns, not transformed


def test_split_is_repeatable_with_a_seed() -> None:
    df = make_frame()

    first = features.split_data(df, "label", SPLIT, seed=3)
    again = features.split_data(df, "label", SPLIT, seed=3)
    other = features.split_data(df, "label", SPLIT, seed=4)

    for name in features.SPLITS:
        pd.testing.assert_frame_equal(first[name], again[name])
    assert not first["test"]["x0"].equals(other["test"]["x0"])


# ----------------------------------------------------------------------------- stage I/O


def _params(batch_rows: int = 262_144, **features_params) -> object:
    return parse_params(
        {
            "ingest": {"target": "label"},
            "base": {"batch_rows": batch_rows},
            "features": features_params,
        }
    )


def _write_project(tmp_path: Path, df: pd.DataFrame) -> tuple[Path, Path]:
    validated = tmp_path / "data" / "validated"
    validated.mkdir(parents=True)
    df.to_parquet(validated / "data.parquet", index=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"ingest": {"target": "label"}, "base": {"seed": 1}}))
    return validated, params_file


def test_main_writes_splits_preprocessor_and_meta(tmp_path: Path) -> None:
    df = make_frame(n=100)
    validated, params_file = _write_project(tmp_path, df)
    out = tmp_path / "data" / "features"

    code = features.main(
        ["--params", str(params_file), "--validated", str(validated), "--out", str(out)]
    )

    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "preprocessor.joblib",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]
    meta = read_json(out / "meta.json")
    assert meta["target"] == "label" and meta["classes"] == ["a", "b", "c"]
    assert meta["feature_columns"] == ["x0", "x1", "color"] and meta["n_features"] == 5
    assert meta["n_rows"] == {"train": 60, "val": 20, "test": 20}
    train = pd.read_parquet(out / "train.parquet")
    pd.testing.assert_frame_equal(train, features.split_data(df, "label", SPLIT, seed=1)["train"])
    assert load_preprocessor(out / "preprocessor.joblib").transform(train).shape == (60, 5)
    assert not list(out.parent.glob(".features.*"))  # no temporary folder left behind


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda df: pd.concat(
                [
                    df,
                    pd.DataFrame(
                        {
                            "x0": [-1.0, -2.0],
                            "x1": [0.0, 0.0],
                            "color": ["red", "red"],
                            "label": ["rare"] * 2,
                        }
                    ),
                ]
            ),
            r"'rare': 2.*too few to stratify.*column=label, rule=min_rows_per_class",
        ),
        (lambda df: df.drop(columns="label"), r"column=label, rule=column_present"),
        (
            lambda df: df.assign(label=df["label"].where(df.index > 0)),
            r"1 row\(s\) have no label.*column=label, rule=not_null",
        ),
        (
            lambda df: df.assign(label="a"),
            r"only one class \('a'\).*column=label, rule=min_classes",
        ),
        (lambda df: df.head(0), r"no rows to split.*rule=not_empty"),
        (
            lambda df: df[["label"]],
            r"no feature columns besides the target.*column=label, rule=has_features",
        ),
        (
            lambda df: df.assign(name=[f"n{i}" for i in range(len(df))])[["name", "label"]],
            r"no feature columns left besides the target.*column=label, rule=has_features",
        ),
    ],
)
def test_bad_target_fails_clearly_and_leaves_outputs_alone(
    tmp_path: Path, change, message: str
) -> None:
    validated, _ = _write_project(tmp_path, change(make_frame()))
    out = tmp_path / "data" / "features"
    out.mkdir()
    (out / "meta.json").write_text("previous version")
    params = parse_params({"ingest": {"target": "label"}})

    with pytest.raises(DataError, match=message) as err:
        features.run(validated, out, params)

    assert f"file={validated / 'data.parquet'}" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["meta.json"]
    assert (out / "meta.json").read_text() == "previous version"
    assert sorted(p.name for p in out.parent.iterdir()) == ["features", "validated"]


def test_numeric_fast_path_matches_the_fitted_pipeline_and_its_errors() -> None:
    from stages.ingest.stage import load_sklearn_dataset

    df = load_sklearn_dataset("breast_cancer")
    df.iloc[0, 3] = np.nan  # imputed with the train median, as the pipeline does
    preprocessor = fit_preprocessor(df, "target")
    rows = df.drop(columns=["target"])
    general = np.ascontiguousarray(preprocessor.transformer.transform(rows), dtype=np.float32)
    np.testing.assert_array_equal(preprocessor.transform(rows), general)
    np.testing.assert_array_equal(preprocessor.transform(rows[rows.columns[::-1]]), general)
    bad = {
        "missing": (rows.drop(columns=["mean_area"]), "rule=column_present"),
        "infinite": (rows.assign(mean_area=np.inf), "rule=finite"),
        "text": (rows.assign(mean_area="big"), "rule=numeric"),
    }
    for frame, rule in bad.values():  # off the fast path: the pipeline's own errors
        with pytest.raises(DataError, match=f"column=mean_area, rule={rule.split('=')[1]}"):
            preprocessor.transform(frame)


def test_splits_and_preprocessor_do_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    df = make_frame(n=1000)
    validated, _ = _write_project(tmp_path, df)
    small = features.run(validated, tmp_path / "small", _params(batch_rows=64))
    large = features.run(validated, tmp_path / "large", _params(batch_rows=100_000))

    assert small.meta == large.meta
    for name in features.SPLITS:
        pd.testing.assert_frame_equal(
            pd.read_parquet(small.paths[name]), pd.read_parquet(large.paths[name])
        )
    np.testing.assert_array_equal(
        small.preprocessor.transform(df), large.preprocessor.transform(df)
    )
    train = pq.ParquetFile(small.paths["train"]).metadata
    groups = [train.row_group(i).num_rows for i in range(train.num_row_groups)]
    assert groups[:-1] == [64] * (len(groups) - 1) and sum(groups) == 600  # whole row groups


def test_stage_output_is_exactly_stratified_on_balanced_classes(tmp_path: Path) -> None:
    df = make_frame(n=3000).assign(label=np.tile(["a", "b", "c"], 1000))
    validated, _ = _write_project(tmp_path, df)

    result = features.run(validated, tmp_path / "features", _params(batch_rows=128))

    for name, share in (("train", 600), ("val", 200), ("test", 200)):
        counts = pd.read_parquet(result.paths[name])["label"].value_counts()
        assert counts.to_dict() == {"a": share, "b": share, "c": share}


def test_drop_columns_and_datetimes_stay_in_the_splits_but_are_not_features(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    df = make_frame(n=200).assign(
        row_id=np.arange(200), seen_at=pd.date_range("2024-01-01", periods=200, freq="h")
    )
    validated, _ = _write_project(tmp_path, df)

    with caplog.at_level("INFO", logger="stages.features.stage"):
        result = features.run(
            validated, tmp_path / "features", _params(drop_columns=["row_id"], datetime="drop")
        )

    assert result.meta["feature_columns"] == ["x0", "x1", "color"]
    assert result.meta["drop_columns"] == ["row_id"]
    assert result.meta["datetime_columns"] == ["seen_at"]
    assert [(d["column"], d["rule"]) for d in result.meta["dropped"]] == [
        ("row_id", "drop_columns"),
        ("seen_at", "datetime"),
    ]
    assert "['seen_at']" in caplog.text and "not used as features" in caplog.text
    train = pd.read_parquet(result.paths["train"])
    assert list(train.columns) == list(df.columns)  # every validated column is kept
    assert result.preprocessor.transform(train).shape == (len(train), 5)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (["row_idd"], r"drop_columns names 'row_idd', which is not a column.*column=row_idd"),
        (["label"], r"drop_columns names 'label', which is the target.*column=label"),
    ],
)
def test_bad_drop_columns_fail_clearly_and_leave_outputs_alone(
    tmp_path: Path, drop: list[str], message: str
) -> None:
    validated, _ = _write_project(tmp_path, make_frame().assign(row_id=np.arange(100)))
    out = tmp_path / "data" / "features"
    out.mkdir()
    (out / "meta.json").write_text("previous version")

    with pytest.raises(DataError, match=message + ".*rule=drop_columns"):
        features.run(validated, out, _params(drop_columns=drop))

    assert [p.name for p in out.iterdir()] == ["meta.json"]
    assert (out / "meta.json").read_text() == "previous version"


def test_stage_fit_equals_a_plain_fit_on_the_train_split(tmp_path: Path) -> None:
    df = make_frame(n=500)
    df.loc[::7, "x1"] = np.nan
    df.loc[::11, "color"] = None
    validated, _ = _write_project(tmp_path, df)

    result = features.run(validated, tmp_path / "features", _params(batch_rows=50))

    train = pd.read_parquet(result.paths["train"])
    plain = fit_preprocessor(train, "label")
    np.testing.assert_allclose(result.preprocessor.transform(df), plain.transform(df), atol=1e-6)
    assert result.preprocessor.classes == plain.classes == ["a", "b", "c"]


# ----------------------------------------------------------------------------- real tables


def vega_csv(name: str) -> pd.DataFrame:
    """A vega_datasets table as its CSV holds it (dates stay text)."""
    from importlib.resources import files

    return pd.read_csv(files("vega_datasets") / "_data" / name)


def penguins_raw() -> pd.DataFrame:
    from importlib.resources import files

    return pd.read_csv(files("palmerpenguins") / "data" / "penguins-raw.csv")


def _write_validated(tmp_path: Path, df: pd.DataFrame, formats: dict[str, str]) -> Path:
    """``df`` as validate writes it: text dates parsed, their format in the field metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    validated = tmp_path / "validated"
    validated.mkdir()
    parsed = df.assign(**{col: pd.to_datetime(df[col], format=fmt) for col, fmt in formats.items()})
    table = pa.Table.from_pandas(parsed, preserve_index=False)
    schema = pa.schema(
        [
            field.with_metadata({b"format": formats[field.name].encode()})
            if field.name in formats
            else field
            for field in table.schema
        ]
    )
    pq.write_table(table.cast(schema), validated / features.DATA_FILE)
    return validated


def _real_params(target: str, **features_params: object) -> object:
    return parse_params({"ingest": {"target": target}, "features": features_params})


def test_text_dates_become_calendar_features_computed_from_raw_rows(tmp_path: Path) -> None:
    raw = vega_csv("seattle-weather.csv")  # date like 2012/01/01
    validated = _write_validated(tmp_path, raw, {"date": "%Y/%m/%d"})

    result = features.run(validated, tmp_path / "features", _real_params("weather"))

    meta, prep = result.meta, result.preprocessor
    assert meta["feature_columns"][0] == "date" and meta["date_formats"] == {"date": "%Y/%m/%d"}
    assert meta["n_features"] == 4 + 6  # four numbers + sin/cos of month, weekday, day of year
    assert "date__date_yearday_sin" in prep.transformer.get_feature_names_out()
    train = pd.read_parquet(result.paths["train"])
    rows = raw.set_index("date").loc[train["date"].dt.strftime("%Y/%m/%d")].reset_index()
    np.testing.assert_array_equal(prep.transform(rows), prep.transform(train))  # text as served
    first = prep.transform(raw.head(1))[0, 4:]  # 2012/01/01, a Sunday
    np.testing.assert_allclose(
        first, [0, 1, np.sin(2 * np.pi * 6 / 7), np.cos(2 * np.pi * 6 / 7), 0, 1], atol=1e-6
    )
    plain = fit_preprocessor(train, "weather", {"date": "%Y/%m/%d"})
    np.testing.assert_allclose(prep.transform(raw), plain.transform(raw), atol=1e-6)
    with pytest.raises(
        DataError,
        match=r"'31\.12\.2015' is not a date in format %Y/%m/%d.*"
        r"column=date, rule=date_format",
    ):
        prep.transform(raw.head(1).assign(date="31.12.2015"))


def test_calendar_adds_the_hour_when_times_vary_streamed_as_in_memory(tmp_path: Path) -> None:
    df = make_frame(n=300).assign(seen_at=pd.date_range("2024-01-01", periods=300, freq="7h"))
    validated, _ = _write_project(tmp_path, df)

    result = features.run(validated, tmp_path / "features", _params(batch_rows=64))

    names = list(result.preprocessor.transformer.get_feature_names_out())
    assert "date__seen_at_hour_sin" in names and result.meta["n_features"] == 5 + 8
    train = pd.read_parquet(result.paths["train"])
    plain = fit_preprocessor(train, "label")
    np.testing.assert_allclose(result.preprocessor.transform(df), plain.transform(df), atol=1e-6)
    iso = df.assign(seen_at=df["seen_at"].dt.strftime("%Y-%m-%dT%H:%M:%S"))
    np.testing.assert_array_equal(
        result.preprocessor.transform(iso), result.preprocessor.transform(df)
    )


HIGH_CARDINALITY = {  # table: (frame, target, text dates, columns dropped as ids / free text)
    "penguins-raw": (penguins_raw, "Species", {"Date Egg": "%Y-%m-%d"}, ["Individual ID"]),
    "la-riots": (
        lambda: vega_csv("la-riots.csv"),
        "gender",
        {"death_date": "%Y-%m-%d"},
        ["first_name", "last_name", "address", "neighborhood"],
    ),
}


@pytest.mark.parametrize("table", HIGH_CARDINALITY)
def test_high_cardinality_text_is_dropped_with_a_warning(
    table: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load, target, dates, ids = HIGH_CARDINALITY[table]
    validated = _write_validated(tmp_path, load(), dates)

    with caplog.at_level("WARNING", logger="stages.features.stage"):
        result = features.run(validated, tmp_path / "features", _real_params(target))

    dropped = {d["column"]: d for d in result.meta["dropped"]}
    assert sorted(dropped) == sorted(ids)
    assert not set(ids) & set(result.meta["feature_columns"])
    train_rows = result.meta["n_rows"]["train"]
    assert result.meta["n_features"] < train_rows / 2
    entry = dropped[ids[0]]
    assert entry["rule"] == "high_cardinality" and entry["train_rows"] == train_rows
    assert entry["distinct"] > train_rows / 2
    assert (
        f"column {ids[0]!r} has {entry['distinct']} distinct values in {train_rows}" in caplog.text
        and "features.drop_columns" in caplog.text
    )


def test_high_cardinality_error_policy_stops_naming_the_params_fix(tmp_path: Path) -> None:
    validated = _write_validated(tmp_path, penguins_raw(), {"Date Egg": "%Y-%m-%d"})
    out = tmp_path / "features"

    with pytest.raises(
        DataError,
        match=r"column 'Individual ID' has \d+ distinct values.*"
        r"features\.drop_columns.*features\.high_cardinality: "
        r"drop.*column=Individual ID, rule=high_cardinality",
    ) as err:
        features.run(validated, out, _real_params("Species", high_cardinality="error"))

    assert f"file={validated / features.DATA_FILE}" in str(err.value)
    assert not out.exists()
    kept = features.run(
        validated,
        out,
        _real_params("Species", high_cardinality="error", drop_columns=["Individual ID"]),
    )
    assert "Individual ID" not in kept.meta["feature_columns"]


def test_an_ordered_split_whose_gap_empties_a_split_fails_naming_the_file(tmp_path: Path) -> None:
    validated, _ = _write_project(tmp_path, make_frame(n=30))
    out = tmp_path / "data" / "features"

    with pytest.raises(DataError, match="gap_rows 10") as err:
        features.run(validated, out, _params(split="ordered", gap_rows=10))

    assert f"file={validated / 'data.parquet'}" in str(err.value)
    assert "rule=split_sizes" in str(err.value)
    assert not out.exists()


def test_an_ordered_split_writes_the_rows_in_data_order(tmp_path: Path) -> None:
    df = make_frame(n=100).assign(t=range(100))
    validated, _ = _write_project(tmp_path, df)
    result = features.run(
        validated, tmp_path / "features", _params(batch_rows=16, split="ordered", gap_rows=2)
    )
    splits = {name: pd.read_parquet(path)["t"].tolist() for name, path in result.paths.items()}
    assert splits["train"] == list(range(60))
    assert splits["val"] == list(range(62, 80))
    assert splits["test"] == list(range(82, 100))
    assert result.meta["split"] == "ordered"
