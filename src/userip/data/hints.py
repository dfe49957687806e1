"""The paper's derived profile words per user (3.2): favourite category and brand, price and rating level.

Computed from the profile rows only (the *training split*, and only its observed rows), so that nothing
downstream sees valid/test labels through them. Vectorised: nothing loops over interactions in Python.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from userip.data.schema import profile_rows_of

PRICE_LEVELS = ("low", "medium", "high")
UNKNOWN_PRICE_LEVEL = "unknown"  # also the rating level of a user without profile rows
# A user's share of positive profile rows, bucketed at the tertiles of all users' shares: the rating tendency,
# the natural "background" of a data set without prices (map it with soft_tokens.value_word_columns and
# offline_lm.slot_hint_columns).
RATING_LEVELS = ("critical", "moderate", "enthusiastic")
# Which derived hint column names the values of each default profile (the paper's hobby and background).
PROFILE_HINT_COLUMNS = {"hobby": "favourite_category", "background": "price_level"}


def _favourite(
    user_ids: np.ndarray, value_codes: np.ndarray, labels: np.ndarray, names: np.ndarray, num_users: int
) -> np.ndarray:
    """Per user, the most frequent value among positive rows (all rows when the user has no positive one).

    Ties go to the value whose name sorts first (codes are in sorted-name order). Users without rows get "".
    """
    out = np.full(num_users, "", dtype=object)
    if len(user_ids) == 0:
        return out
    pair = user_ids.astype(np.int64) * len(names) + value_codes
    pairs, inverse = np.unique(pair, return_inverse=True)
    positives = np.bincount(inverse, weights=labels, minlength=len(pairs))
    totals = np.bincount(inverse, minlength=len(pairs))
    pair_users, pair_values = pairs // len(names), pairs % len(names)
    # Best first within each user: most positives, then most rows, then the smallest code.
    order = np.lexsort((pair_values, -totals, -positives, pair_users))
    first = order[np.r_[True, pair_users[order][1:] != pair_users[order][:-1]]]
    out[pair_users[first]] = names[pair_values[first]]
    return out


def derive_hints(interactions: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """The paper's derived profile words per user, from the profile rows only (the training split, or the
    ``history`` split of an evaluation protocol: ``userip.data.schema.profile_rows_of``).

    favourite_category  most frequent category among the user's train interactions (positives preferred)
    favourite_brand     the same for brands ("" when no train item has a brand)
    price_level         the user's mean train price, bucketed low/medium/high at the tertiles of all users'
                        means; "unknown" without priced train items
    rating_level        the user's share of positive rows, bucketed critical/moderate/enthusiastic at the
                        tertiles of all users' shares; "unknown" without rows, and on implicit data (whose
                        profile rows are all positives: the share says nothing)
    """
    num_users = int(interactions["user_id"].max()) + 1
    train = profile_rows_of(interactions)
    implicit = "sampled" in interactions.columns
    user_ids = train["user_id"].to_numpy()
    item_ids = train["item_id"].to_numpy()
    labels = train["label"].to_numpy()

    # Categories: one row per (train interaction, category of its item), via a CSR layout of item categories.
    lengths = items["categories"].map(len).to_numpy()
    category_codes, category_names = pd.factorize(
        pd.Series([c for cats in items["categories"] for c in cats], dtype=object), sort=True
    )
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    repeats = lengths[item_ids]
    row_of = np.repeat(np.arange(len(item_ids)), repeats)
    within = np.arange(len(row_of)) - np.repeat(np.cumsum(repeats) - repeats, repeats)
    favourite_category = _favourite(
        user_ids[row_of], category_codes[starts[item_ids][row_of] + within], labels[row_of],
        np.asarray(category_names, dtype=object), num_users,
    )  # fmt: skip

    brand_codes, brand_names = pd.factorize(items["brand"], sort=True)
    has_brand = (items["brand"] != "").to_numpy()[item_ids]
    favourite_brand = _favourite(
        user_ids[has_brand], brand_codes[item_ids[has_brand]], labels[has_brand],
        np.asarray(brand_names, dtype=object), num_users,
    )  # fmt: skip

    prices = items["price"].to_numpy()[item_ids]
    priced = ~np.isnan(prices)
    sums = np.bincount(user_ids[priced], weights=prices[priced], minlength=num_users)
    counts = np.bincount(user_ids[priced], minlength=num_users)
    rows_per_user = np.bincount(user_ids, minlength=num_users)
    if implicit:  # every profile row is a positive: the share says nothing, so every level is "unknown"
        rows_per_user[:] = 0
    return pd.DataFrame(
        {
            "user_id": np.arange(num_users, dtype=np.int64),
            "favourite_category": favourite_category.astype(str),
            "favourite_brand": favourite_brand.astype(str),
            "price_level": _tertile_levels(sums, counts, PRICE_LEVELS),
            "rating_level": _tertile_levels(
                np.bincount(user_ids, weights=labels, minlength=num_users),
                rows_per_user,
                RATING_LEVELS,
            ),
        }
    )


def _tertile_levels(sums: np.ndarray, counts: np.ndarray, names: tuple[str, str, str]) -> np.ndarray:
    """Per user, ``names[i]`` for the tertile of ``sums / counts`` among users with counts (the upper tertile
    boundary belongs to the higher level); ``UNKNOWN_PRICE_LEVEL`` without counts."""
    levels = np.full(len(counts), UNKNOWN_PRICE_LEVEL, dtype=object)
    if counts.any():
        means = sums[counts > 0] / counts[counts > 0]
        tertiles = np.quantile(means, [1 / 3, 2 / 3])
        levels[counts > 0] = np.array(names, dtype=object)[np.searchsorted(tertiles, means, side="right")]
    return levels.astype(str)
