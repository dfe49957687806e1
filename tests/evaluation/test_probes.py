import logging

import numpy as np
import pandas as pd
import pytest

from userip.data.schema import Dataset
from userip.evaluation.probes import (
    bag_of_categories,
    bag_of_items,
    one_hot_codes,
    probe_auc,
    probe_markdown,
    probe_report,
    random_features,
    user_truths,
)

NAN = np.nan


def make_dataset(rows, users: pd.DataFrame, categories: list[list[str]]) -> Dataset:
    u, i, y, s = zip(*rows)
    interactions = pd.DataFrame(
        {
            "user_id": np.array(u, dtype=np.int64),
            "item_id": np.array(i, dtype=np.int64),
            "rating": np.where(np.array(y) == 1, 5.0, 1.0).astype(np.float32),
            "label": np.array(y, dtype=np.int8),
            "timestamp": np.arange(len(rows), dtype=np.int64),
            "split": list(s),
        }
    )
    n = len(categories)
    items = pd.DataFrame(
        {
            "item_id": np.arange(n, dtype=np.int64),
            "raw_item_id": [f"i{k}" for k in range(n)],
            "title": [f"T{k}" for k in range(n)],
            "categories": categories,
            "brand": [""] * n,
            "price": [np.nan] * n,
        }
    )
    ds = Dataset(interactions, items, users, source="probe-test")
    ds.validate()
    return ds


CATEGORIES = [["Drama"], ["Comedy"], ["Drama", "Comedy"], ["Action"]]
TRAIN_ROWS = [  # user, item, label, split
    (0, 3, 1, "train"),
    (0, 3, 1, "train"),
    (0, 3, 1, "train"),
    (0, 1, 1, "train"),
    (1, 0, 1, "train"),
    (3, 1, 1, "train"),
    (3, 0, 0, "train"),
]
HELD_OUT_ROWS = [
    (0, 0, 1, "valid"),  # user 0: positives Drama x2, Comedy x1 -> Drama; rate 1.0
    (0, 2, 1, "test"),
    (1, 1, 1, "valid"),  # user 1: Comedy; rate 0.5
    (1, 1, 0, "test"),
    (2, 3, 0, "valid"),  # user 2: no positives; rate 0.0
    (2, 0, 0, "test"),
    (4, 2, 1, "test"),  # user 4: Drama x1, Comedy x2 -> Comedy; rate 1.0
    (4, 1, 1, "valid"),
]  # user 3: train rows only


def users_table(occupation: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": np.arange(5, dtype=np.int64),
            "raw_user_id": [f"u{k}" for k in range(5)],
            "age": ["25", "35", "abc", "29", "40"],
            "gender": ["M", "F", "m", "", "F"],
            "occupation": occupation,
        }
    )


@pytest.fixture
def tiny() -> Dataset:
    occupation = ["student", "engineer", "student", "", "other"]
    return make_dataset(TRAIN_ROWS + HELD_OUT_ROWS, users_table(occupation), CATEGORIES)


def test_one_hot_codes_unknown_is_zero_row():
    onehot = one_hot_codes(np.array([[1, 0], [-1, 2]]), [2, 3])
    np.testing.assert_array_equal(onehot, [[0, 1, 1, 0, 0], [0, 0, 0, 0, 1]])


# ---------------------------------------------------------------------------------------------- probe_auc
def test_probe_auc_separable_and_random():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400).astype(float)
    separable = (2 * y - 1 + 0.1 * rng.standard_normal(400))[:, None]
    y_with_gaps = y.copy()
    y_with_gaps[:20] = np.nan  # dropped, not an error
    assert probe_auc(separable, y_with_gaps) > 0.99
    auc = probe_auc(random_features(400, 8, seed=1), y)
    assert abs(auc - 0.5) < 0.1


def test_probe_auc_nan_when_class_too_small(caplog):
    y = np.zeros(100)
    y[:3] = 1.0
    with caplog.at_level(logging.WARNING, logger="userip.evaluation.probes"):
        assert np.isnan(probe_auc(random_features(100, 4), y, folds=5, C=1.0))
    assert "class sizes [97, 3]" in caplog.text


# ---------------------------------------------------------------------------------------------- targets
def test_user_truths_by_hand(tiny):
    truths = user_truths(tiny, np.arange(5))
    np.testing.assert_array_equal(truths["gender_male"], [1, 0, 1, NAN, 0])
    np.testing.assert_array_equal(truths["age_under_30"], [1, 0, NAN, 1, 0])
    np.testing.assert_array_equal(truths["student"], [1, 0, 1, NAN, 0])
    # held-out rates [1, .5, 0, -, 1], median .75
    np.testing.assert_array_equal(truths["heldout_positive_rate_high"], [1, 0, 0, NAN, 1])
    # favourites: Drama, Comedy, -, -, Comedy -> Comedy most common, then Drama
    np.testing.assert_array_equal(truths["heldout_top_genre_is_comedy"], [0, 1, NAN, NAN, 1])
    np.testing.assert_array_equal(truths["heldout_top_genre_is_drama"], [1, 0, NAN, NAN, 0])
    # held-out positives per item: 0 -> 1, 1 -> 2, 2 -> 2; users' means [1.5, 2, -, -, 2], median 2
    np.testing.assert_array_equal(truths["heldout_items_popular"], [0, 0, NAN, NAN, 0])
    assert len(truths) == 7


