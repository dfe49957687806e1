"""Implicit feedback: sampled negatives (label 0) for every observed interaction, drawn after the split."""

from __future__ import annotations

import numpy as np
import pandas as pd

from userip.data.schema import user_ranks
from userip.data.sources.base import DataLoadError

# The negatives' random stream is (seed, this): independent of the split's, so changing the number of
# negatives never moves a random split.
NEGATIVE_STREAM = 0x6E6567


def sample_negatives(
    row_users: np.ndarray,
    seen_users: np.ndarray,
    seen_items: np.ndarray,
    num_items: int,
    per_row: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(len(row_users), per_row) item ids: for each row, ``per_row`` distinct items drawn uniformly from the
    items its user never interacted with (no (user, item) pair of ``seen_users``/``seen_items``).

    Vectorised rejection sampling: draw everything, redraw the cells that hit a seen pair or repeat an earlier
    cell of their row, until none do. With users who have seen nearly every item rejection could take long, so
    after a few rounds the remaining rows are drawn exactly from their user's unseen items (a short loop).
    The result depends only on the inputs and the generator's state.
    """
    n = len(row_users)
    if num_items <= 0 or per_row <= 0:
        return np.zeros((n, max(per_row, 0)), dtype=np.int64)
    seen = np.unique(seen_users.astype(np.int64) * num_items + seen_items)
    num_users = int(max(row_users.max(initial=-1), seen_users.max(initial=-1))) + 1
    unseen = num_items - np.bincount(seen // num_items, minlength=num_users)
    short = np.unique(row_users)
    short = short[unseen[short] < per_row]
    if len(short):
        user = int(short[0])
        raise DataLoadError(
            f"user {user} (dataset id) has interacted with {num_items - int(unseen[user])} of {num_items} "
            f"items, leaving {int(unseen[user])} to sample {per_row} distinct negatives from: lower "
            "prepare.negatives_per_positive or filter such users out"
        )
    row_users = row_users.astype(np.int64)
    out = rng.integers(0, num_items, size=(n, per_row), dtype=np.int64)
    todo = np.arange(n)  # rows that may still hold a bad cell
    for _ in range(_REJECTION_ROUNDS):
        bad = _bad_negatives(out[todo], row_users[todo], seen, num_items)
        todo = todo[bad.any(axis=1)]
        if not len(todo):
            return out
        bad = bad[bad.any(axis=1)]
        redraw = out[todo]
        redraw[bad] = rng.integers(0, num_items, size=int(bad.sum()), dtype=np.int64)
        out[todo] = redraw
    bad = _bad_negatives(out[todo], row_users[todo], seen, num_items)
    for row in todo[bad.any(axis=1)]:
        user = row_users[row]
        lo, hi = np.searchsorted(seen, [user * num_items, (user + 1) * num_items])
        candidates = np.setdiff1d(np.arange(num_items), seen[lo:hi] - user * num_items)
        out[row] = rng.choice(candidates, size=per_row, replace=False)
    return out


_REJECTION_ROUNDS = 30


def _bad_negatives(draws: np.ndarray, users: np.ndarray, seen: np.ndarray, num_items: int) -> np.ndarray:
    """Cells of ``draws`` (rows x k) that are a seen pair of the row's user or repeat an earlier cell."""
    keys = users[:, None] * num_items + draws
    at = np.minimum(np.searchsorted(seen, keys), max(len(seen) - 1, 0))
    bad = seen[at] == keys if len(seen) else np.zeros(draws.shape, dtype=bool)
    if draws.shape[1] > 1:
        # Sort each row (stable), mark a value equal to its left neighbour, and scatter the marks back: the
        # later copies of a repeated item are redrawn, the first stays.
        order = np.argsort(draws, axis=1, kind="stable")
        ordered = np.take_along_axis(draws, order, axis=1)
        repeat_sorted = np.zeros(draws.shape, dtype=bool)
        repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        repeat = np.empty_like(repeat_sorted)
        np.put_along_axis(repeat, order, repeat_sorted, axis=1)
        bad |= repeat
    return bad


def with_negatives(interactions: pd.DataFrame, negatives: np.ndarray) -> pd.DataFrame:
    """Observed rows (sorted by user, then order) followed each by its sampled negatives, with the columns
    ``event`` (the observed row's rank in its user's history, shared with its negatives) and ``sampled``.

    A negative copies its row's user, timestamp and split, so it lands in the same split and place in
    time; its label is 0, its rating NaN and its review empty.
    """
    n, k = negatives.shape
    block = k + 1
    source_row = np.repeat(np.arange(n), block)
    out = interactions.iloc[source_row].reset_index(drop=True)
    is_negative = np.tile(np.r_[False, np.ones(k, dtype=bool)], n)
    items = np.concatenate([interactions["item_id"].to_numpy()[:, None], negatives], axis=1).ravel()
    out["item_id"] = items.astype(np.int64)
    out["label"] = np.where(is_negative, 0, out["label"].to_numpy()).astype(np.int8)
    out["rating"] = np.where(is_negative, np.nan, out["rating"].to_numpy()).astype(np.float32)
    if "review" in out.columns:
        out["review"] = out["review"].where(~is_negative, "")
    out["event"] = np.repeat(user_ranks(interactions["user_id"].to_numpy()), block)
    out["sampled"] = is_negative.astype(np.int8)
    return out
