"""Preprocessing as the paper (3.2): labels, iterative k-core filter, contiguous ids, split, derived hints.

label   1 iff rating > ``label_threshold`` (3 in the paper), unless the source gives a ready 0/1 label;
        implicit feedback (no rating, no label): every observed interaction is 1, and
        ``negatives_per_positive`` sampled negatives per interaction are 0 (drawn after the split)
filter  users and items with fewer than 4 interactions dropped, repeated until stable
split   8:1:1 at random by seed, by time (oldest 80% train), the source's own split, or per user in order:
        leave-last-out (newest row test, the one before it valid) or each user's oldest 80% / next 10% /
        newest 10%
hints   the paper's derived profile words per user (favourite category and brand, price level), computed from
        the *training split only* (and only its observed rows) so that nothing downstream sees valid/test
        labels through them
All steps are vectorised (numpy / pandas); nothing loops over interactions in Python.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from userip.data.schema import SPLITS, Dataset, profile_rows_of, user_ranks
from userip.data.sources.base import RAW_INTERACTION_REQUIRED, DataLoadError, RawData
from userip.utils.config import ConfigError, to_dict

log = logging.getLogger(__name__)

PRICE_LEVELS = ("low", "medium", "high")
UNKNOWN_PRICE_LEVEL = "unknown"  # also the rating level of a user without profile rows
# A user's share of positive profile rows, bucketed at the tertiles of all users' shares: the rating tendency,
# the natural "background" of a data set without prices (map it with soft_tokens.value_word_columns and
# offline_lm.slot_hint_columns).
RATING_LEVELS = ("critical", "moderate", "enthusiastic")
# Which derived hint column names the values of each default profile (the paper's hobby and background).
PROFILE_HINT_COLUMNS = {"hobby": "favourite_category", "background": "price_level"}


class SplitMode(enum.Enum):
    RANDOM = "random"
    TIME = "time"
    SOURCE = "source"
    LEAVE_LAST_OUT = "leave_last_out"  # per user, in order: newest row test, the one before valid, rest train
    USER_ORDERED = "user_ordered"  # per user, in order: the oldest split_ratios[0] train, then valid, test


# Per-user splits, cut in each user's own order (timestamp or position).
ORDERED_SPLITS = (SplitMode.LEAVE_LAST_OUT, SplitMode.USER_ORDERED)
# The negatives' random stream is (seed, this): independent of the split's, so changing the number of
# negatives never moves a random split.
NEGATIVE_STREAM = 0x6E6567


@dataclasses.dataclass
class PrepareConfig:
    label_threshold: float = 3.0  # label = rating > threshold
    min_user_interactions: int = 4
    min_item_interactions: int = 4
    split: SplitMode = SplitMode.RANDOM
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    deduplicate: bool = True  # keep only the latest interaction of each (user, item) pair
    keep_reviews: bool = True  # keep the review column when the source has one
    # Implicit sources only (and required there): sampled negatives (label 0) per observed interaction, drawn
    # by ``seed`` from the items the user never interacted with, in the interaction's split.
    negatives_per_positive: int = 0

    def __post_init__(self) -> None:
        try:
            self.split = SplitMode(self.split)
        except ValueError:
            raise ConfigError(
                f"prepare.split: {self.split!r} is not one of {[m.value for m in SplitMode]}"
            ) from None
        k = self.negatives_per_positive
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"prepare.negatives_per_positive: expected an integer >= 0, got {k!r}")
        self.split_ratios = tuple(float(r) for r in self.split_ratios)  # type: ignore[assignment]
        if (
            len(self.split_ratios) != 3
            or min(self.split_ratios) < 0
            or abs(sum(self.split_ratios) - 1) > 1e-6
        ):
            raise ValueError(
                f"split_ratios must be three non-negative numbers summing to 1, got {self.split_ratios}"
            )
        if self.min_user_interactions < 1 or self.min_item_interactions < 1:
            raise ValueError("min_user_interactions and min_item_interactions must be >= 1")


@dataclasses.dataclass
class FilterReport:
    """What the k-core filter did: counts before and after, and the number of rounds until stable."""

    interactions_before: int
    users_before: int
    items_before: int
    interactions_after: int
    users_after: int
    items_after: int
    rounds: int


def kcore_mask(
    user_codes: np.ndarray, item_codes: np.ndarray, min_user: int, min_item: int
) -> tuple[np.ndarray, int]:
    """Rows kept by the iterative k-core filter (users >= min_user, items >= min_item), and rounds run."""
    keep = np.ones(len(user_codes), dtype=bool)
    num_users, num_items = int(user_codes.max(initial=-1)) + 1, int(item_codes.max(initial=-1)) + 1
    rounds = 0
    while True:
        rounds += 1
        user_counts = np.bincount(user_codes[keep], minlength=num_users)
        item_counts = np.bincount(item_codes[keep], minlength=num_items)
        new_keep = keep & (user_counts[user_codes] >= min_user) & (item_counts[item_codes] >= min_item)
        if new_keep.sum() == keep.sum():
            return keep, rounds
        keep = new_keep


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


def build_dataset(raw: RawData, cfg: PrepareConfig, source: str, source_config: dict[str, Any]) -> Dataset:
    """Label, de-duplicate, filter, re-index and split ``raw``; attach items, users, truth and hints."""
    inter = raw.interactions
    for column in RAW_INTERACTION_REQUIRED:
        if column not in inter.columns:
            raise DataLoadError(f"{source}: loader returned interactions without {column!r}")
    if len(inter) == 0:
        raise DataLoadError(f"{source}: the source holds no interactions")
    n = len(inter)
    timestamps = (inter["timestamp"] if "timestamp" in inter.columns else pd.Series(np.zeros(n))).to_numpy(
        np.int64
    )
    ratings = (inter["rating"] if "rating" in inter.columns else pd.Series(np.full(n, np.nan))).to_numpy(
        np.float64
    )

    if raw.implicit:
        if cfg.negatives_per_positive < 1:
            raise ConfigError(
                f"{source}: implicit feedback (every row a positive, no rating): set "
                "prepare.negatives_per_positive >= 1, the sampled negatives that make the CTR labels"
            )
        if "label" in inter.columns or "rating" in inter.columns:
            raise DataLoadError(f"{source}: an implicit source returned a rating or label column")
        labels = np.ones(n, dtype=np.int8)
    elif cfg.negatives_per_positive:
        raise ConfigError(
            f"{source}: prepare.negatives_per_positive={cfg.negatives_per_positive} applies to implicit "
            "sources only; this source's labels come from its ratings or labels (set it to 0)"
        )
    elif "label" in inter.columns:
        labels = inter["label"].to_numpy(np.int8)
    else:
        if np.isnan(ratings).any():
            raise DataLoadError(
                f"{source}: {int(np.isnan(ratings).sum())} interaction(s) have no rating to label"
            )
        labels = (ratings > cfg.label_threshold).astype(np.int8)

    keep = np.ones(n, dtype=bool)
    if cfg.split is SplitMode.SOURCE:
        if "split" not in inter.columns:
            raise DataLoadError(
                f"{source}: split=source but the source has no split of its own (use --split random or time)"
            )
        in_split = inter["split"].isin(SPLITS).to_numpy()
        if not in_split.all():
            log.info("%d interaction(s) are in none of the source's splits; dropped", int((~in_split).sum()))
        keep &= in_split
    elif cfg.split is SplitMode.TIME and raw.positional:
        raise DataLoadError(
            f"{source}: split=time needs timestamps comparable across users, but this source orders each "
            "user's history by position (use leave_last_out or user_ordered)"
        )
    elif cfg.split is SplitMode.TIME and np.all(timestamps == timestamps[0]):
        raise DataLoadError(f"{source}: split=time needs timestamps, but the source has none (all equal)")
    elif cfg.split in ORDERED_SPLITS and np.all(timestamps == timestamps[0]):
        raise DataLoadError(
            f"{source}: split={cfg.split.value} cuts each user's history in order, but the source has no "
            "order (no timestamp or position column)"
        )

    user_codes, user_keys = pd.factorize(inter["raw_user_id"].astype(str), sort=True)
    item_codes, item_keys = pd.factorize(inter["raw_item_id"].astype(str), sort=True)

    if cfg.deduplicate:
        # Keep the latest interaction of every (user, item) pair; rows are visited in time order.
        order = np.argsort(timestamps, kind="stable")
        pair = user_codes.astype(np.int64) * len(item_keys) + item_codes
        later_copy = pd.Series(pair[order]).duplicated(keep="last").to_numpy()
        duplicate = np.zeros(n, dtype=bool)
        duplicate[order[later_copy]] = True
        if duplicate.any():
            log.info(
                "dropped %d repeated (user, item) interaction(s), keeping the latest", int(duplicate.sum())
            )
        keep &= ~duplicate

    rows = np.flatnonzero(keep)
    core, rounds = kcore_mask(
        user_codes[rows], item_codes[rows], cfg.min_user_interactions, cfg.min_item_interactions
    )
    report = FilterReport(
        interactions_before=len(rows),
        users_before=len(np.unique(user_codes[rows])),
        items_before=len(np.unique(item_codes[rows])),
        interactions_after=int(core.sum()),
        users_after=len(np.unique(user_codes[rows[core]])),
        items_after=len(np.unique(item_codes[rows[core]])),
        rounds=rounds,
    )
    if report.interactions_after == 0:
        raise DataLoadError(
            f"{source}: the k-core filter (min_user_interactions={cfg.min_user_interactions}, "
            f"min_item_interactions={cfg.min_item_interactions}) removed every interaction: "
            f"{report.interactions_before} interactions of {report.users_before} users and "
            f"{report.items_before} items before it; lower the minimums or give more data"
        )
    log.info(
        "k-core filter (%d rounds): %d -> %d interactions, %d -> %d users, %d -> %d items",
        rounds, report.interactions_before, report.interactions_after,
        report.users_before, report.users_after, report.items_before, report.items_after,
    )  # fmt: skip
    rows = rows[core]

    # Contiguous ids in the sorted order of the raw keys (codes are already sorted: remap, no sort needed).
    kept_users, user_ids = _compact(user_codes[rows], len(user_keys))
    kept_items, item_ids = _compact(item_codes[rows], len(item_keys))
    if cfg.split is SplitMode.SOURCE:
        split = inter["split"].to_numpy(dtype=object)[rows]
    elif cfg.split in ORDERED_SPLITS:
        split = np.empty(len(rows), dtype=object)  # cut below, once each user's rows are in order
    else:
        split = assign_split(len(rows), cfg.split, cfg.split_ratios, cfg.seed, timestamps[rows])
    # Users in order, each user's history in time order (what the prompt builder reads).
    order = _order_by(user_ids, timestamps[rows])
    rows, user_ids, item_ids, split = rows[order], user_ids[order], item_ids[order], split[order]
    if cfg.split in ORDERED_SPLITS:
        split = assign_user_split(user_ids, cfg.split, cfg.split_ratios)

    interactions = pd.DataFrame(
        {
            "user_id": user_ids,
            "item_id": item_ids,
            "rating": ratings[rows].astype(np.float32),
            "label": labels[rows],
            "timestamp": timestamps[rows],
            "split": split,
        }
    )
    if cfg.keep_reviews and "review" in inter.columns:
        # One gather as a str Series (Arrow-backed), not via Python objects: reviews are the bulk of the data.
        reviews = inter["review"].iloc[rows].reset_index(drop=True)
        interactions["review"] = reviews.fillna("").astype(str) if reviews.hasnans else reviews.astype(str)
    negatives_report: dict[str, Any] = {}
    if raw.implicit:
        # Every item a kept user has a row with, kept or not (e.g. outside a source split), is excluded.
        user_new = np.full(len(user_keys), -1, dtype=np.int64)
        user_new[kept_users] = np.arange(len(kept_users))
        item_new = np.full(len(item_keys), -1, dtype=np.int64)
        item_new[kept_items] = np.arange(len(kept_items))
        seen_users, seen_items = user_new[user_codes], item_new[item_codes]
        both = (seen_users >= 0) & (seen_items >= 0)
        started = time.perf_counter()
        negatives = sample_negatives(
            user_ids, seen_users[both], seen_items[both], len(kept_items), cfg.negatives_per_positive,
            np.random.default_rng([cfg.seed, NEGATIVE_STREAM]),
        )  # fmt: skip
        interactions = with_negatives(interactions, negatives)
        log.info(
            "sampled %d negatives (%d per interaction) in %.2f s",
            negatives.size, cfg.negatives_per_positive, time.perf_counter() - started,
        )  # fmt: skip
        negatives_report = {"implicit": {"positional": raw.positional, "num_negatives": int(negatives.size)}}

    raw_user_ids = np.asarray(user_keys)[kept_users].astype(str)
    raw_item_ids = np.asarray(item_keys)[kept_items].astype(str)
    items = _items_table(raw, raw_item_ids)
    users = _users_table(raw, raw_user_ids)
    truth = _truth_table(raw, raw_user_ids, source)
    hints = derive_hints(interactions, items)

    num_missing_titles = int((items["title"] == "").sum())
    num_missing_prices = int(items["price"].isna().sum())
    raw.report.num_missing_titles, raw.report.num_missing_prices = num_missing_titles, num_missing_prices
    if num_missing_titles:
        log.info("%d of %d item(s) have no title", num_missing_titles, len(items))
    if num_missing_prices:
        log.info("%d of %d item(s) have no price", num_missing_prices, len(items))
    config = {
        "source_config": source_config,
        "prepare": to_dict(cfg),
        "filter": dataclasses.asdict(report),
        "load_report": raw.report.to_dict(),
        **negatives_report,
        **raw.extra_config,
    }
    return Dataset(interactions, items, users, truth=truth, hints=hints, source=source, config=config)


def _compact(codes: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(the codes present, in order; each row's rank among them as int64): contiguous ids in O(n)."""
    present = np.zeros(num_codes, dtype=bool)
    present[codes] = True
    return np.flatnonzero(present), (np.cumsum(present) - 1)[codes].astype(np.int64)


