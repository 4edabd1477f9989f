"""The gbdt family's view of the rows (``FittedPreprocessor.transform_native``) on real tables
with gaps and text categories that ship in installed packages: palmerpenguins (nulls in the
measures and in ``sex``, text ``island`` and ``sex``) and vega_datasets' cars.json (nulls in
Horsepower and Miles_per_Gallon, the model year as text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from model.preprocess import fit_preprocessor

MEASURES = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "year"]


def penguins_frame() -> pd.DataFrame:
    import palmerpenguins

    return pd.read_csv(Path(palmerpenguins.__file__).parent / "data" / "penguins.csv")


def cars_frame() -> pd.DataFrame:
    import vega_datasets

    return pd.read_json(Path(vega_datasets.__file__).parent / "_data" / "cars.json")


def test_numbers_keep_their_gaps_and_categories_become_codes_of_the_fitted_ones() -> None:
    frame = penguins_frame()
    assert frame[MEASURES].isna().any().any() and frame["sex"].isna().any()
    preprocessor = fit_preprocessor(frame.iloc[::2], "species")  # fitted on half the rows

    X = preprocessor.transform_native(frame)

    assert X.shape == (len(frame), len(MEASURES) + 2) and X.dtype == np.float64
    # numbers as they are: NaN exactly where the table has a gap, no imputation, no scaling
    np.testing.assert_array_equal(X[:, :5], frame[MEASURES].to_numpy(dtype=np.float64))
    assert np.isnan(X[:, :5]).sum() == frame[MEASURES].isna().sum().sum() > 0
    assert not np.isnan(preprocessor.transform(frame)).any()  # the networks' view: imputed
    # categories: the index among the fitted (sorted) categories; a missing one is NaN
    islands = ["Biscoe", "Dream", "Torgersen"]
    np.testing.assert_array_equal(X[:, 5], frame["island"].map(islands.index).to_numpy(float))
    sex = frame["sex"].map({"female": 0.0, "male": 1.0})
    np.testing.assert_array_equal(X[:, 6], sex.to_numpy(dtype=np.float64))
    assert preprocessor.native_categorical(255) == [False] * 5 + [True, True]
    # more categories than the model's bins: that column stays an ordered code
    assert preprocessor.native_categorical(2) == [False] * 5 + [False, True]


def test_an_unseen_or_missing_category_and_a_missing_number_are_nan() -> None:
    frame = penguins_frame()
    preprocessor = fit_preprocessor(frame, "species")
    row = frame.head(1).assign(island="Atlantis", sex=None, bill_length_mm=np.nan)

    X = preprocessor.transform_native(row)

    assert np.isnan(X[0, [0, 5, 6]]).all() and not np.isnan(X[0, 1:5]).any()


def test_cars_text_year_is_a_category_and_horsepower_keeps_its_gaps() -> None:
    frame = cars_frame().drop(columns=["Name"])  # free text: the features stage drops it
    preprocessor = fit_preprocessor(frame, "Origin")
    X = preprocessor.transform_native(frame)
    columns = preprocessor.feature_columns  # numbers first, then Year (text)
    assert columns[-1] == "Year" and preprocessor.native_categorical(255)[-1]
    horsepower = columns.index("Horsepower")
    np.testing.assert_array_equal(np.isnan(X[:, horsepower]), frame["Horsepower"].isna())
    assert sorted(np.unique(X[:, -1])) == list(range(frame["Year"].nunique()))


def test_datetime_columns_get_the_same_calendar_features_as_the_networks() -> None:
    import vega_datasets

    path = Path(vega_datasets.__file__).parent / "_data" / "seattle-weather.csv"
    frame = pd.read_csv(path, parse_dates=["date"]).head(200)
    preprocessor = fit_preprocessor(frame, "weather")

    native, encoded = preprocessor.transform_native(frame), preprocessor.transform(frame)

    n_dates = native.shape[1] - 4  # precipitation, temp_max, temp_min, wind, then the dates
    assert n_dates > 0 and preprocessor.native_categorical(255) == [False] * native.shape[1]
    np.testing.assert_allclose(native[:, 4:], encoded[:, -n_dates:], atol=1e-6)


def test_the_view_is_a_property_of_the_saved_model() -> None:
    """A gbdt saved with ``inputs: native`` scores the tree view; one saved before it (no key)
    and every network score the preprocessor's ``transform``, as they were trained."""
    from model.gbdt import NATIVE_INPUTS
    from model.predictors import Predictor

    frame = penguins_frame()
    preprocessor = fit_preprocessor(frame, "species")
    native = Predictor("gbdt", {"inputs": NATIVE_INPUTS}).features(preprocessor, frame)
    older = Predictor("gbdt", {}).features(preprocessor, frame)

    np.testing.assert_array_equal(native, preprocessor.transform_native(frame))
    np.testing.assert_array_equal(older, preprocessor.transform(frame))
