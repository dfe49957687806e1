"""The synthetic generator: deterministic, and its latent profiles cause interactions, ratings and titles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from userip.data.prepare import prepare
from userip.data.sources.synthetic import CATEGORIES, LEVELS, SyntheticConfig, generate_synthetic
from userip.utils.config import ConfigError, from_dict

SMALL = {"num_users": 300, "num_items": 120, "mean_interactions": 20}


@pytest.fixture(scope="module")
def small():
    return prepare("synthetic", SMALL)


def joined(ds) -> pd.DataFrame:
    inter = ds.interactions.merge(ds.truth, on="user_id")
    items = ds.items.assign(category=ds.items["categories"].map(lambda c: c[0]))
    # The title's first word is its price level's adjective.
    adjectives = {"cheap": 0, "basic": 0, "simple": 0, "value": 0, "classic": 1, "standard": 1, "sturdy": 1}
    adjectives.update({"everyday": 1, "premium": 2, "luxury": 2, "deluxe": 2, "professional": 2})
    items["level"] = items["title"].str.split().str[0].map(adjectives)
    return inter.merge(items[["item_id", "category", "level", "price"]], on="item_id")


def test_deterministic_by_seed():
    a = generate_synthetic(SyntheticConfig(**SMALL, seed=3))
    b = generate_synthetic(SyntheticConfig(**SMALL, seed=3))
    c = generate_synthetic(SyntheticConfig(**SMALL, seed=4))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions["raw_item_id"].equals(c.interactions["raw_item_id"])


def test_profiles_cause_interactions_and_ratings(small):
    ds = small
    assert ds.profile_names == ["hobby", "background"]
    assert ds.num_users == 300 and ds.num_items == 120
    frame = joined(ds)
    hobby_name = np.array(CATEGORIES)[frame["hobby"]]
    in_hobby = frame["category"].to_numpy() == hobby_name
    at_level = frame["level"].to_numpy() == frame["background"].to_numpy()
    # Which items: affinity 0.7 + 0.3 / 4 uniform = 0.775 of draws in the hobby category (0.6 + 0.4 / 3 =
    # 0.733
    # at the level), a little less once repeated (user, item) draws are discarded; uniform would give 1/4,
    # 1/3.
    assert 0.65 < in_hobby.mean() < 0.8
    assert 0.6 < at_level.mean() < 0.75
    # How they rate: matches get clearly more positive labels than mismatches.
    label = frame["label"].to_numpy()
    assert label[in_hobby].mean() - label[~in_hobby].mean() > 0.25
    assert label[at_level].mean() - label[~at_level].mean() > 0.15
    assert 0.4 < label.mean() < 0.6
    # Prices follow the levels; titles name the brand.
    assert frame.groupby("level")["price"].median().is_monotonic_increasing
    assert all(t.endswith(b) for t, b in zip(ds.items["title"], ds.items["brand"]))


def test_hints_recover_the_truth(small):
    hints = small.hints.merge(small.truth, on="user_id")
    hobby_hit = (hints["favourite_category"] == np.array(CATEGORIES)[hints["hobby"]]).mean()
    level_names = np.array(["low", "medium", "high"])
    level_hit = (hints["price_level"] == level_names[hints["background"]]).mean()
    assert hobby_hit > 0.9 and level_hit > 0.6
    assert small.config["truth_values"] == {"hobby": list(CATEGORIES), "background": list(LEVELS)}


def test_observables_weakly_correlated(small):
    users = small.users.merge(small.truth, on="user_id")
    old = users["age"].isin(["35-49", "50+"])
    assert old[users.background == 2].mean() > old[users.background == 0].mean()
    assert set(users.columns) >= {"age", "region", "gender"}


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match=r"num_items must be >= 12"):
        from_dict(SyntheticConfig, {"num_items": 5})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_user'\]"):
        from_dict(SyntheticConfig, {"num_user": 5})
