"""The train/val/test assignment, streamed: no row is held to decide it.

``stratified`` (the default, :class:`SplitAssigner`) is seeded and stratified, below.
``ordered`` (:class:`OrderedAssigner`) keeps data order: the first rows train, the next
validate, the last test, with ``gap_rows`` dropped before val and before test. It is the
honest split for series and for rows that are windows of one (``train.model: rnn``): a random
split puts overlapping windows, the same days, on both sides.

Stratified:

Each class's rows, in data order, are cut into blocks of ``block`` rows. Within a block a
seeded permutation (the ranks of a splitmix64 hash of seed, class, block and offset) picks
exactly ``block * test_size`` test rows and ``block * val_size`` val rows, so every full
block is exactly stratified. The permutation depends only on the seed, the class counts and
each row's position within its class, never on how the rows were batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN, VAL, TEST = 0, 1, 2  # split codes, one per row
GAP = 3  # ordered split: a row between two splits, written to none
MIN_BLOCK = 100  # large blocks: the split inside a block is a true random sample
MAX_BLOCK = 1000  # sizes whose quotas are not whole within this: rounded per block

_MASK64 = (1 << 64) - 1
_GOLDEN, _MIX1, _MIX2 = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (wrap-around arithmetic)."""
    x = np.asarray(x, dtype=np.uint64) + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def hash_keys(seed: int, *keys: np.ndarray) -> np.ndarray:
    """A 64-bit hash of ``(seed, *keys)``, broadcast over the key arrays."""
    h = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    for key in keys:
        h = splitmix64(h ^ np.asarray(key).astype(np.uint64))
    return h


