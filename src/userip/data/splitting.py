"""Splitting the interactions into train / valid / test (paper 3.2: 8:1:1 at random by default).

random / time   one cut over all rows: a random permutation by seed, or time order (oldest 80% train)
source          the source's own split (``userip.data.preprocess``)
per user        cut in each user's own order: leave-last-out (newest row test, the one before it valid) or
                each user's oldest 80% / next 10% / newest 10%
"""

from __future__ import annotations

import enum

import numpy as np

from userip.data.schema import user_ranks


class SplitMode(enum.Enum):
    RANDOM = "random"
    TIME = "time"
    SOURCE = "source"
    LEAVE_LAST_OUT = "leave_last_out"  # per user, in order: newest row test, the one before valid, rest train
    USER_ORDERED = "user_ordered"  # per user, in order: the oldest split_ratios[0] train, then valid, test


# Per-user splits, cut in each user's own order (timestamp or position).
ORDERED_SPLITS = (SplitMode.LEAVE_LAST_OUT, SplitMode.USER_ORDERED)


def assign_split(
    num_rows: int, mode: SplitMode, ratios: tuple[float, float, float], seed: int, timestamps: np.ndarray
) -> np.ndarray:
    """Split names per row: a random permutation or time order (ties broken at random), cut at the ratios."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_rows)
    if mode is SplitMode.TIME:
        # Time order; a stable sort of randomly permuted rows breaks ties at random.
        order = order[np.argsort(timestamps[order], kind="stable")]
    num_train = int(round(ratios[0] * num_rows))
    num_valid = int(round(ratios[1] * num_rows))
    split = np.empty(num_rows, dtype=object)
    split[order[:num_train]] = "train"
    split[order[num_train : num_train + num_valid]] = "valid"
    split[order[num_train + num_valid :]] = "test"
    return split


def assign_user_split(
    user_ids: np.ndarray, mode: SplitMode, ratios: tuple[float, float, float]
) -> np.ndarray:
    """Split names per row of rows sorted by (user, order): each user's newest rows are test, the ones before
    them valid, the rest train.

    leave_last_out: one test and one valid row per user; user_ordered: round(ratio * n) of a user's n rows
    (at least one where the ratio is above 0). A user always keeps a training row: with 2 rows there is no
    valid row, with 1 only a training row.
    """
    counts = np.bincount(user_ids) if len(user_ids) else np.zeros(0, dtype=np.int64)
    if mode is SplitMode.LEAVE_LAST_OUT:
        num_test, num_valid = np.ones_like(counts), np.ones_like(counts)
    else:

        def share(ratio: float) -> np.ndarray:
            # Half up, not numpy's half to even: 15 rows at 10% give 2 whatever the parity.
            amount = np.floor(ratio * counts + 0.5).astype(np.int64)
            return np.maximum(amount, 1) if ratio > 0 else amount

        num_test, num_valid = share(ratios[2]), share(ratios[1])
    num_test = np.minimum(num_test, np.maximum(counts - 1, 0))
    num_valid = np.minimum(num_valid, np.maximum(counts - 1 - num_test, 0))
    from_newest = counts[user_ids] - 1 - user_ranks(user_ids)
    split = np.full(len(user_ids), "train", dtype=object)
    split[from_newest < (num_test + num_valid)[user_ids]] = "valid"
    split[from_newest < num_test[user_ids]] = "test"
    return split
