"""The bag-of-items control bank, checked against an independent k-means on the same bags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from userip.data.schema import Dataset
from userip.evaluation.controls import bag_of_items_bank, user_bags


def two_taste_dataset(num_users: int = 40, seed: int = 0) -> Dataset:
    """Even users watch items 0-4, odd users items 5-9 (with a little noise); user 39 has no profile rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users - 1):
        base = 0 if u % 2 == 0 else 5
        for t, item in enumerate(rng.choice(5, size=4, replace=False) + base):
            rows.append((u, int(item), t, int(rng.integers(2)), "train"))
    rows.append((num_users - 1, 7, 0, 1, "test"))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label", "split"])
    inter["rating"] = np.float32(4.0)
    items = pd.DataFrame(
        {
            "item_id": np.arange(10),
            "raw_item_id": [f"i{i}" for i in range(10)],
            "title": [f"t{i}" for i in range(10)],
            "categories": [[] for _ in range(10)],
            "brand": "",
            "price": np.nan,
        }
    )
    users = pd.DataFrame(
        {"user_id": np.arange(num_users), "raw_user_id": [f"u{u}" for u in range(num_users)]}
    )
    return Dataset(inter, items, users)


def test_codes_recover_the_two_tastes_and_match_an_independent_kmeans():
    ds = two_taste_dataset()
    bank = bag_of_items_bank(ds, ["hobby", "background"], [2, 3], seed=0)
    users = np.arange(39)
    codes = bank.lookup(users)
    taste = users % 2
    assert adjusted_rand_score(taste, codes[:, 0]) == 1.0
    # Independent: the same bags built by hand, clustered by scikit-learn directly.
    bags = np.zeros((39, 10))
    for row in ds.split("train").itertuples():
        bags[row.user_id, row.item_id] += 1
    bags /= np.linalg.norm(bags, axis=1, keepdims=True)
    # (k-means on a sparse input takes another code path than on a dense one: give it the same kind)
    expected = KMeans(n_clusters=3, n_init=10, random_state=1).fit_predict(sp.csr_matrix(bags))
    assert adjusted_rand_score(expected, codes[:, 1]) == 1.0
    assert bank.lookup(np.array([39]))[0].tolist() == [-1, -1]  # no profile rows, no known rows: unknown


def test_known_rows_give_unseen_users_the_nearest_centroid():
    ds = two_taste_dataset()
    known = pd.DataFrame({"user_id": [39, 39, 39], "item_id": [5, 6, 8], "label": [1, 0, 1]})
    bank = bag_of_items_bank(ds, ["hobby"], [2], known_rows=known, seed=0)
    odd_code = bank.lookup(np.array([1]))[0, 0]
    assert bank.lookup(np.array([39]))[0, 0] == odd_code


def test_signed_bags_separate_liked_from_not_liked():
    ds = two_taste_dataset()
    rows = ds.split("train")
    bags = user_bags(ds, rows, signed=True).toarray()
    assert bags.shape == (40, 20)
    for row in rows.itertuples():
        column = row.item_id + (0 if row.label == 1 else 10)
        assert bags[row.user_id, column] > 0
    np.testing.assert_allclose(np.linalg.norm(bags[:39], axis=1), 1.0)
