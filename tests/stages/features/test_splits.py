"""The streaming stratified split (stages/features/splits.py): exact, seeded, batch-independent."""

from __future__ import annotations

import numpy as np
import pytest

from stages.features.splits import TEST, TRAIN, VAL, SplitAssigner, SplitPlan, block_size


def shuffled_labels(counts: list[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))


def assign(
    labels: np.ndarray,
    seed: int = 1,
    chunk: int | None = None,
    sizes: tuple[float, float] = (0.2, 0.2),
) -> np.ndarray:
    plan = SplitPlan(seed, *sizes, np.bincount(labels))
    assigner = SplitAssigner(plan)
    chunks = [labels] if chunk is None else np.array_split(labels, -(-len(labels) // chunk))
    return np.concatenate([assigner.assign(part) for part in chunks])


def per_class(labels: np.ndarray, codes: np.ndarray) -> list[list[int]]:
    """[train, val, test] rows per class."""
    return [np.bincount(codes[labels == c], minlength=3).tolist() for c in range(labels.max() + 1)]


@pytest.mark.parametrize("chunk", [1, 7, 100, 999, 4096])
def test_assignment_does_not_depend_on_the_batch_size(chunk: int) -> None:
    labels = shuffled_labels([2300, 1217, 45, 3])

    np.testing.assert_array_equal(assign(labels, chunk=chunk), assign(labels))


def test_assignment_is_repeatable_and_changes_with_the_seed() -> None:
    labels = shuffled_labels([500, 500])

    assert (assign(labels, seed=3) == assign(labels, seed=3)).all()
    assert (assign(labels, seed=3) != assign(labels, seed=4)).any()


def test_balanced_data_is_split_exactly_per_class() -> None:
    labels = shuffled_labels([1000, 1000, 1000])

    assert per_class(labels, assign(labels, chunk=333)) == [[600, 200, 200]] * 3


def test_every_full_block_is_exactly_stratified() -> None:
    labels = shuffled_labels([1000, 700])
    codes = assign(labels)
    block = block_size(0.2, 0.2)

    for c in (0, 1):
        in_class = codes[labels == c]
        for start in range(0, len(in_class) - block + 1, block):
            counts = np.bincount(in_class[start : start + block], minlength=3)
            assert counts.tolist() == [60, 20, 20]


def test_rows_inside_a_block_are_permuted_not_taken_in_order() -> None:
    labels = np.zeros(1000, dtype=np.int64)
    labels[:3] = 1  # two classes are needed for a plan; class 0 has ten full blocks
    codes = assign(labels)[labels == 0]

    test_offsets = [tuple(np.flatnonzero(codes[i : i + 100] == TEST)) for i in range(0, 1000, 100)]
    assert len(set(test_offsets)) == 10  # each block draws its own rows


@pytest.mark.parametrize("count", [3, 4, 5, 7, 11])
def test_small_classes_get_a_row_in_every_split(count: int) -> None:
    labels = shuffled_labels([count, 50])

    train, val, test = per_class(labels, assign(labels, sizes=(0.1, 0.1)))[0]
    assert min(train, val, test) >= 1 and train + val + test == count


def test_sizes_are_rounded_when_blocks_cannot_be_exact() -> None:
    labels = shuffled_labels([3000, 3000])

    train, val, test = np.bincount(assign(labels, sizes=(0.3141, 0.25)), minlength=3)
    assert abs(test - 1885) <= 30 and abs(val - 1500) <= 30 and train == 6000 - val - test


@pytest.mark.parametrize(
    ("sizes", "block"),
    [
        ((0.2, 0.2), 100),
        ((0.15, 0.2), 100),
        ((0.125, 0.25), 104),
        ((1 / 3, 0.2), 105),
        ((0.3141, 0.2), 100),
    ],
)
def test_block_size_makes_quotas_whole(sizes: tuple[float, float], block: int) -> None:
    assert block_size(*sizes) == block


def test_more_rows_than_counted_is_an_error() -> None:
    assigner = SplitAssigner(SplitPlan(0, 0.2, 0.2, np.array([3, 3])))
    assigner.assign(np.array([0, 0, 0, 1, 1, 1]))

    with pytest.raises(ValueError, match="more rows"):
        assigner.assign(np.array([0]))


def test_codes_are_train_val_test() -> None:
    assert (TRAIN, VAL, TEST) == (0, 1, 2)


def test_ordered_split_keeps_data_order_and_drops_the_gaps():
    from stages.features.splits import GAP, OrderedAssigner

    plan = SplitPlan(0, 0.2, 0.2, np.array([60, 40]), ordered=True, gap_rows=3)
    assigner = OrderedAssigner(plan)
    labels = np.tile([0, 1, 0, 0, 1], 20)
    codes = np.concatenate([assigner.assign(labels[i : i + 7]) for i in range(0, 100, 7)])
    expected = [TRAIN] * 60 + [GAP] * 3 + [VAL] * 17 + [GAP] * 3 + [TEST] * 17
    assert codes.tolist() == expected  # in data order, however the rows are batched


def test_ordered_split_refuses_a_gap_that_empties_a_split():
    from stages.features.splits import OrderedAssigner

    with pytest.raises(ValueError, match="gap_rows 5"):
        OrderedAssigner(SplitPlan(0, 0.2, 0.2, np.array([10, 10]), ordered=True, gap_rows=5))


def test_the_stage_splits_a_series_in_order():
    import pandas as pd

    from stages.common.config import FeaturesParams
    from stages.features.stage import split_data

    df = pd.DataFrame({"t": range(200), "target": [i % 3 for i in range(200)]})
    splits = split_data(df, "target", FeaturesParams(split="ordered", gap_rows=6), seed=1)
    assert splits["train"]["t"].max() < splits["val"]["t"].min() - 6
    assert splits["val"]["t"].max() < splits["test"]["t"].min() - 6
    assert [len(splits[n]) for n in ("train", "val", "test")] == [120, 34, 34]
