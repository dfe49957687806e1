"""Fixtures for the offline LM tests: a tiny two-factor dataset built here (no generator, no files)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from userip.data.schema import Dataset
from userip.lm import OfflineLMConfig
from userip.prompts import PromptConfig

CATEGORIES = ("sports", "books", "kitchen", "toys")
PRICE_WORDS = ("budget", "standard", "luxury")
NOUNS = {
    "sports": ("ball", "racket", "bike"),
    "books": ("novel", "atlas", "poems"),
    "kitchen": ("pan", "knife", "kettle"),
    "toys": ("puzzle", "robot", "doll"),
}


def make_toy_dataset(num_users: int = 24, interactions_per_user: int = 8, seed: int = 0) -> Dataset:
    """Users with a true hobby (category) and background (price level) that decide what they interact with."""
    rng = np.random.default_rng(seed)
    items = []
    for c in CATEGORIES:
        for p, price_word in enumerate(PRICE_WORDS):
            for noun in NOUNS[c]:
                items.append((f"{price_word} {c} {noun}", c, float(10 * 3**p)))
    items_df = pd.DataFrame(
        {
            "item_id": np.arange(len(items), dtype=np.int64),
            "raw_item_id": [f"i{i}" for i in range(len(items))],
            "title": [t for t, _, _ in items],
            "categories": [[c] for _, c, _ in items],
            "brand": ["acme"] * len(items),
            "price": [p for _, _, p in items],
        }
    )
    hobby = rng.integers(0, len(CATEGORIES), num_users)
    background = rng.integers(0, len(PRICE_WORDS), num_users)
    rows = []
    for u in range(num_users):
        for t in range(interactions_per_user):
            c = hobby[u] if rng.random() < 0.8 else rng.integers(0, len(CATEGORIES))
            p = background[u] if rng.random() < 0.8 else rng.integers(0, len(PRICE_WORDS))
            item = (c * len(PRICE_WORDS) + p) * 3 + rng.integers(0, 3)
            split = (
                "train"
                if t < interactions_per_user - 2
                else ("valid" if t == interactions_per_user - 2 else "test")
            )
            rows.append((u, item, 5.0, 1, t, split))
    inter = pd.DataFrame(
        rows, columns=["user_id", "item_id", "rating", "label", "timestamp", "split"]
    ).astype(
        {"user_id": "int64", "item_id": "int64", "rating": "float32", "label": "int8", "timestamp": "int64"}
    )
    train = inter[inter["split"] == "train"].merge(items_df, on="item_id")
    train["category"] = train["categories"].str[0]
    favourite = train.groupby("user_id")["category"].agg(lambda s: s.value_counts().index[0])
    level = (
        train.groupby("user_id")["price"]
        .mean()
        .map(lambda v: "budget" if v < 20 else "luxury" if v > 60 else "standard")
    )
    hints = pd.DataFrame(
        {
            "user_id": np.arange(num_users, dtype=np.int64),
            "favourite_category": favourite.reindex(range(num_users)).to_numpy(),
            "favourite_brand": "acme",
            "price_level": level.reindex(range(num_users)).to_numpy(),
        }
    )
    users = pd.DataFrame(
        {"user_id": np.arange(num_users, dtype=np.int64), "raw_user_id": [f"u{u}" for u in range(num_users)]}
    )
    truth = pd.DataFrame(
        {"user_id": np.arange(num_users, dtype=np.int64), "hobby": hobby, "background": background}
    )
    ds = Dataset(inter, items_df, users, truth=truth, hints=hints, source="toy")
    ds.validate()
    return ds


@pytest.fixture(scope="session")
def toy_dataset() -> Dataset:
    return make_toy_dataset()


@pytest.fixture
def prompt_config() -> PromptConfig:
    return PromptConfig(max_target_tokens=32)


def tiny_config(**overrides) -> OfflineLMConfig:
    """A model small enough for a test to pre-train it in a second or two."""
    values = dict(
        hidden_size=32, num_layers=1, num_heads=2, epochs=8, max_steps=24, batch_size=8, max_length=64
    )
    return OfflineLMConfig(**{**values, **overrides})


@pytest.fixture
def tiny_lm_config() -> OfflineLMConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, toy_dataset):
    """One tiny pre-training for the whole session: (path, the in-memory model as saved, its tokenizer)."""
    from userip.lm import load_or_pretrain
    from userip.lm import offline as offline_module

    captured = {}
    original = offline_module._save_atomically

    def capture(final, model, tokenizer, manifest):
        captured["model"], captured["tokenizer"] = model, tokenizer
        return original(final, model, tokenizer, manifest)

    cache = tmp_path_factory.mktemp("lm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(offline_module, "_save_atomically", capture)
        path = load_or_pretrain(
            toy_dataset, PromptConfig(max_target_tokens=32), tiny_config(), cache, progress=False
        )
    return path, captured["model"], captured["tokenizer"]


@pytest.fixture
def pretrained_path(pretrained):
    return pretrained[0]
