"""Preprocessing: k-core against a set-based reference, labels, splits, de-duplication, train-only hints."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest

from userip.data.preprocess import (
    PrepareConfig,
    SplitMode,
    assign_split,
    build_dataset,
    derive_hints,
    kcore_mask,
)
from userip.data.sources.base import DataLoadError, RawData
from userip.utils.config import ConfigError, from_dict


def raw_from_rows(rows, **extra) -> RawData:
    frame = pd.DataFrame(rows, columns=["raw_user_id", "raw_item_id", "rating", "timestamp"])
    return RawData(interactions=frame, **extra)


@pytest.mark.parametrize("seed", range(4))
def test_kcore_matches_reference_on_random_data(seed, fx):
    rng = np.random.default_rng(seed)
    n = 600
    users = rng.zipf(1.6, n) % 80
    items = rng.zipf(1.4, n) % 60
    pairs = list(dict.fromkeys(zip(users.tolist(), items.tolist())))
    u = np.array([p[0] for p in pairs])
    i = np.array([p[1] for p in pairs])
    keep, rounds = kcore_mask(u, i, 3, 4)
    expected = fx.reference_kcore([(a, b, 1.0, 0) for a, b in pairs], 3, 4)
    assert [pairs[k] for k in np.flatnonzero(keep)] == expected
    assert rounds >= 2  # the zipf tails need repeated passes


def test_build_dataset_counts_labels_and_ids(rows, fx):
    ds = build_dataset(raw_from_rows(rows), PrepareConfig(label_threshold=2.0), "test", {})
    ds.validate()
    expected = fx.reference_kcore(rows)
    assert ds.num_interactions == len(expected)
    # Contiguous ids follow the sorted raw keys.
    assert list(ds.users["raw_user_id"]) == sorted({u for u, _ in expected})
    assert list(ds.items["raw_item_id"]) == sorted({i for _, i in expected})
    rating = {(u, i): r for u, i, r, _ in rows}
    inter = ds.interactions
    raw_pairs = zip(
        ds.users["raw_user_id"].to_numpy()[inter.user_id], ds.items["raw_item_id"].to_numpy()[inter.item_id]
    )
    np.testing.assert_array_equal(inter["label"], [int(rating[p] > 2.0) for p in raw_pairs])
    # Each user's history is in time order.
    assert (inter.groupby("user_id")["timestamp"].diff().dropna() >= 0).all()
    assert ds.config["filter"]["rounds"] >= 2 and ds.config["filter"]["interactions_after"] == len(expected)


def test_random_split_ratios_and_determinism(rows):
    a = build_dataset(raw_from_rows(rows), PrepareConfig(seed=5), "t", {})
    b = build_dataset(raw_from_rows(rows), PrepareConfig(seed=5), "t", {})
    c = build_dataset(raw_from_rows(rows), PrepareConfig(seed=6), "t", {})
    assert a.content_hash == b.content_hash and a.content_hash != c.content_hash
    split = assign_split(1000, SplitMode.RANDOM, (0.8, 0.1, 0.1), 0, np.zeros(1000, dtype=np.int64))
    assert Counter(split) == {"train": 800, "valid": 100, "test": 100}


def test_time_split_orders_by_time():
    timestamps = np.random.default_rng(0).integers(0, 50, 200)
    split = assign_split(200, SplitMode.TIME, (0.7, 0.2, 0.1), 0, timestamps)
    assert Counter(split) == {"train": 140, "valid": 40, "test": 20}
    assert timestamps[split == "train"].max() <= timestamps[split == "valid"].min()
    assert timestamps[split == "valid"].max() <= timestamps[split == "test"].min()


def test_time_split_without_timestamps_fails(rows):
    no_time = [(u, i, r, 0) for u, i, r, _ in rows]
    with pytest.raises(DataLoadError, match="split=time needs timestamps"):
        build_dataset(raw_from_rows(no_time), PrepareConfig(split="time"), "nete", {})


def test_deduplicate_keeps_latest(rows):
    duplicated = rows + [(rows[0][0], rows[0][1], 5.0 if rows[0][2] <= 3 else 1.0, rows[-1][3] + 100)]
    ds = build_dataset(raw_from_rows(duplicated), PrepareConfig(), "t", {})
    first = ds.interactions[
        (ds.users["raw_user_id"].to_numpy()[ds.interactions.user_id] == rows[0][0])
        & (ds.items["raw_item_id"].to_numpy()[ds.interactions.item_id] == rows[0][1])
    ]
    assert len(first) == 1 and first["timestamp"].iloc[0] == rows[-1][3] + 100
    assert first["label"].iloc[0] == int(rows[0][2] <= 3)  # the later rating flipped the label


def test_empty_after_filter_names_the_filter():
    rows = [(f"u{k}", f"i{k}", 4.0, k) for k in range(10)]  # every user and item once
    expected = (
        r"k-core filter \(min_user_interactions=4, min_item_interactions=4\) "
        r"removed every interaction: 10 interactions of 10 users and 10 items"
    )
    with pytest.raises(DataLoadError, match=expected):
        build_dataset(raw_from_rows(rows), PrepareConfig(), "toy", {})
    with pytest.raises(DataLoadError, match="holds no interactions"):
        build_dataset(raw_from_rows([]), PrepareConfig(), "toy", {})


def test_prepare_config_validation():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['min_users'\]"):
        from_dict(PrepareConfig, {"min_users": 3})
    with pytest.raises(ConfigError, match="split_ratios must be three"):
        from_dict(PrepareConfig, {"split_ratios": [0.5, 0.5, 0.5]})
    with pytest.raises(
        ConfigError,
        match=r"'weekly' is not one of \['random', 'time', 'source', 'leave_last_out', 'user_ordered'\]",
    ):
        from_dict(PrepareConfig, {"split": "weekly"})


def test_hints_from_train_only_match_independent_computation():
    items = pd.DataFrame(
        {
            "item_id": np.arange(4),
            "categories": [["A", "B"], ["B"], ["C"], []],
            "brand": ["x", "y", "y", ""],
            "price": [10.0, 20.0, np.nan, 100.0],
        }
    )
    rows = [  # user, item, label, split
        (0, 0, 1, "train"), (0, 1, 1, "train"), (0, 2, 0, "train"), (0, 2, 0, "train"), (0, 3, 1, "test"),
        (1, 2, 0, "train"), (1, 2, 0, "train"), (1, 0, 0, "train"), (1, 1, 1, "valid"),
        (2, 3, 1, "train"),
        (3, 1, 1, "test"),
    ]  # fmt: skip
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "split"])
    hints = derive_hints(inter, items).set_index("user_id")
    # user 0: positives in train hit A once and B twice -> B; brands x and y tie on positives (1 each), y has
    # more
    #   train rows (3 vs 1) -> y
    # user 1: no train positives -> all train rows: C twice -> C; brand y twice
    # user 2: item 3 has no category and no brand; user 3 has no train rows at all
    assert list(hints["favourite_category"]) == ["B", "C", "", ""]
    assert list(hints["favourite_brand"]) == ["y", "y", "", ""]
    # mean train prices: user0 (10+20)/2=15, user1 10 (item 2 has no price), user2 100 -> tertiles of [15,
    # 10, 100]
    means = np.array([15.0, 10.0, 100.0])
    tertiles = np.quantile(means, [1 / 3, 2 / 3])
    expected = [["low", "medium", "high"][int((m >= tertiles).sum())] for m in means] + ["unknown"]
    assert list(hints["price_level"]) == expected == ["medium", "low", "high", "unknown"]
    # positive shares of train rows: user0 2/4, user1 0/3, user2 1/1 -> tertiles of [0.5, 0, 1]
    assert list(hints["rating_level"]) == ["moderate", "critical", "enthusiastic", "unknown"]
    # Changing valid/test labels or items never changes the hints.
    changed = inter.copy()
    changed.loc[changed.split != "train", "item_id"] = 2
    changed.loc[changed.split != "train", "label"] = 1
    pd.testing.assert_frame_equal(derive_hints(changed, items).set_index("user_id"), hints)
