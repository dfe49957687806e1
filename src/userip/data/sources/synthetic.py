"""Synthetic users with known latent profiles: the project's embedded default dataset.

Each user has a latent ``hobby`` (one of 4 item categories) and ``background`` (one of 3 spending levels).
Both *cause* the data: which items a user interacts with (mostly their hobby's category, mostly at their
spending level) and how they rate them (hobby and level match -> high rating, mismatch -> low, plus item
quality, user bias and noise). So (a) a user's title history reveals the profile to a language model (titles
name the category and the price level: "premium hiking boots by TrailElite1") and (b) knowing the profile
helps a CTR model, most of all for users with few interactions. Observable user features (age bucket,
region) are weakly correlated with the profiles; gender is pure noise. The true profiles are kept in the
``truth`` table.

Everything is vectorised numpy, deterministic by seed; a million interactions take a few seconds.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from userip.data.sources.base import RawData, take_strings

CATEGORIES = ("Outdoors", "Kitchen", "Gaming", "Music")  # hobby k means "likes category k"
LEVELS = ("budget", "mid-range", "premium")  # background k means "spends at price level k"
_NOUNS = (
    ("hiking boots", "tent", "backpack", "trail jacket", "sleeping bag", "camping stove", "trekking poles"),
    ("chef knife", "frying pan", "blender", "coffee maker", "cutting board", "stock pot", "mixing bowls"),
    ("game controller", "gaming mouse", "mechanical keyboard", "gaming headset", "racing wheel", "joystick"),
    ("acoustic guitar", "digital piano", "drum pads", "studio headphones", "microphone", "violin", "ukulele"),
)
_ADJECTIVES = (
    ("cheap", "basic", "simple", "value"),
    ("classic", "standard", "sturdy", "everyday"),
    ("premium", "luxury", "deluxe", "professional"),
)
_BRAND_STEMS = ("Trail", "Chef", "Pixel", "Tone")
_BRAND_TIERS = ("Basics", "Works", "Elite")
_BASE_PRICES = (12.0, 45.0, 160.0)
_OVERSAMPLE = 1.5  # candidate draws per wanted interaction (repeats of a (user, item) pair are discarded)
_AGE_BUCKETS = ("18-24", "25-34", "35-49", "50+")
_REGIONS = ("north", "south", "east", "west")
_SENTIMENTS = ("Terrible", "Disappointing", "Okay", "Good", "Excellent")
_PRICE_REMARKS = ("feels cheap", "worth the price", "too pricey")  # item level below / at / above the user's


@dataclasses.dataclass
class SyntheticConfig:
    num_users: int = 2000
    num_items: int = 500
    mean_interactions: float = 25.0  # per user, before de-duplication and filtering
    interactions_spread: float = 0.6  # sigma of the lognormal number of interactions per user
    min_interactions: int = 5  # per user (so that most users survive the 4-core filter)
    hobby_affinity: float = 0.7  # P(an interaction's item is in the user's hobby category); else uniform
    level_affinity: float = 0.6  # P(an interaction's item is at the user's spending level); else uniform
    popularity_skew: float = 1.5  # >1 makes some items within a (category, level) cell far more popular
    hobby_effect: float = 1.5  # rating score bonus for an item of the user's hobby category
    level_effect: float = 1.0  # rating score bonus for an item at the user's spending level
    level_distance_effect: float = 0.5  # penalty per price level between item and user
    noise: float = 0.7  # std of the per-interaction rating noise (item quality 0.4, user bias 0.3)
    positive_rate: float = 0.5  # share of ratings > 3 (ratings are cut from score quantiles)
    with_reviews: bool = True  # generate short review texts (they name the sentiment and the price feeling)
    seed: int = 0

    def __post_init__(self) -> None:
        cells = len(CATEGORIES) * len(LEVELS)
        if self.num_users < 1:
            raise ValueError(f"num_users must be >= 1, got {self.num_users}")
        if self.num_items < cells:
            raise ValueError(
                f"num_items must be >= {cells} (one item per category x price level), got {self.num_items}"
            )
        if self.mean_interactions <= 0 or self.min_interactions < 1:
            raise ValueError("mean_interactions must be > 0 and min_interactions >= 1")
        for name in ("hobby_affinity", "level_affinity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.positive_rate < 1.0:
            raise ValueError(f"positive_rate must lie in (0, 1), got {self.positive_rate}")
        if self.interactions_spread < 0 or self.noise < 0 or self.popularity_skew <= 0:
            raise ValueError("interactions_spread and noise must be >= 0, popularity_skew > 0")


def _ids(prefix: str, n: int) -> np.ndarray:
    width = len(str(max(n - 1, 0)))
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width)).astype(object)


def _make_items(cfg: SyntheticConfig, rng: np.random.Generator) -> pd.DataFrame:
    num_levels = len(LEVELS)
    # Every (category, level) cell gets num_items / 12 items (+-1), in a shuffled order of item ids.
    cell = rng.permutation(np.arange(cfg.num_items) % (len(CATEGORIES) * num_levels))
    category, level = cell // num_levels, cell % num_levels
    noun_index = rng.integers(0, 1 << 30, cfg.num_items)
    nouns = np.array([_NOUNS[c][k % len(_NOUNS[c])] for c, k in zip(category, noun_index)], dtype=object)
    adjectives = np.array(_ADJECTIVES, dtype=object)[
        level, rng.integers(0, len(_ADJECTIVES[0]), cfg.num_items)
    ]
    # Two brands per cell: the brand names the category (stem) and the price tier.
    brand = (
        np.array(_BRAND_STEMS, dtype=object)[category]
        + np.array(_BRAND_TIERS, dtype=object)[level]
        + rng.integers(1, 3, cfg.num_items).astype(str).astype(object)
    )
    price = np.array(_BASE_PRICES)[level] * rng.lognormal(0.0, 0.25, cfg.num_items)
    return pd.DataFrame(
        {
            "raw_item_id": _ids("i", cfg.num_items),
            "title": adjectives + " " + nouns + " by " + brand,
            "categories": [[CATEGORIES[c]] for c in category],
            "brand": brand,
            "price": np.floor(price) + 0.99,
            # Generator internals, used below and dropped before returning.
            "category_index": category,
            "level_index": level,
            "noun": nouns,
        }
    )


def _make_users(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = cfg.num_users
    hobby = rng.integers(0, len(CATEGORIES), n)
    background = rng.integers(0, len(LEVELS), n)
    # Weak observable correlates: richer users skew older; region leans towards the hobby's index.
    age_logits = 0.6 * (background[:, None] - 1) * np.linspace(-1, 1, len(_AGE_BUCKETS))[None, :]
    age = _sample_rows(rng, np.exp(age_logits))
    region_weights = np.ones((n, len(_REGIONS)))
    region_weights[np.arange(n), hobby % len(_REGIONS)] = 2.0
    region = _sample_rows(rng, region_weights)
    raw_ids = _ids("u", n)
    users = pd.DataFrame(
        {
            "raw_user_id": raw_ids,
            "age": np.array(_AGE_BUCKETS, dtype=object)[age],
            "region": np.array(_REGIONS, dtype=object)[region],
            "gender": np.array(["F", "M"], dtype=object)[rng.integers(0, 2, n)],
        }
    )
    truth = pd.DataFrame(
        {"raw_user_id": raw_ids, "hobby": hobby.astype(np.int64), "background": background.astype(np.int64)}
    )
    return users, truth


def _sample_rows(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One categorical draw per row of an (N, K) weight matrix (inverse CDF, vectorised)."""
    cdf = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    return np.minimum((rng.random((len(weights), 1)) > cdf).sum(axis=1), weights.shape[1] - 1)


