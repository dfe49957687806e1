"""Evaluation protocols, checked against independent per-user (pure Python) computations."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from userip.data.protocols import Protocol, ProtocolConfig, apply_protocol, known_rows_of
from userip.data.schema import Dataset
from userip.utils.config import ConfigError


def toy_dataset(num_users: int = 20, rows_per_user: int = 12, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    records = []
    for u in range(num_users):
        times = sorted(rng.choice(10_000, size=rows_per_user + u % 3, replace=False))
        for t in times:
            records.append(
                (u, int(rng.integers(6)), int(t), str(rng.choice(["train", "train", "valid", "test"])))
            )
    inter = pd.DataFrame(records, columns=["user_id", "item_id", "timestamp", "split"])
    inter["rating"] = rng.integers(1, 6, len(inter)).astype(np.float32)
    inter["label"] = (inter["rating"] > 3).astype(np.int8)
    items = pd.DataFrame(
        {
            "item_id": np.arange(6),
            "raw_item_id": [f"i{i}" for i in range(6)],
            "title": [f"Film {i}" for i in range(6)],
            "categories": [["Drama"] if i % 2 else ["Comedy"] for i in range(6)],
            "brand": "",
            "price": np.nan,
        }
    )
    users = pd.DataFrame(
        {"user_id": np.arange(num_users), "raw_user_id": [f"u{u}" for u in range(num_users)]}
    )
    return Dataset(inter, items, users, hints=pd.DataFrame({"user_id": np.arange(num_users)}))


def by_user_time(frame: pd.DataFrame) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for row in frame.itertuples():
        out[row.user_id].append((row.timestamp, row.item_id))
    return {u: sorted(v) for u, v in out.items()}


def test_warm_and_time_leave_the_dataset_unchanged():
    ds = toy_dataset()
    for name in ("warm", "time"):
        out = apply_protocol(ds, ProtocolConfig(name=name))
        assert out.dataset is ds and out.new_users is None


def test_sparse_keeps_k_random_training_rows_of_each_user():
    ds = toy_dataset()
    out = apply_protocol(ds, ProtocolConfig(name="sparse", history_rows=3)).dataset
    before, after = by_user_time(ds.split("train")), by_user_time(out.split("train"))
    assert set(after) == set(before)
    for u, rows in before.items():
        assert len(after[u]) == min(3, len(rows)) and set(after[u]) <= set(rows)
    # Not simply the first rows in time order, for at least one user.
    assert any(after[u] != rows[:3] for u, rows in before.items())
    for split in ("valid", "test"):  # untouched
        assert by_user_time(out.split(split)) == by_user_time(ds.split(split))
    assert out.config["protocol"]["name"] == "sparse"
    again = apply_protocol(ds, ProtocolConfig(name="sparse", history_rows=3)).dataset
    other = apply_protocol(ds, ProtocolConfig(name="sparse", history_rows=3, seed=1)).dataset
    assert again.interactions.equals(out.interactions)
    assert not other.interactions.equals(out.interactions)


def test_cold_start_splits_users_and_rows_as_documented():
    ds = toy_dataset(num_users=20)
    k = 4
    out = apply_protocol(
        ds, ProtocolConfig(name="cold_start", history_rows=k, cold_user_fraction=0.3, seed=1)
    )
    data, new_users = out.dataset, out.new_users
    cold_raw = sorted(set(new_users["raw_user_id"]))
    assert len(cold_raw) == 6  # round(0.3 * 20)
    cold = {int(r[1:]) for r in cold_raw}
    every = by_user_time(ds.interactions)
    # Cold users: first k rows are the new-users file, the rest are valid or test (one split per user).
    for u in cold:
        known = new_users[new_users["raw_user_id"] == f"u{u}"]
        assert sorted(zip(known["timestamp"], known["raw_item_id"])) == [
            (t, f"i{i}") for t, i in every[u][:k]
        ]
        rows = data.interactions[data.interactions["user_id"] == u]
        assert set(rows["split"]) in ({"valid"}, {"test"})
        assert sorted(zip(rows["timestamp"], rows["item_id"])) == every[u][k:]
    valid_users = set(data.split("valid")["user_id"])
    test_users = set(data.split("test")["user_id"])
    assert valid_users | test_users == cold and not valid_users & test_users
    assert abs(len(valid_users) - len(test_users)) <= 1
    # Warm users: first k rows are profile evidence (history), the rest train; none of it is a cold row.
    for u in set(range(20)) - cold:
        rows = data.interactions[data.interactions["user_id"] == u]
        hist, train = rows[rows["split"] == "history"], rows[rows["split"] == "train"]
        assert sorted(zip(hist["timestamp"], hist["item_id"])) == every[u][:k]
        assert sorted(zip(train["timestamp"], train["item_id"])) == every[u][k:]
    assert not set(data.split("train")["user_id"]) & cold
    # Profile rows are the history split; the known rows map back to the dataset's ids and labels.
    assert data.profile_rows().equals(data.split("history"))
    known = known_rows_of(new_users, data)
    assert set(known["user_id"]) == cold and len(known) == len(new_users)
    assert (known["label"].to_numpy() == new_users["label"].to_numpy()).all()


def test_cold_start_is_reproducible_by_seed():
    ds = toy_dataset()
    a = apply_protocol(ds, ProtocolConfig(name="cold_start", seed=3)).new_users
    b = apply_protocol(ds, ProtocolConfig(name="cold_start", seed=3)).new_users
    c = apply_protocol(ds, ProtocolConfig(name="cold_start", seed=4)).new_users
    assert a.equals(b) and set(a["raw_user_id"]) != set(c["raw_user_id"])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"name": "cold"}, "protocol.name"),
        ({"history_rows": 0}, "protocol.history_rows"),
        ({"history_rows": 2.5}, "protocol.history_rows"),
        ({"cold_user_fraction": 1.0}, "protocol.cold_user_fraction"),
    ],
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        ProtocolConfig(**kwargs)


def test_cold_start_with_too_few_eligible_users_is_a_named_error():
    ds = toy_dataset(num_users=10, rows_per_user=3)
    with pytest.raises(ConfigError, match="cold_user_fraction"):
        apply_protocol(ds, ProtocolConfig(name=Protocol.COLD_START, history_rows=20))