def test_heldout_items_popular_against_a_plain_count():
    extra = [(2, 1, 1, "test"), (3, 1, 1, "valid"), (3, 2, 1, "test"), (1, 3, 1, "train")]
    rows = TRAIN_ROWS + HELD_OUT_ROWS + extra
    ds = make_dataset(rows, users_table(["x"] * 5), CATEGORIES)
    held = [(u, i) for u, i, y, s in rows if y == 1 and s != "train"]
    count = {i: sum(1 for _, j in held if j == i) for _, i in held}
    means = [
        np.mean([count[i] for v, i in held if v == u]) if any(v == u for v, _ in held) else NAN
        for u in range(5)
    ]
    median = np.nanmedian(means)
    expected = [NAN if np.isnan(m) else float(m > median) for m in means]
    got = user_truths(ds, np.arange(5))["heldout_items_popular"]
    np.testing.assert_array_equal(got, expected)
    assert np.nansum(got) > 0 and np.nansum(1 - got) > 0  # both classes present: the check is not vacuous


def test_user_truths_ignore_train_rows(tiny):
    other_train = [(3, 2, 1, "train")] * 5 + [(0, 1, 0, "train"), (4, 3, 1, "train"), (2, 0, 1, "train")]
    changed = make_dataset(other_train + HELD_OUT_ROWS, tiny.users, CATEGORIES)
    before, after = user_truths(tiny, np.arange(5)), user_truths(changed, np.arange(5))
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_user_truths_subset_order_and_ml1m_codes(tiny):
    truths = user_truths(tiny, np.array([4, 0]))
    np.testing.assert_array_equal(truths["gender_male"], [0, 1])
    ml1m = make_dataset(TRAIN_ROWS + HELD_OUT_ROWS, users_table(["4", "12", "10", "", "0"]), CATEGORIES)
    np.testing.assert_array_equal(user_truths(ml1m, np.arange(5))["student"], [1, 0, 1, NAN, 0])


# ---------------------------------------------------------------------------------------------- features
def test_bag_of_items_unit_norm_and_given_rows_only(tiny):
    train = tiny.split("train")
    bag = bag_of_items(tiny, train, tiny.num_users).toarray()
    assert bag.shape == (5, 4)
    np.testing.assert_allclose(bag[0], np.array([0, 1, 0, 3]) / np.sqrt(10))  # labels ignored
    np.testing.assert_allclose(bag[3], np.array([1, 1, 0, 0]) / np.sqrt(2))
    np.testing.assert_array_equal(bag[[2, 4]], 0.0)  # held-out rows only: not in the bag
    np.testing.assert_allclose(np.linalg.norm(bag[[0, 1, 3]], axis=1), 1.0)
    cats = bag_of_categories(tiny, train, tiny.num_users)  # columns: Action, Comedy, Drama
    np.testing.assert_allclose(cats[0], np.array([3, 1, 0]) / np.sqrt(10))
    np.testing.assert_array_equal(cats[2], 0.0)


def _planted_gender(num_users: int, seed: int, categories: list[list[str]]):
    """(dataset, codes (U, 2)): random rows over len(categories) items; code 0 is the user's gender."""
    rng = np.random.default_rng(seed)
    gender = rng.choice(["M", "F"], num_users)
    rows = [
        (u, int(rng.integers(len(categories))), int(rng.integers(2)), s)
        for u in range(num_users)
        for s in ("train", "test")
    ]
    users = pd.DataFrame(
        {
            "user_id": np.arange(num_users, dtype=np.int64),
            "raw_user_id": [str(u) for u in range(num_users)],
            "gender": gender,
        }
    )
    codes = np.stack([(gender == "M").astype(np.int64), rng.integers(0, 3, num_users)], axis=1)
    return make_dataset(rows, users, categories), codes


def test_probe_report_reads_planted_attribute():
    ds, codes = _planted_gender(200, 3, [["A"], ["B"], ["C"], ["A", "B"], ["C"], []])
    table = probe_report(ds, {"profile_ids": one_hot_codes(codes, [2, 3])}, ds.split("train"), C=1.0)
    assert list(table.index) == ["profile_ids", "bag_of_items", "bag_of_categories", "random"]
    assert "gender_male" in table.columns and "heldout_positive_rate_high" in table.columns
    assert table.loc["profile_ids", "gender_male"] > 0.99
    assert abs(table.loc["random", "gender_male"] - 0.5) < 0.15
    md = probe_markdown(table)
    assert md.splitlines()[0].startswith("| features | gender_male |")


def test_probe_report_without_categories_and_on_a_user_sample():
    ds, codes = _planted_gender(300, 4, [[] for _ in range(6)])  # titles only, like Amazon Games
    feats = {"profile_ids": one_hot_codes(codes, [2, 3])}
    table = probe_report(ds, feats, ds.split("train"), C=1.0, max_users=120)
    assert list(table.index) == ["profile_ids", "bag_of_items", "random"]  # no category bag to build
    assert table.attrs["num_users"]["gender_male"][0] == 120  # the sample, not all 300
    assert table.loc["profile_ids", "gender_male"] > 0.99