def block_size(test_size: float, val_size: float) -> int:
    """The block: a multiple of the smallest size with whole test and val quotas, >= 100."""
    for base in range(1, MAX_BLOCK + 1):
        if all(abs(base * f - round(base * f)) < 1e-9 for f in (test_size, val_size)):
            return base * -(-MIN_BLOCK // base)
    return MIN_BLOCK


def _quotas(
    size: np.ndarray, test_size: float, val_size: float, first: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(test rows, val rows) per block of ``size`` rows; a class's first block gives each split
    at least one row (the caller checked every class has at least three)."""
    n_test = np.floor(size * test_size + 0.5).astype(np.int64)
    n_val = np.minimum(np.floor(size * val_size + 0.5).astype(np.int64), size - n_test)
    n_test = np.where(first, np.maximum(n_test, 1), n_test)
    n_val = np.where(first, np.maximum(n_val, 1), n_val)
    excess = np.where(first, np.maximum(n_test + n_val + 1 - size, 0), 0)  # leave train one
    cut_val = np.minimum(excess, n_val - 1)
    return n_test - (excess - cut_val), n_val - cut_val


@dataclass(frozen=True)
class SplitPlan:
    """What the assignment needs: the seed, the fractions and the rows per class."""

    seed: int
    test_size: float
    val_size: float
    class_counts: np.ndarray  # rows per class id (int64)
    ordered: bool = False  # keep data order (OrderedAssigner) instead of stratifying
    gap_rows: int = 0  # ordered: rows dropped before val and before test

    @property
    def block(self) -> int:
        return block_size(self.test_size, self.val_size)


class SplitAssigner:
    """Assigns the rows of consecutive batches; remembers how many rows of each class it saw."""

    def __init__(self, plan: SplitPlan) -> None:
        self.plan = plan
        self.block = plan.block
        self.counts = plan.class_counts.astype(np.int64)
        self.seen = np.zeros(len(self.counts), dtype=np.int64)
        self.index_dtype = np.min_scalar_type(max(len(self.counts) - 1, 0))

    def assign(self, class_ids: np.ndarray) -> np.ndarray:
        """Split codes (TRAIN/VAL/TEST, uint8) for the next rows, given their class ids."""
        class_ids = np.asarray(class_ids).astype(self.index_dtype, copy=False)
        order = np.argsort(class_ids, kind="stable")  # rows grouped by class, in data order
        batch_counts = np.bincount(class_ids, minlength=len(self.counts))
        start = self.seen.copy()
        self.seen += batch_counts
        if (self.seen > self.counts).any():
            raise ValueError("more rows of a class than the plan counted")
        block = self.block
        # the (class, block) pairs this batch touches: one run of blocks per class
        first, last = start // block, (self.seen - 1) // block
        n_pairs = np.where(batch_counts > 0, last - first + 1, 0)
        pair_base = np.cumsum(n_pairs) - n_pairs
        pair_class = np.repeat(np.arange(len(self.counts)), n_pairs)
        pair_block = np.arange(n_pairs.sum()) - pair_base[pair_class] + first[pair_class]
        slots = self._block_codes(pair_class, pair_block).ravel()
        # a class's rows of this batch are consecutive slots of its consecutive blocks
        grouped = np.concatenate(
            [np.empty(0, dtype=np.uint8)]
            + [
                slots[(pair_base[c] - first[c]) * block + start[c] :][: batch_counts[c]]
                for c in np.flatnonzero(batch_counts)
            ]
        )
        codes = np.empty(len(class_ids), dtype=np.uint8)
        codes[order] = grouped
        return codes

    def _block_codes(self, pair_class: np.ndarray, pair_block: np.ndarray) -> np.ndarray:
        # (pairs, block) split codes: slot i of a block is the row at offset i in it
        block, counts, plan = self.block, self.counts, self.plan
        last_block = (counts[pair_class] - 1) // block
        size = np.where(pair_block == last_block, counts[pair_class] - last_block * block, block)
        n_test, n_val = _quotas(size, plan.test_size, plan.val_size, pair_block == 0)
        # the seeded permutation: offsets ranked by hash; offsets past a short last block
        # sort after every real one
        offsets = np.arange(block)[None, :]
        keys = (
            hash_keys(plan.seed, pair_class[:, None], pair_block[:, None], offsets) >> np.uint64(2)
        ).view(np.int64)
        keys[offsets >= size[:, None]] = np.iinfo(np.int64).max
        ordered = np.sort(keys, axis=1)
        rows = np.arange(len(size))
        # the key of each block's last test row and last val row (-1: no such row)
        test_cut = np.where(n_test > 0, ordered[rows, np.maximum(n_test - 1, 0)], -1)
        val_cut = np.where(n_test + n_val > 0, ordered[rows, np.maximum(n_test + n_val - 1, 0)], -1)
        codes = np.full(keys.shape, TRAIN, dtype=np.uint8)
        codes[keys <= val_cut[:, None]] = VAL
        codes[keys <= test_cut[:, None]] = TEST
        return codes


class OrderedAssigner:
    """Data order kept: train, gap, val, gap, test, by each row's position in the data."""

    def __init__(self, plan: SplitPlan) -> None:
        n_rows = int(plan.class_counts.sum())
        n_test = int(np.floor(n_rows * plan.test_size + 0.5))
        n_val = int(np.floor(n_rows * plan.val_size + 0.5))
        n_train = n_rows - n_test - n_val
        gap = plan.gap_rows
        if min(n_train, n_val - gap, n_test - gap) < 1:
            raise ValueError(
                f"{n_rows} rows leave no rows in a split after features.gap_rows {gap} "
                "(fewer gap rows, or more data)"
            )
        # the first position of: the gap before val, val, the gap before test, test
        self.cuts = np.cumsum([n_train, gap, n_val - gap, gap])
        self.seen = 0

    def assign(self, class_ids: np.ndarray) -> np.ndarray:
        """Split codes (TRAIN/VAL/TEST, GAP between them) for the next rows."""
        position = self.seen + np.arange(len(class_ids))
        self.seen += len(class_ids)
        codes = np.searchsorted(self.cuts, position, side="right")
        return np.array([TRAIN, GAP, VAL, GAP, TEST], dtype=np.uint8)[codes]


def assigner_for(plan: SplitPlan) -> SplitAssigner | OrderedAssigner:
    """The assigner ``plan`` asks for (``features.split``)."""
    return OrderedAssigner(plan) if plan.ordered else SplitAssigner(plan)