def _order_by(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """Stable order by (primary, secondary) ints: one argsort of a combined int64 key, which is ~10x faster
    than np.lexsort on a million rows; falls back to lexsort when the key could overflow."""
    secondary = secondary - secondary.min(initial=0)
    span = int(secondary.max(initial=0)) + 1
    if int(primary.max(initial=0)) < (1 << 62) // span:
        return np.argsort(primary.astype(np.int64) * span + secondary, kind="stable")
    return np.lexsort((secondary, primary))


def _items_table(raw: RawData, raw_item_ids: np.ndarray) -> pd.DataFrame:
    items = pd.DataFrame(
        {"item_id": np.arange(len(raw_item_ids), dtype=np.int64), "raw_item_id": raw_item_ids}
    )
    if raw.items is not None:
        meta = raw.items.drop_duplicates("raw_item_id").copy()
        meta["raw_item_id"] = meta["raw_item_id"].astype(str)
        items = items.merge(meta, on="raw_item_id", how="left", validate="one_to_one")
    for column in ("title", "brand"):
        values = items[column] if column in items.columns else pd.Series(index=items.index, dtype=object)
        items[column] = values.fillna("").astype(str)
    categories = items["categories"] if "categories" in items.columns else pd.Series([None] * len(items))
    items["categories"] = [list(c) if c is not None and not isinstance(c, float) else [] for c in categories]
    price = items["price"] if "price" in items.columns else pd.Series(np.nan, index=items.index)
    items["price"] = pd.to_numeric(price, errors="coerce").astype("float64")
    return items[["item_id", "raw_item_id", "title", "categories", "brand", "price"]]


def _users_table(raw: RawData, raw_user_ids: np.ndarray) -> pd.DataFrame:
    users = pd.DataFrame(
        {"user_id": np.arange(len(raw_user_ids), dtype=np.int64), "raw_user_id": raw_user_ids}
    )
    if raw.users is None:
        return users
    features = raw.users.drop_duplicates("raw_user_id").copy()
    for column in features.columns:
        # Observable features are categorical strings ("" where unknown).
        values = features[column]
        features[column] = values.astype(str).where(values.notna(), "")
    users = users.merge(features, on="raw_user_id", how="left", validate="one_to_one")
    return users.fillna("")


def _truth_table(raw: RawData, raw_user_ids: np.ndarray, source: str) -> pd.DataFrame | None:
    if raw.truth is None:
        return None
    truth = pd.DataFrame({"raw_user_id": raw_user_ids}).merge(
        raw.truth.astype({"raw_user_id": str}), on="raw_user_id", how="left", validate="one_to_one"
    )
    profiles = [c for c in truth.columns if c != "raw_user_id"]
    if truth[profiles].isna().any().any():
        raise DataLoadError(f"{source}: some users have no true profile in the truth table")
    out = pd.DataFrame({"user_id": np.arange(len(raw_user_ids), dtype=np.int64)})
    for column in profiles:
        out[column] = truth[column].to_numpy(np.int64)
    return out


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
