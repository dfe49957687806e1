"""Implicit feedback: a CSV (or Parquet) of observed interactions, ordered per user, with no rating or label.

Every row is a positive (a purchase, a visit, a click). The order of each user's history comes from a
position column (integers, 0 = oldest, unique per user; the layout of ``../shared/data/amazon-games`` and
``../shared/data/yelp``) or a timestamp column (seconds or dates). Negatives are not in the file:
preprocessing samples them (``PrepareConfig.negatives_per_positive``) after filtering and splitting, so they
can avoid every item the user interacted with in any split.

``path`` is the interactions file, or a folder holding ``interactions.csv`` (and, unless ``items`` is given,
an optional ``items.csv`` beside it).
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import numpy as np
import pandas as pd

from userip.data.sources.base import DataLoadError, RawData, as_int64, to_unix_seconds
from userip.data.sources.tabular import read_items, read_table, require_column
from userip.utils.config import ConfigError, choice

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.csv"


class OrderType(enum.Enum):
    POSITION = "position"  # per-user integers (0 = oldest): orders a history, not comparable across users
    TIMESTAMP = "timestamp"  # seconds or dates: comparable across users (the global time split works)


@dataclasses.dataclass
class ImplicitConfig:
    path: (
        str  # interactions file (.csv / .tsv, optionally .gz, or .parquet) or a folder with interactions.csv
    )
    items: str | None = None  # items file; default: items.csv beside a folder ``path`` when it exists
    user_column: str = "user_id"
    item_column: str = "item_id"
    order_column: str | None = "position"  # None: no order (only the random split applies)
    order_type: OrderType = OrderType.POSITION
    delimiter: str | None = None  # CSV only; None: "\t" for .tsv, "," otherwise
    item_id_column: str = "item_id"
    title_column: str | None = "title"
    categories_column: str | None = None  # e.g. "categories" for ../shared/data/yelp
    categories_separator: str = "|"
    brand_column: str | None = None
    price_column: str | None = None

    def __post_init__(self) -> None:
        self.order_type = choice(OrderType, self.order_type, "implicit.order_type")  # type: ignore[assignment]
        for key in ("path", "user_column", "item_column", "item_id_column"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"implicit.{key}: expected a non-empty string, got {value!r}")


def _files(cfg: ImplicitConfig) -> tuple[Path, Path | None]:
    path = Path(cfg.path)
    items = Path(cfg.items) if cfg.items is not None else None
    if path.is_dir():
        if items is None and (path / ITEMS_FILE).is_file():
            items = path / ITEMS_FILE
        path = path / INTERACTIONS_FILE
    return path, items


def _positions(values: pd.Series, column: str, path: Path) -> pd.Series:
    """Non-negative integer positions as int64; the first bad cell is named with its row."""
    text = values.astype(str).str.strip()
    numbers = pd.to_numeric(text.where(text != "", None), errors="coerce")
    ok = numbers.notna() & (numbers >= 0) & (numbers == np.floor(numbers.fillna(0)))
    if not ok.all():
        row = int(np.flatnonzero(~ok.to_numpy())[0])
        raise DataLoadError(
            f"{path}: row {row + 1}: column {column!r} (order_column, order_type position) holds "
            f"{values.iloc[row]!r}, not a non-negative integer"
        )
    return as_int64(numbers, f"column {column!r} (order_column, order_type position)", path)


def _timestamps(values: pd.Series, column: str, path: Path) -> pd.Series:
    """Unix seconds from numbers or dates; the first cell that is neither is named with its row."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        dates = pd.to_datetime(values, errors="coerce", format="mixed")
        if dates.isna().any():
            row = int(np.flatnonzero(dates.isna().to_numpy())[0])
            raise DataLoadError(
                f"{path}: row {row + 1}: column {column!r} (order_column, order_type timestamp) holds "
                f"{values.iloc[row]!r}, neither seconds nor a date"
            )
        numbers = to_unix_seconds(dates)
    return as_int64(numbers, f"column {column!r} (order_column, order_type timestamp)", path)


def load_implicit(cfg: ImplicitConfig) -> RawData:
    path, items_path = _files(cfg)
    frame = read_table(path, "interactions file", cfg.delimiter)
    interactions = pd.DataFrame(
        {
            "raw_user_id": require_column(frame, cfg.user_column, "user_column", str(path)).astype(str),
            "raw_item_id": require_column(frame, cfg.item_column, "item_column", str(path)).astype(str),
        }
    )
    for key, column, option in (
        ("raw_user_id", cfg.user_column, "user_column"),
        ("raw_item_id", cfg.item_column, "item_column"),
    ):
        blank = (interactions[key].str.strip() == "").to_numpy()
        if blank.any():
            row = int(np.flatnonzero(blank)[0])
            raise DataLoadError(f"{path}: row {row + 1}: column {column!r} ({option}) is empty")
    positional = False
    if cfg.order_column is not None:
        values = require_column(frame, cfg.order_column, "order_column", str(path))
        if cfg.order_type is OrderType.POSITION:
            order = _positions(values, cfg.order_column, path)
            repeated = pd.DataFrame({"u": interactions["raw_user_id"], "p": order}).duplicated()
            if repeated.any():
                row = int(np.flatnonzero(repeated.to_numpy())[0])
                raise DataLoadError(
                    f"{path}: row {row + 1}: user {interactions['raw_user_id'].iloc[row]!r} has position "
                    f"{int(order.iloc[row])} twice (column {cfg.order_column!r}, order_column, must order "
                    "each user's history)"
                )
            positional = True
        else:
            order = _timestamps(values, cfg.order_column, path)
        interactions["timestamp"] = order.to_numpy()
    items = None
    if items_path is not None:
        items = read_items(
            str(items_path), cfg.item_id_column, cfg.title_column, cfg.categories_column,
            cfg.categories_separator, cfg.brand_column, cfg.price_column,
        )  # fmt: skip
    return RawData(interactions=interactions, items=items, implicit=True, positional=positional)
