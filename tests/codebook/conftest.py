"""Fixtures for the codebook tests: planted clusters and a tiny Dataset whose users have a known hobby."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tests.prompts.conftest import _one_torch_thread  # noqa: F401  (autouse: one torch thread per test)

from userip.data.schema import Dataset

# Titles the prompt tests' word tokenizer knows (tests/prompts/conftest.py), so LM targets are not all [UNK].
TITLES = (
    "toy story",
    "heat",
    "jumanji",
    "casino",
    "sabrina",
    "balto",
    "nixon",
    "tom and huck",
    "sudden death",
    "goldeneye",
    "great movie",
    "funny",
)


def planted_clusters(n_per: int = 30, dim: int = 6, k: int = 3, spread: float = 0.05, seed: int = 0):
    """(N, dim) points around k well-separated centres and their labels (N,)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(k, dim) * 3.0  # pairwise distance ~4.2, spread 0.05
    labels = torch.arange(k).repeat_interleave(n_per)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return points, labels


def hobby_dataset(
    num_users: int = 24, num_items: int = 12, k: int = 3, per_user: int = 6, seed: int = 0
) -> Dataset:
    """User u (hobby u % k) picks 4 items of group u % k (liked) and the rest elsewhere (disliked), as in the
    generator; plus 1 test row each. Item i is in group i % k."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(num_users):
        own = np.flatnonzero(np.arange(num_items) % k == u % k)
        other = np.flatnonzero(np.arange(num_items) % k != u % k)
        picked = np.concatenate(
            [rng.choice(own, 4, replace=False), rng.choice(other, per_user - 4, replace=False)]
        )
        for t, item in enumerate(rng.permutation(picked)):
            rows.append((u, int(item), int(item % k == u % k), t, "train"))
        rows.append((u, int(rng.integers(num_items)), 1, per_user, "test"))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "label", "timestamp", "split"])
    inter["label"] = inter["label"].astype(np.int8)
    inter["rating"] = np.where(inter["label"] == 1, 5.0, 1.0).astype(np.float32)
    items = pd.DataFrame(
        {
            "item_id": np.arange(num_items, dtype=np.int64),
            "raw_item_id": [f"i{i}" for i in range(num_items)],
            "title": [TITLES[i % len(TITLES)] for i in range(num_items)],
            "categories": [[f"c{i % k}"] for i in range(num_items)],
            "brand": [""] * num_items,
            "price": [np.nan] * num_items,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(num_users, dtype=np.int64),
            "raw_user_id": [f"u{u}" for u in range(num_users)],
            "age": [["young", "old"][u % 2] for u in range(num_users)],
        }
    )
    truth = pd.DataFrame({"user_id": np.arange(num_users, dtype=np.int64), "hobby": np.arange(num_users) % k})
    ds = Dataset(interactions=inter, items=items, users=users, truth=truth, source="test")
    ds.validate()
    return ds


@pytest.fixture
def tiny_dataset() -> Dataset:
    return hobby_dataset()