def generate_synthetic(cfg: SyntheticConfig) -> RawData:
    rng = np.random.default_rng(cfg.seed)
    items = _make_items(cfg, rng)
    users, truth = _make_users(cfg, rng)
    hobby, background = truth["hobby"].to_numpy(), truth["background"].to_numpy()
    num_categories, num_levels = len(CATEGORIES), len(LEVELS)

    # Interactions per user: lognormal around the mean, at least min_interactions.
    sigma = cfg.interactions_spread
    counts = rng.lognormal(np.log(cfg.mean_interactions) - sigma**2 / 2, sigma, cfg.num_users)
    counts = np.maximum(np.rint(counts).astype(np.int64), cfg.min_interactions)
    # Draw more candidates than needed, drop repeated (user, item) pairs, keep each user's first counts[u].
    user_index = np.repeat(np.arange(cfg.num_users), np.ceil(counts * _OVERSAMPLE).astype(np.int64))
    n = len(user_index)

    # Which item: the hobby's category / the user's level with the affinities, else uniform; then an item of
    # that cell, skewed towards the cell's first (most popular) items.
    category = np.where(
        rng.random(n) < cfg.hobby_affinity, hobby[user_index], rng.integers(0, num_categories, n)
    )
    level = np.where(
        rng.random(n) < cfg.level_affinity, background[user_index], rng.integers(0, num_levels, n)
    )
    item_cell = items["category_index"].to_numpy() * num_levels + items["level_index"].to_numpy()
    items_by_cell = np.argsort(item_cell, kind="stable")
    cell_sizes = np.bincount(item_cell, minlength=num_categories * num_levels)
    cell_starts = np.concatenate([[0], np.cumsum(cell_sizes)[:-1]])
    cell = category * num_levels + level
    offset = np.floor(cell_sizes[cell] * rng.random(n) ** cfg.popularity_skew).astype(np.int64)
    item_index = items_by_cell[cell_starts[cell] + offset]
    first_time = ~pd.Series(user_index * cfg.num_items + item_index).duplicated().to_numpy()
    user_index, item_index = user_index[first_time], item_index[first_time]
    group_start = np.searchsorted(user_index, user_index)  # user_index is sorted: start of each user's run
    keep = np.arange(len(user_index)) - group_start < counts[user_index]
    user_index, item_index = user_index[keep], item_index[keep]
    n = len(user_index)

    # Rating: latent score from the profile match, then cut at score quantiles into 1..5 stars so that the
    # share of ratings > 3 is positive_rate.
    item_quality = rng.normal(0.0, 0.4, cfg.num_items)
    user_bias = rng.normal(0.0, 0.3, cfg.num_users)
    level_gap = items["level_index"].to_numpy()[item_index] - background[user_index]
    score = (
        cfg.hobby_effect * (items["category_index"].to_numpy()[item_index] == hobby[user_index])
        + cfg.level_effect * (level_gap == 0)
        - cfg.level_distance_effect * np.abs(level_gap)
        + item_quality[item_index]
        + user_bias[user_index]
        + rng.normal(0.0, cfg.noise, n)
    )
    negative = 1.0 - cfg.positive_rate
    cuts = np.quantile(score, [0.3 * negative, 0.6 * negative, negative, negative + 0.55 * cfg.positive_rate])
    rating = (1 + np.searchsorted(cuts, score, side="right")).astype(np.float64)

    # Time: each user's interactions spread over two years, in order. The draws are iid, so sorting them
    # within each user's run of rows (one sort of user * span + offset; user_index is sorted) orders the rows.
    span = 2 * 365 * 86_400
    offsets = np.sort(user_index * span + rng.integers(0, span, n)) - user_index * span
    timestamp = 1_577_836_800 + offsets
    interactions = pd.DataFrame(
        {
            "raw_user_id": take_strings(users["raw_user_id"], user_index),
            "raw_item_id": take_strings(items["raw_item_id"], item_index),
            "rating": rating,
            "timestamp": timestamp.astype(np.int64),
        }
    )
    if cfg.with_reviews:
        # A review names the sentiment, the item's noun and how the price felt: build every distinct text
        # once (5 x nouns x 3) and gather.
        nouns, noun_codes = np.unique(items["noun"].to_numpy(dtype=str), return_inverse=True)
        texts = (
            np.array(_SENTIMENTS, dtype=object)[:, None, None]
            + " "
            + nouns.astype(object)[None, :, None]
            + ", "
            + np.array(_PRICE_REMARKS, dtype=object)[None, None, :]
            + "."
        )
        codes = np.ravel_multi_index(
            (rating.astype(np.int64) - 1, noun_codes[item_index], np.sign(level_gap) + 1), texts.shape
        )
        interactions["review"] = take_strings(texts.ravel(), codes)
    extra = {"truth_values": {"hobby": list(CATEGORIES), "background": list(LEVELS)}}
    items = items.drop(columns=["category_index", "level_index", "noun"])
    return RawData(interactions=interactions, items=items, users=users, truth=truth, extra_config=extra)
