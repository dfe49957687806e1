"""Generic CSV or Parquet interactions with a column mapping (and optional items / users tables).

The interactions file needs a user and an item column and either a rating column (labelled by the threshold)
or a ready 0/1 label column; a timestamp, a predefined split (train/valid/test; "validation", "val", "dev"
mean valid) and review text are optional. An items file adds titles, categories, brands and prices.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from userip.data.sources.base import (
    DataLoadError,
    RawData,
    as_category_lists,
    as_int64,
    parse_price,
    require_file,
    to_unix_seconds,
)

SPLIT_ALIASES = {
    "train": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "dev": "valid",
    "test": "test",
}


@dataclasses.dataclass
class TabularConfig:
    path: str  # .csv / .tsv (optionally .gz) or .parquet
    user_column: str = "user_id"
    item_column: str = "item_id"
    rating_column: str | None = "rating"
    label_column: str | None = None  # a ready 0/1 label; used instead of thresholding the rating
    timestamp_column: str | None = None
    split_column: str | None = None
    review_column: str | None = None
    delimiter: str | None = None  # CSV only; None: "\t" for .tsv, "," otherwise
    items: str | None = None  # optional items file (CSV or Parquet)
    item_id_column: str = "item_id"
    title_column: str | None = "title"
    categories_column: str | None = None
    categories_separator: str = "|"
    brand_column: str | None = None
    price_column: str | None = None
    users: str | None = None  # optional users file: every column but the id becomes an observable feature
    user_id_column: str = "user_id"

    def __post_init__(self) -> None:
        if self.rating_column is None and self.label_column is None:
            raise ValueError("csv: give rating_column or label_column")


def read_table(path: str | Path, what: str, delimiter: str | None = None) -> pd.DataFrame:
    path = require_file(path, what)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        sep = delimiter or ("\t" if ".tsv" in name else ",")
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as e:
        raise DataLoadError(f"{path}: cannot read {what} ({e})") from e


def require_column(frame: pd.DataFrame, name: str, option: str, path: str) -> pd.Series:
    if name not in frame.columns:
        raise DataLoadError(
            f"{path}: unknown column {name!r} (from {option}); available: {list(frame.columns)}"
        )
    return frame[name]


def _numeric(values: pd.Series, option: str, path: str) -> pd.Series:
    numbers = pd.to_numeric(values.replace("", np.nan), errors="coerce")
    bad = numbers.isna() & values.notna() & (values.astype(str) != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataLoadError(f"{path}: row {row + 1}: {option} value {values.iloc[row]!r} is not a number")
    return numbers


def read_items(
    path: str,
    item_id_column: str,
    title_column: str | None,
    categories_column: str | None,
    categories_separator: str,
    brand_column: str | None,
    price_column: str | None,
) -> pd.DataFrame:
    """An items file (CSV or Parquet) as RawData.items; a column given as None is left empty."""
    meta = read_table(path, "items file")
    ids = require_column(meta, item_id_column, "item_id_column", path).astype(str)
    empty = pd.Series([None] * len(meta), index=meta.index, dtype=object)

    def optional(name: str | None, option: str) -> pd.Series:
        return empty if name is None else require_column(meta, name, option, path)

    return pd.DataFrame(
        {
            "raw_item_id": ids,
            "title": optional(title_column, "title_column").fillna("").astype(str),
            "categories": as_category_lists(
                optional(categories_column, "categories_column"), separator=categories_separator
            ),
            "brand": optional(brand_column, "brand_column").fillna("").astype(str),
            "price": parse_price(optional(price_column, "price_column").replace("", np.nan)),
        }
    ).drop_duplicates("raw_item_id")


def load_tabular(cfg: TabularConfig) -> RawData:
    frame = read_table(cfg.path, "interactions file", cfg.delimiter)
    path = cfg.path
    interactions = pd.DataFrame(
        {
            "raw_user_id": require_column(frame, cfg.user_column, "user_column", path).astype(str),
            "raw_item_id": require_column(frame, cfg.item_column, "item_column", path).astype(str),
        }
    )
    if cfg.rating_column is not None:
        values = require_column(frame, cfg.rating_column, "rating_column", path)
        interactions["rating"] = _numeric(values, "rating_column", path).astype("float64")
    if cfg.label_column is not None:
        labels = _numeric(require_column(frame, cfg.label_column, "label_column", path), "label_column", path)
        if not labels.isin([0, 1]).all():
            raise DataLoadError(f"{path}: label_column {cfg.label_column!r} must hold only 0 and 1")
        interactions["label"] = labels.astype("int8")
    if cfg.timestamp_column is not None:
        values = require_column(frame, cfg.timestamp_column, "timestamp_column", path)
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.isna().any():  # dates as text
            dates = pd.to_datetime(values, errors="coerce", format="mixed")
            if dates.isna().any():
                row = int(np.flatnonzero(dates.isna().to_numpy())[0])
                raise DataLoadError(
                    f"{path}: row {row + 1}: timestamp {values.iloc[row]!r} is neither seconds nor a date"
                )
            numbers = to_unix_seconds(dates)
        interactions["timestamp"] = as_int64(numbers, f"timestamp column {cfg.timestamp_column!r}", path)
    if cfg.split_column is not None:
        values = (
            require_column(frame, cfg.split_column, "split_column", path).astype(str).str.strip().str.lower()
        )
        split = values.map(SPLIT_ALIASES)
        if split.isna().any():
            unknown = sorted(set(values[split.isna()]))[:5]
            raise DataLoadError(f"{path}: split_column {cfg.split_column!r} has unknown values {unknown}")
        interactions["split"] = split.astype(str)
    if cfg.review_column is not None:
        interactions["review"] = (
            require_column(frame, cfg.review_column, "review_column", path).fillna("").astype(str)
        )

    items = None
    if cfg.items is not None:
        items = read_items(
            cfg.items, cfg.item_id_column, cfg.title_column, cfg.categories_column, cfg.categories_separator,
            cfg.brand_column, cfg.price_column,
        )  # fmt: skip
    users = None
    if cfg.users is not None:
        users = read_table(cfg.users, "users file")
        require_column(users, cfg.user_id_column, "user_id_column", cfg.users)
        users = users.rename(columns={cfg.user_id_column: "raw_user_id"})
    return RawData(interactions=interactions, items=items, users=users)
