"""Yelp Open Dataset ("academic dataset"), JSON lines.

review.json    review_id, user_id, business_id, stars, date ("YYYY-MM-DD HH:MM:SS"), text
business.json  business_id, name, categories ("Food, Coffee & Tea" or null), attributes.RestaurantsPriceRange2
               ("1".."4", sometimes "None"): the price level, kept as ``price`` (1-4)
user.json      user_id, review_count, fans, average_stars, yelping_since, ...: observable features (bucketed)
File names may carry the ``yelp_academic_dataset_`` prefix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from userip.data.sources.base import (
    DataLoadError,
    LoadReport,
    RawData,
    as_category_lists,
    find_file,
    read_json_lines,
    to_unix_seconds,
)


@dataclasses.dataclass
class YelpConfig:
    path: str  # folder holding review.json, business.json and (optional) user.json
    max_bad_lines: int = 100
    keep_reviews: bool = True

    def __post_init__(self) -> None:
        if self.max_bad_lines < 0:
            raise ValueError(f"max_bad_lines must be >= 0, got {self.max_bad_lines}")


REVIEW_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("business_id", pa.string()),
        ("stars", pa.float64()),
        ("date", pa.string()),
        ("text", pa.string()),
    ]
)
BUSINESS_SCHEMA = pa.schema(
    [
        ("business_id", pa.string()),
        ("name", pa.string()),
        ("categories", pa.string()),
        ("attributes", pa.struct([("RestaurantsPriceRange2", pa.string())])),
    ]
)
USER_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("review_count", pa.float64()),
        ("fans", pa.float64()),
        ("average_stars", pa.float64()),
        ("yelping_since", pa.string()),
    ]
)


def _find(folder: Path, name: str, required: bool) -> Path | None:
    try:
        return find_file(folder, (f"{name}.json", f"yelp_academic_dataset_{name}.json"), f"Yelp {name}.json")
    except DataLoadError:
        if required:
            raise
        return None


def _log_bucket(values: pd.Series) -> pd.Series:
    """Counts as coarse power-of-two buckets ("0", "1", "2-3", "4-7", ...): a usable categorical feature."""
    v = values.fillna(-1).to_numpy()
    exponent = np.floor(np.log2(np.maximum(v, 1))).astype(int)
    low, high = 2**exponent, 2 ** (exponent + 1) - 1
    labels = np.where(
        low == high, low.astype(str), np.char.add(np.char.add(low.astype(str), "-"), high.astype(str))
    )
    labels = np.where(v == 0, "0", labels)
    return pd.Series(np.where(v < 0, "", labels), index=values.index)


def load_yelp(cfg: YelpConfig) -> RawData:
    folder = Path(cfg.path)
    report = LoadReport(max_bad_lines=cfg.max_bad_lines)
    review_path = _find(folder, "review", required=True)
    reviews = read_json_lines(
        review_path, REVIEW_SCHEMA, report, required=("user_id", "business_id", "stars")
    )
    timestamps = pd.to_datetime(reviews["date"], errors="coerce", format="mixed")
    interactions = pd.DataFrame(
        {
            "raw_user_id": reviews["user_id"],
            "raw_item_id": reviews["business_id"],
            "rating": reviews["stars"],
            "timestamp": to_unix_seconds(timestamps),
        }
    )
    if cfg.keep_reviews:
        interactions["review"] = reviews["text"].fillna("")

    items = None
    business_path = _find(folder, "business", required=False)
    if business_path is None:
        report.note(f"{folder}: no business.json; items get no names, categories or price levels")
    else:
        business = read_json_lines(business_path, BUSINESS_SCHEMA, report, required=("business_id",))
        price_level = business["attributes"].map(
            lambda a: a.get("RestaurantsPriceRange2") if isinstance(a, dict) else None
        )
        items = pd.DataFrame(
            {
                "raw_item_id": business["business_id"],
                "title": business["name"].fillna(""),
                "categories": as_category_lists(business["categories"], separator=","),
                "brand": "",
                "price": pd.to_numeric(price_level, errors="coerce").astype("float64"),
            }
        )

    users = None
    user_path = _find(folder, "user", required=False)
    if user_path is not None:
        raw_users = read_json_lines(user_path, USER_SCHEMA, report, required=("user_id",))
        users = pd.DataFrame(
            {
                "raw_user_id": raw_users["user_id"],
                "review_count": _log_bucket(raw_users["review_count"]),
                "fans": _log_bucket(raw_users["fans"]),
                "average_stars": (raw_users["average_stars"] * 2).round().div(2).astype("string").fillna(""),
                "yelping_since": raw_users["yelping_since"].fillna("").str.slice(0, 4),
            }
        )
    return RawData(interactions=interactions, items=items, users=users, report=report)
