"""The NETE / PEPLER review format (Li et al.), the one the UserIP-Tuning authors used.

reviews.pickle   a list of dicts: user, item, rating, template = (feature, adjective, sentence, score), ...
item.json        optional item metadata: a JSON object {item: {title, categories, brand, price}}, a list of
                 such dicts with an ``item`` key, or JSON lines of them
user.json        optional user features, same layouts with a ``user`` key
1/ .. 5/         optional index folders: train.index, validation.index, test.index, each holding
                 whitespace-separated row numbers into reviews.pickle (the source's own split; folder 1
                 by default)

The pickle is read with a restricted unpickler that resolves no global except builtin containers and scalars,
so a pickle that would call ``os.system`` (or build any other object) is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from userip.data.sources.base import DataLoadError, LoadReport, RawData, as_category_lists, parse_price

_SAFE_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "str",
        "bytes",
        "bytearray",
        "int",
        "float",
        "bool",
        "complex",
    }
)
INDEX_FILES = {"train": "train.index", "valid": "validation.index", "test": "test.index"}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and scalars; any other global (os.system, numpy, ...) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: only builtin containers and scalars are allowed"
        )


def restricted_load(path: Path) -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise DataLoadError(f"{path}: {e}") from e
    except (EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise DataLoadError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


@dataclasses.dataclass
class NeteConfig:
    path: str  # folder holding reviews.pickle (and item.json, user.json, index folders)
    index_folder: str | None = "1"  # which of the 1..5 index folders gives the source split; None: no split
    max_bad_lines: int = 100  # records without user/item/rating tolerated (counted), then the load fails
    keep_reviews: bool = True

    def __post_init__(self) -> None:
        if self.max_bad_lines < 0:
            raise ValueError(f"max_bad_lines must be >= 0, got {self.max_bad_lines}")


def _read_keyed_json(path: Path, key: str) -> pd.DataFrame:
    """item.json / user.json in any of the three layouts, as a frame with a ``key`` column of str."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataLoadError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if isinstance(data, dict):
        rows = [{key: k, **(v if isinstance(v, dict) else {"title": v})} for k, v in data.items()]
    elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
        rows = data
    else:
        raise DataLoadError(f"{path}: expected an object keyed by {key} id or a list of objects")
    frame = pd.DataFrame.from_records(rows)
    if key not in frame.columns:
        raise DataLoadError(f"{path}: records have no {key!r} field (found {sorted(frame.columns)})")
    frame[key] = frame[key].astype(str)
    return frame


def _first_present(frame: pd.DataFrame, names: tuple[str, ...]) -> pd.Series | None:
    return next((frame[n] for n in names if n in frame.columns), None)


def _read_items(path: Path) -> pd.DataFrame:
    meta = _read_keyed_json(path, "item")
    empty = pd.Series([None] * len(meta), index=meta.index, dtype=object)
    title = _first_present(meta, ("title", "name"))
    categories = _first_present(meta, ("categories", "category"))
    brand = _first_present(meta, ("brand",))
    price = _first_present(meta, ("price",))
    return pd.DataFrame(
        {
            "raw_item_id": meta["item"],
            "title": (empty if title is None else title).fillna("").astype(str),
            "categories": as_category_lists(empty if categories is None else categories, separator=","),
            "brand": (empty if brand is None else brand).fillna("").astype(str),
            "price": parse_price(empty if price is None else price),
        }
    ).drop_duplicates("raw_item_id")


def _read_split(folder: Path, num_reviews: int) -> np.ndarray:
    """The source's split per review row ("" for rows in no index file)."""
    split = np.full(num_reviews, "", dtype=object)
    for name, filename in INDEX_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise DataLoadError(
                f"{path}: index file not found (index folder {folder} needs {list(INDEX_FILES.values())})"
            )
        try:
            rows = np.array(path.read_text().split(), dtype=np.int64)
        except ValueError as e:
            raise DataLoadError(f"{path}: expected whitespace-separated row numbers ({e})") from e
        if len(rows) and (rows.min() < 0 or rows.max() >= num_reviews):
            raise DataLoadError(f"{path}: row numbers must lie in 0..{num_reviews - 1}")
        split[rows] = name
    return split


def load_nete(cfg: NeteConfig) -> RawData:
    folder = Path(cfg.path)
    pickle_path = folder / "reviews.pickle" if folder.is_dir() else folder
    if not pickle_path.is_file():
        raise DataLoadError(f"{pickle_path}: reviews.pickle not found")
    folder = pickle_path.parent
    report = LoadReport(max_bad_lines=cfg.max_bad_lines)
    records = restricted_load(pickle_path)
    if not isinstance(records, list):
        raise DataLoadError(f"{pickle_path}: expected a list of review dicts, got {type(records).__name__}")
    if records and not all(isinstance(r, dict) for r in records):
        raise DataLoadError(f"{pickle_path}: every entry must be a dict with user, item, rating")

    reviews = pd.DataFrame.from_records(records)
    for column in ("user", "item", "rating"):
        if column not in reviews.columns:
            reviews[column] = None
    bad = reviews[["user", "item", "rating"]].isna().any(axis=1).to_numpy()
    for row in np.flatnonzero(bad):
        report.add_bad_line(pickle_path, int(row) + 1, "record lacks user, item or rating")
    report.check_bad_lines()

    interactions = pd.DataFrame(
        {
            "raw_user_id": reviews["user"].astype(str),
            "raw_item_id": reviews["item"].astype(str),
            "rating": pd.to_numeric(reviews["rating"], errors="coerce").astype("float64"),
            "timestamp": np.zeros(len(reviews), dtype=np.int64),  # the format has no time
        }
    )
    if cfg.keep_reviews and "template" in reviews.columns:
        # template = (feature, adjective, sentence, score): the sentence is the review text.
        interactions["review"] = reviews["template"].map(
            lambda t: str(t[2]) if isinstance(t, tuple | list) and len(t) > 2 else ""
        )
    if cfg.index_folder is not None and (folder / cfg.index_folder).is_dir():
        interactions["split"] = _read_split(folder / cfg.index_folder, len(reviews))
    elif cfg.index_folder is not None:
        report.note(f"{folder / cfg.index_folder}: no index folder; the source split is unavailable")
    interactions = interactions[~bad].reset_index(drop=True)

    items = _read_items(folder / "item.json") if (folder / "item.json").is_file() else None
    users = None
    if (folder / "user.json").is_file():
        users = _read_keyed_json(folder / "user.json", "user").rename(columns={"user": "raw_user_id"})
    return RawData(interactions=interactions, items=items, users=users, report=report)
